"""A userspace delay line: a TCP relay that holds every byte for half the round-trip time each way.

The kernel here has no sch_netem, so the round-trip time of a link is added by this relay,
which runs in each site's namespace: it listens on the site's 127.0.0.1 at the service ports
and connects each accepted connection to the aggregator over the shaped veth. Every chunk it
reads is queued with the time it may leave (read time + RTT/2) and written then, so the delay
does not cost throughput (no sleep per read: a timestamped queue per direction, bounded in
bytes as a TCP window bounds what is in flight). A new connection reaches the aggregator RTT/2
after it is accepted and its first bytes no earlier than RTT + RTT/2, as over a real
three-way handshake.

What it does not model: TCP's own dynamics over the long path (slow start, loss recovery
paced by the RTT); the relayed hop to the aggregator has a sub-millisecond RTT. HTTP/2's
flow-control windows, request/response turns and TLS handshakes do see the full RTT.

    python -m bench.wan.delay --to 10.77.0.1 --ports 7700 7701 --rtt-ms 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from collections import deque

CHUNK = 1 << 20
# In flight per direction: a TCP window of 8 MiB is 200 MB/s at 40 ms, far above the links here.
WINDOW = 8 << 20


class Line:
    """One direction: chunks with their departure times, bounded in bytes."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.moved = 0
        self.changed = asyncio.Event()

    async def pump_in(self, reader: asyncio.StreamReader, not_before: float = 0.0) -> None:
        while True:
            while self.queued >= WINDOW:
                self.changed.clear()
                await self.changed.wait()
            try:
                data = await reader.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            leave = max(time.monotonic(), not_before) + self.delay
            self.queue.append((leave, data))
            self.queued += len(data)
            self.changed.set()
            if not data:  # EOF travels down the line like the bytes before it
                return

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        while True:
            while not self.queue:
                self.changed.clear()
                await self.changed.wait()
            leave, data = self.queue[0]
            wait = leave - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            self.queued -= len(data)
            self.changed.set()
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()
                return
            writer.write(data)
            self.moved += len(data)
            await writer.drain()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # Nagle would hold small pieces (HTTP/2 frames, acks) back for a delayed ACK on top of the RTT.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: tuple[str, int], rtt: float
) -> None:
    """Carry one accepted connection to ``target`` through a delay of ``rtt / 2`` each way."""
    accepted = time.monotonic()
    _nodelay(writer)
    up, down = Line(rtt / 2), Line(rtt / 2)
    # The client's first bytes can leave only once the handshake's RTT is over.
    reading = asyncio.ensure_future(up.pump_in(reader, not_before=accepted + rtt))
    try:
        await asyncio.sleep(rtt / 2)  # the SYN's way to the aggregator
        try:
            up_reader, up_writer = await asyncio.open_connection(*target, limit=CHUNK)
        except OSError:
            return
        _nodelay(up_writer)
        tasks = [
            reading,
            asyncio.ensure_future(up.pump_out(up_writer)),
            asyncio.ensure_future(down.pump_in(up_reader)),
            asyncio.ensure_future(down.pump_out(writer)),
        ]
        ended = "closed"
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError) as exc:
            ended = repr(exc)
        finally:
            # One line per connection: a connection the relay ended is the first suspect when a run fails.
            print(
                f"{target[1]}: {time.monotonic() - accepted:.1f} s, up {up.moved} B, down {down.moved} B, {ended}",
                file=sys.stderr,
                flush=True,
            )
            for task in tasks:
                task.cancel()
            up_writer.close()
    finally:
        reading.cancel()
        writer.close()


async def serve(to: str, ports: list[int], rtt: float, listen: str = "127.0.0.1") -> None:
    servers = []
    for port in ports:

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port) -> None:
            await relay(r, w, (to, port), rtt)

        servers.append(await asyncio.start_server(handle, listen, port, limit=CHUNK, reuse_address=True))
    print(f"delay line: {listen}:{ports} -> {to}, RTT {rtt * 1000:.1f} ms", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--to", required=True, help="the aggregator's address")
    parser.add_argument("--ports", type=int, nargs="+", required=True)
    parser.add_argument("--rtt-ms", type=float, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.to, args.ports, args.rtt_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
