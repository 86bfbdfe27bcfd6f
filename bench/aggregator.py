"""Aggregator ingest benchmark: K concurrent uploads of a GPT-2-small-sized delta into the real daemon.

The daemon runs as its own process (``gdfed serve``) on 127.0.0.1, with a
GPT-2-small-shaped fp32 trainable state; K sites push the same encoded delta
(exact codec) at once, each under its own upload id, and the round closes
when all K are accepted. Measured per K:

- ingest: K × decoded fp32 bytes / (first chunk sent → last upload accepted);
- the daemon's peak RSS while ingesting (VmRSS sampled every 50 ms) and over
  the whole round including publication (VmHWM);
- beside the limit: one thread decompressing exactly those shards with zstd.

Each K is measured on a round after ``--warmup`` untimed rounds at the same K
(default 1): a daemon runs round after round, and its first round allocates
what later rounds reuse (spool files, the blocks of the state file).

    python -m bench.aggregator [--ks 1 4 16] [--warmup 1] [--quick]

Writes the "aggregator" section of docs/benchmarks.md and keys ``aggregator_*``
of docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from safetensors.torch import save_file

from bench.codec import zstd_limit
from bench.workload import MB, gpt2_small_shapes, machine, realistic_delta, write_section
from common.channel import auth_metadata
from common.codec import encode, iter_chunks
from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from common.serde import chunk_to_wire

ADMIN = "bench-admin"
PUSH = "/gradualdiff.v1.Federation/PushDelta"
# Issue 19: the daemon decodes at least this share of what one core of zstd decompresses, per CPU-second.
CPU_GOAL = 0.4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Daemon:
    """``gdfed serve`` in a subprocess."""

    def __init__(self, tmp: Path, init: Path, sites: int) -> None:
        self.port = free_port()
        config = tmp / "aggregator.toml"
        tokens = "\n".join(f'site{i} = "token{i}"' for i in range(sites))
        config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "{tmp / "state"}"\ninit_state = "{init}"\n'
            f'run_id = "bench"\nadmin_token = "{ADMIN}"\nheartbeat_interval_s = 60.0\n'
            f"[round]\nmin_sites = 1\n[sites]\n{tokens}\n"
        )
        self.log = (tmp / "aggregator.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "serve", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.meta = auth_metadata(ADMIN)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.admin.GetStatus(admin_pb2.StatusRequest(), metadata=self.meta, timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"aggregator did not start; see {self.log.name}") from None
                time.sleep(0.2)

    def status(self) -> admin_pb2.RunStatus:
        return self.admin.GetStatus(admin_pb2.StatusRequest(), metadata=self.meta, timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.channel.close()
        self.log.close()


def run_round(
    daemon: Daemon, k: int, layout: PayloadLayout, payload: Path, raw_bytes: int
) -> dict[str, float]:
    """One round with K concurrent uploads; returns its figures."""
    daemon.admin.SetRoundPolicy(
        admin_pb2.SetRoundPolicyRequest(quorum=federation_pb2.Quorum(min_sites=k)),
        metadata=daemon.meta,
        timeout=10,
    )
    stubs = []
    for i in range(k):
        channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")
        stub = federation_pb2_grpc.FederationStub(channel)
        meta = auth_metadata(f"token{i}")
        # As the worker sends: chunks serialized by common.serde (no protobuf message per chunk).
        push_call: grpc.StreamUnaryMultiCallable[bytes, federation_pb2.PushReceipt] = channel.stream_unary(
            PUSH, request_serializer=None, response_deserializer=federation_pb2.PushReceipt.FromString
        )
        reply = stub.Join(
            federation_pb2.JoinRequest(
                site_id=f"site{i}", capabilities=federation_pb2.Capabilities(num_samples=100)
            ),
            metadata=meta,
            timeout=30,
        )
        stubs.append((channel, stub, push_call, meta, reply.run_id))
    spec = stubs[0][1].AwaitRound(
        federation_pb2.AwaitRoundRequest(site_id="site0", after_round=0, wait_ms=30_000),
        metadata=stubs[0][3],
        timeout=40,
    )
    data = payload.read_bytes()
    errors: list[BaseException] = []
    barrier = threading.Barrier(k + 1)
    done_at: list[float] = []

    def push(i: int) -> None:
        _, _, push_call, meta, run_id = stubs[i]
        header = DeltaHeader(
            spec=layout.spec,
            run_id=run_id,
            round=spec.round,
            site_id=f"site{i}",
            upload_id=f"r{spec.round}-site{i}",
            sample_count=100,
            base_round=spec.base_round,
            kind=DeltaKind.DIFF,
        )
        messages = (chunk_to_wire(c) for c in iter_chunks(header, layout, io.BytesIO(data)))
        barrier.wait()
        try:
            push_call(messages, metadata=meta, timeout=1800)
            done_at.append(time.perf_counter())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    peak_kib = [status_kib(daemon.proc.pid, "VmRSS")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak_kib.append(status_kib(daemon.proc.pid, "VmRSS"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    barrier.wait()
    start = time.perf_counter()
    cpu_start = cpu_seconds(daemon.proc.pid)
    for t in threads:
        t.join()
    ingest_cpu = cpu_seconds(daemon.proc.pid) - cpu_start
    ingest_s = max(done_at) - start if done_at else float("nan")
    ingest_peak = max(peak_kib) * 1024
    # Wait for publication, still sampling.
    deadline = time.monotonic() + 600
    while daemon.status().current_round == spec.round and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    sampler.join()
    for channel, *_ in stubs:
        channel.close()
    if errors:
        raise RuntimeError(f"{len(errors)} upload(s) failed: {errors[0]}")
    detail = daemon.admin.GetRound(
        admin_pb2.GetRoundRequest(round=spec.round), metadata=daemon.meta, timeout=10
    )
    return {
        "k": k,
        "ingest_s": ingest_s,
        "ingest_MBps": k * raw_bytes / ingest_s / MB,
        "cpu_MBps": k * raw_bytes / ingest_cpu / MB,
        "ingest_peak_rss_MB": ingest_peak / MB,
        "round_peak_rss_MB": max(peak_kib) * 1024 / MB,
        "aggregate_s": detail.aggregate_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before each K's measured one")
    parser.add_argument("--quick", action="store_true", help="a 1/8-size model; writes no docs")
    args = parser.parse_args()
    shapes = gpt2_small_shapes()
    if args.quick:
        shapes = {k: v for i, (k, v) in enumerate(shapes.items()) if i % 8 == 0}
    raw_bytes = sum(4 * int(__import__("math").prod(s)) for s in shapes.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        init = tmp / "init.safetensors"
        state = realistic_delta(shapes, seed=1, step_std=0.02)  # any fp32 state of the right shapes
        save_file(state, str(init))
        del state
        delta = realistic_delta(shapes, seed=2)
        payload = tmp / "delta.payload"
        with payload.open("wb") as sink:
            layout = encode(delta, Codec(), sink)
        del delta
        limit_s, produced = min(zstd_limit(payload, layout) for _ in range(3))
        limit_MBps = produced / limit_s / MB
        daemon = Daemon(tmp, init, max(args.ks))
        try:
            baseline = status_kib(daemon.proc.pid, "VmRSS") * 1024 / MB
            for k in args.ks:
                for _ in range(args.warmup):
                    run_round(daemon, k, layout, payload, raw_bytes)
                row = run_round(daemon, k, layout, payload, raw_bytes)
                rows.append(row)
                print(
                    f"K={k:>2}: ingest {row['ingest_MBps']:.0f} MB/s ({row['ingest_s']:.2f} s), "
                    f"{row['cpu_MBps']:.0f} MB per daemon CPU-second, "
                    f"peak RSS ingest {row['ingest_peak_rss_MB']:.0f} MB, round {row['round_peak_rss_MB']:.0f} MB, "
                    f"aggregate {row['aggregate_s']:.2f} s",
                    flush=True,
                )
            hwm = status_kib(daemon.proc.pid, "VmHWM") * 1024 / MB
        finally:
            daemon.stop()
    goal_rss = (2.5 * raw_bytes + 256 * 2**20) / MB
    lines = [
        "## Aggregator ingest (bench/aggregator.py)",
        "",
        f"The daemon (`gdfed serve`, its own process) with a GPT-2-small-shaped fp32 trainable state "
        f"({raw_bytes / MB:.1f} MB); K sites push the same exact-codec delta ({layout.total_bytes / MB:.1f} MB on the wire) "
        f"at once over 127.0.0.1; the round closes when all K are accepted; each K measured on the round after "
        f"{args.warmup} untimed one(s) at that K (steady state: spool files and state blocks reused). Machine: {machine()}.",
        f"Ingest = K × {raw_bytes / MB:.1f} MB decoded / (first chunk → last acceptance). The limit: one thread",
        f"decompressing the same shards with zstd, {limit_MBps:.0f} MB/s. Daemon RSS after start: {baseline:.0f} MB "
        f"(torch and the process); its VmHWM over the whole run: {hwm:.0f} MB.",
        "",
        "| K | ingest MB/s | ingest / zstd limit | MB per daemon CPU-s | that / zstd limit | ingest s | peak RSS while ingesting MB | peak RSS incl. publish MB | publish s | RSS goal MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['k']} | {row['ingest_MBps']:.0f} | {row['ingest_MBps'] / limit_MBps:.2f} | {row['cpu_MBps']:.0f} | "
            f"{row['cpu_MBps'] / limit_MBps:.2f} | {row['ingest_s']:.2f} | "
            f"{row['ingest_peak_rss_MB']:.0f} | {row['round_peak_rss_MB']:.0f} | {row['aggregate_s']:.2f} | {goal_rss:.0f} |"
        )
    cpu_fraction = min(r["cpu_MBps"] for r in rows) / limit_MBps
    lines += [
        "",
        "Goals (issue 3): peak RSS at K = 16 ≤ 2.5 × the fp32 state + 256 MiB, flat in K; ingest ≥ 0.70 of the zstd limit.",
        f"Issue 19: MB per daemon CPU-s ≥ {CPU_GOAL} of one core's zstd decompression of the same frames (*that / zstd",
        f"limit* ≥ {CPU_GOAL}); lowest over K here: {cpu_fraction:.2f}, "
        f"{'met' if cpu_fraction >= CPU_GOAL else f'**not met** (short by {CPU_GOAL - cpu_fraction:.2f})'}.",
        "Publication (mean → difference → new state, encoded and fsynced) is reported apart from ingest.",
        "The senders share the daemon's 2 cores (reading chunks, gRPC on both ends), so wall-clock ingest is bounded",
        "by the machine, not the daemon alone; *MB per daemon CPU-s* (decoded bytes over the daemon's user+system",
        "CPU time while ingesting) is the daemon's own cost, comparable with one core decompressing zstd. That cost",
        "covers, per byte: gRPC and HTTP/2 framing, the DeltaChunk parse (common.serde, data sliced, not copied),",
        f"CRC-32C, the spool write, the {Codec().digest.name} shard digest, zstd decompression, unshuffle and the fp32",
        "fold; bench/limits.py measures most of these steps alone, per core.",
        "Wire revision 2: the senders stream chunks as the worker does (common.serde.chunk_to_wire); each shard's",
        "spec travels with its last chunk, and the header carries codec and manifest only.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        figures: dict[str, object] = {"aggregator_zstd_limit_MBps": round(limit_MBps, 1)}
        for row in rows:
            k = int(row["k"])
            figures |= {
                f"aggregator_k{k}_ingest_MBps": round(row["ingest_MBps"], 1),
                f"aggregator_k{k}_MB_per_daemon_cpu_second": round(row["cpu_MBps"], 1),
                f"aggregator_k{k}_peak_rss_MB": round(row["round_peak_rss_MB"], 1),
                f"aggregator_k{k}_ingest_peak_rss_MB": round(row["ingest_peak_rss_MB"], 1),
                f"aggregator_k{k}_publish_s": round(row["aggregate_s"], 2),
            }
        figures["ingest_fraction_of_zstd_limit"] = round(min(r["ingest_MBps"] for r in rows) / limit_MBps, 3)
        # Issue 19's goal, read by bench/compare_peers.py's goal table: lowest over K.
        figures["daemon_cpu_fraction_of_zstd_limit"] = round(cpu_fraction, 3)
        for row in rows:
            figures[f"aggregator_k{int(row['k'])}_cpu_fraction_of_zstd_limit"] = round(
                row["cpu_MBps"] / limit_MBps, 3
            )
        write_section("aggregator", table, figures)
        print("wrote docs/benchmarks.md and docs/benchmarks.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
