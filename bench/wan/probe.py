"""Raw TCP probes through the shaped links: bulk transfers each way and a small ping-pong.

``serve`` runs in the aggregator's namespace; ``client`` in a site's, connecting through the
site's delay line (127.0.0.1) exactly as the federation's programs do. The receiver of a bulk
transfer times it from its first chunk to its last, so neither the connection's setup nor the
delay line's RTT counts against the rate.

    python -m bench.wan.probe serve --port 7701
    python -m bench.wan.probe client --port 7701 --mode up --bytes 20000000 [--at UNIX_TIME]
    python -m bench.wan.probe client --port 7701 --mode ping --count 10
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import statistics
import struct
import sys
import time

HEAD = struct.Struct("!cQ")
CHUNK = 1 << 18
PING = 64


def receive(sock: socket.socket, n: int) -> dict[str, float]:
    """Read ``n`` bytes; the rate over first chunk → last chunk."""
    got = first = 0
    t_first = t_last = 0.0
    buf = bytearray(CHUNK)
    while got < n:
        k = sock.recv_into(buf, min(CHUNK, n - got))
        if not k:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        t_last = time.monotonic()
        if not got:
            first, t_first = k, t_last
        got += k
    span = t_last - t_first
    return {"bytes": float(n), "seconds": span, "bytes_per_s": (n - first) / span if span > 0 else 0.0}


def send(sock: socket.socket, n: int) -> None:
    block = b"\0" * CHUNK
    left = n
    while left:
        left -= sock.send(memoryview(block)[: min(CHUNK, left)])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionError("closed")
        out += part
    return bytes(out)


class Handler(socketserver.BaseRequestHandler):
    """One probe connection: ``U`` n (we receive, reply the timing), ``D`` n (we send), ``P`` (echo)."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        op, n = HEAD.unpack(recv_exact(sock, HEAD.size))
        if op == b"U":
            sock.sendall(json.dumps(receive(sock, n)).encode() + b"\n")
        elif op == b"D":
            send(sock, n)
            recv_exact(sock, 1)  # the client's word that it has everything
        elif op == b"P":
            while True:
                try:
                    sock.sendall(recv_exact(sock, PING))
                except ConnectionError:
                    return


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def client(port: int, mode: str, n: int, count: int, at: float) -> dict[str, float]:
    if at:
        time.sleep(max(0.0, at - time.time()))
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        if mode == "up":
            sock.sendall(HEAD.pack(b"U", n))
            send(sock, n)
            line = b""
            while not line.endswith(b"\n"):
                part = sock.recv(4096)
                if not part:
                    raise ConnectionError("no reply")
                line += part
            return dict(json.loads(line))
        if mode == "down":
            sock.sendall(HEAD.pack(b"D", n))
            out = receive(sock, n)
            sock.sendall(b"k")
            return out
        sock.sendall(HEAD.pack(b"P", 0))
        # The first exchange includes the delay line's handshake; the connection's own cost apart.
        sock.sendall(b"\0" * PING)
        recv_exact(sock, PING)
        first = time.monotonic() - start
        rtts = []
        for _ in range(count):
            t = time.monotonic()
            sock.sendall(b"\0" * PING)
            recv_exact(sock, PING)
            rtts.append(time.monotonic() - t)
        return {"rtt_s": statistics.median(rtts), "rtt_max_s": max(rtts), "first_exchange_s": first}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", choices=["serve", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["up", "down", "ping"], default="ping")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--at", type=float, default=0.0, help="start at this UNIX time (runs side by side)")
    args = parser.parse_args()
    if args.role == "serve":
        with Server(("0.0.0.0", args.port), Handler) as server:
            server.serve_forever()
        return 0
    print(json.dumps(client(args.port, args.mode, args.bytes, args.count, args.at)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
