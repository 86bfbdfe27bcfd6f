"""A TCP proxy on 127.0.0.1 that delays, cuts and resets the connections it carries (seeded).

Sites connect to the proxy; it connects each to the daemon and copies bytes both ways. When a
connection opens, a seeded RNG draws its fate: passed through, delayed (every piece it forwards
waits a few milliseconds), cut (closed both ways, FIN, after a random number of bytes) or reset
(RST, by closing with SO_LINGER 0, after a random number of bytes). Cut and reset points fall
anywhere in the byte stream: mid-frame, mid-upload, mid-reply. A gRPC channel reconnects after a
cut, so the next connection draws again; faults are drawn per connection so that an upload always
gets a clean connection eventually (probabilities below 1).

The proxy runs an asyncio loop in a thread of its own; ``faults`` can be switched off to let a
run finish cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass

CHUNK = 64 * 1024


@dataclass(frozen=True)
class FaultRates:
    """Per connection: the chance of each fault, and how far in (bytes) a cut or reset may fall."""

    delay: float = 0.2
    cut: float = 0.1
    reset: float = 0.1
    max_delay_s: float = 0.03
    max_offset: int = 256 * 1024


@dataclass
class ProxyCounts:
    """What the proxy did, by kind."""

    connections: int = 0
    delayed: int = 0
    cut: int = 0
    reset: int = 0

    @property
    def faults(self) -> int:
        return self.delayed + self.cut + self.reset


class FaultProxy:
    """Listens on 127.0.0.1:``port`` (0: any free one) and forwards to ``target_port``."""

    def __init__(self, target_port: int, seed: int, rates: FaultRates | None = None) -> None:
        self.target_port = target_port
        self.rates = rates or FaultRates()
        self.faults = True
        self.counts = ProxyCounts()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        assert self._server is not None, "the proxy did not start"
        self.port: int = int(self._server.sockets[0].getsockname()[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0, reuse_address=True)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def close(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _draw(self) -> tuple[str, float, int]:
        """This connection's fate: (kind, delay per piece, the byte offset of a cut or reset)."""
        with self._lock:
            self.counts.connections += 1
            if not self.faults:
                return "pass", 0.0, 0
            r = self._rng.random()
            rates = self.rates
            offset = self._rng.randrange(rates.max_offset)
            if r < rates.cut:
                kind, delay = "cut", 0.0
            elif r < rates.cut + rates.reset:
                kind, delay = "reset", 0.0
            elif r < rates.cut + rates.reset + rates.delay:
                kind, delay = "delay", self._rng.uniform(0.001, rates.max_delay_s)
            else:
                kind, delay = "pass", 0.0
            return kind, delay, offset

    def _count(self, kind: str) -> None:
        with self._lock:
            if kind == "delay":
                self.counts.delayed += 1
            elif kind == "cut":
                self.counts.cut += 1
            elif kind == "reset":
                self.counts.reset += 1

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._carry(reader, writer)
        except asyncio.CancelledError:
            _abort(writer)  # the proxy is closing

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, delay, offset = self._draw()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _abort(writer)  # the daemon is down: the site sees the connection refused, as without us
            return
        budget = [offset] if kind in ("cut", "reset") else None
        done = asyncio.Event()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while not done.is_set():
                    data = await src.read(CHUNK)
                    if not data:
                        break
                    if budget is not None:
                        if len(data) >= budget[0]:
                            dst.write(data[: budget[0]])
                            with contextlib.suppress(OSError):
                                await dst.drain()
                            self._count(kind)
                            break
                        budget[0] -= len(data)
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                done.set()

        if kind == "delay":
            self._count(kind)
        tasks = [
            asyncio.ensure_future(pump(reader, up_writer)),
            asyncio.ensure_future(pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            if kind == "reset":
                _abort(writer)
                _abort(up_writer)
            else:
                for w in (writer, up_writer):
                    with contextlib.suppress(Exception):
                        w.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
