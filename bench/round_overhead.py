"""Round overhead of our system: the real daemon and K site processes on 127.0.0.1, GPT-2-small-sized.

The daemon runs as ``python -m common.cli serve --config FILE`` (its own
process); each site is its own process (``python -m bench.round_overhead
--site ...``), started the way bench/peers.py starts Flower's SuperNodes and
NVFlare's clients. A site does, per round, what the worker does minus the
model: await the round, fetch the global difference and add it to the state
it holds (client.transfer.Sync), "train" by adding a fixed small step (a
precomputed random buffer; the upload is ``(state + step) - state`` in fp32,
so it carries the rounding pattern of a real difference), then encode with
the default exact codec and push at once, as the worker does since issue 19
(client.outgoing.Outgoing encodes on a thread into the payload file while
client.transfer.push streams each shard as it is written). As the worker, it
keeps its last upload's tensors until the next fetch decodes into them, and
tunes malloc as ``gdfed work`` does (common.malloc).

Measured per K and round r:

- round time: from every site holding global r-1 to every site holding
  global r (round 1: from the round opening); minus the longest local
  "training" of the round = the round overhead;
- per site: encode → first byte (encoding starts → the first chunk handed
  to gRPC), the encoder's time and the push's (both overlap);
- the daemon's peak RSS (its VmRSS sampled every 100 ms, and VmHWM);
- bytes per round: the daemon's own counters (compressed bytes in and out)
  and the growth of the loopback counters (what bench/peers.py also reads).

And the compute limit of a round: the codec work of a round measured one
thread at a time on the same shards (K sites compressing, the aggregator
decompressing and folding K deltas, compressing the broadcast once, K sites
decompressing and applying it), divided by the cores.

    python -m bench.round_overhead [--ks 2 4 8] [--rounds 3] [--quick]

Alone it prints its table; bench/compare_peers.py runs it beside Flower and
NVFlare and writes the docs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import torch
import zstandard
from safetensors.torch import load_file, save_file

from bench.procs import Procs, TreeSampler, free_port, loopback_bytes, status_kib
from bench.workload import MB, encoded_frames, gpt2_small_shapes, realistic_delta
from common.channel import auth_metadata
from common.codec import encode, manifest_of
from common.codec.blocks import new_compressor
from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout, PayloadSpec, ShardSpec, UploadMetrics
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc

ADMIN = "bench-admin"
ROOT = Path(__file__).resolve().parent.parent
STEP_STD = 1e-4  # the fixed local "training" step, as bench.workload.realistic_delta
STEP_ELEMENTS = 1 << 22  # 16 MiB of random steps, reused across tensors (a site needs no 500 MB step)


def model_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """GPT-2 small; ``quick``: every 8th tensor (about 1/8 of the size), as the other benches."""
    shapes = gpt2_small_shapes()
    if quick:
        shapes = {k: v for i, (k, v) in enumerate(shapes.items()) if i % 8 == 0}
    return shapes


def fp32_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(4 * math.prod(s) for s in shapes.values())


def write_init(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """The round-0 trainable state every site and the daemon start from: weights of std 0.02."""
    gen = torch.Generator().manual_seed(1)
    save_file({n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}, str(path))


# ---------------------------------------------------------------- the site process


def local_step(state: dict[str, torch.Tensor], step: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(state + step) - state`` per tensor: the difference a trained site would upload."""
    out = {}
    for name, value in state.items():
        flat = value.reshape(-1)
        delta = torch.empty_like(flat)
        for lo in range(0, flat.numel(), STEP_ELEMENTS):
            hi = min(lo + STEP_ELEMENTS, flat.numel())
            torch.add(flat[lo:hi], step[: hi - lo], out=delta[lo:hi])
            delta[lo:hi].sub_(flat[lo:hi])
        out[name] = delta.view(value.shape)
    return out


def encoder(
    delta: dict[str, torch.Tensor], spec: PayloadSpec
) -> Callable[[BinaryIO, Callable[[ShardSpec], None]], PayloadLayout]:
    """What client.outgoing.Outgoing runs on its thread: ``delta`` encoded under ``spec``, shard by shard."""

    def run(sink: BinaryIO, on_shard: Callable[[ShardSpec], None]) -> PayloadLayout:
        return encode(delta, spec.codec, sink, manifest=spec.manifest, on_shard=on_shard)

    return run


def site_main(args: argparse.Namespace) -> int:
    """One site: join, then await / fetch+apply / train / encode and push until the run is finished."""
    from client.delta_stub import DeltaStub
    from client.outgoing import Outgoing
    from client.transfer import Sync, push
    from common.malloc import tune_malloc

    tune_malloc()  # as `gdfed work` does
    torch.set_num_threads(1)  # as the demo's workers sharing a machine (--threads 1)
    # Private memory, as a worker's trained weights are: load_file's tensors map the file
    # copy-on-write, and the first round's apply would copy every page of them.
    state = {name: value.clone() for name, value in load_file(args.init).items()}
    step = torch.randn(STEP_ELEMENTS, generator=torch.Generator().manual_seed(args.seed)) * STEP_STD
    channel = grpc.insecure_channel(args.target)
    stub = federation_pb2_grpc.FederationStub(channel)
    deltas = DeltaStub(channel)  # PushDelta and FetchDiff framed by common.serde, as the worker's
    meta = auth_metadata(args.token)
    out = open(args.out, "a")  # noqa: SIM115 - one line per event, flushed as it happens

    def record(**fields: Any) -> None:
        out.write(json.dumps(fields) + "\n")
        out.flush()

    join = stub.Join(
        federation_pb2.JoinRequest(
            site_id=args.site, capabilities=federation_pb2.Capabilities(num_samples=100)
        ),
        metadata=meta,
        timeout=60,
    )
    stop = threading.Event()

    def beat() -> None:
        # The worker heartbeats from a thread too; without it a site busy encoding would be dropped.
        while not stop.wait(join.heartbeat_interval_ms / 1000):
            try:
                stub.Heartbeat(
                    federation_pb2.HeartbeatRequest(site_id=args.site, phase=federation_pb2.PHASE_IDLE),
                    metadata=meta,
                    timeout=10,
                )
            except grpc.RpcError:
                continue

    threading.Thread(target=beat, daemon=True).start()
    held, done = 0, 0
    spare: dict[str, torch.Tensor] = {}
    payload = Path(args.out).with_suffix(".payload")
    try:
        while True:
            spec = stub.AwaitRound(
                federation_pb2.AwaitRoundRequest(site_id=args.site, after_round=done, wait_ms=30_000),
                metadata=meta,
                timeout=60,
            )
            if not spec.run_finished and not (spec.round > done and spec.state in (1, 2, 3)):
                continue
            target = spec.base_round if not spec.run_finished else spec.round
            if spec.run_finished or held != target:
                start = time.perf_counter()
                synced = Sync(deltas, meta, args.site, held, state, spare=spare)()
                spare = {}  # as the worker: dropped before training
                if synced.round != held:
                    record(
                        event="applied",
                        round=synced.round,
                        t=time.time(),
                        fetch_s=time.perf_counter() - start,
                        bytes_down=synced.bytes,
                    )
                held = synced.round
            if spec.run_finished:
                break
            start = time.perf_counter()
            delta = local_step(state, step)
            train_s = time.perf_counter() - start
            codec = Codec()
            header = DeltaHeader(
                spec=PayloadSpec(codec, manifest_of(delta)),
                run_id=join.run_id,
                round=spec.round,
                site_id=args.site,
                upload_id=f"{args.site}-r{spec.round}",
                sample_count=100,
                base_round=spec.base_round,
                kind=DeltaKind.DIFF,
                metrics=UploadMetrics(train_loss=1.0, eval_loss=1.0, steps=1, train_seconds=train_s),
            )
            start = time.perf_counter()
            first_byte: list[float] = []

            def sent(n: int, first_byte: list[float] = first_byte) -> None:
                if not first_byte:
                    first_byte.append(time.perf_counter())

            # As the worker: encoded on a thread over the blocks of the last payload file, each
            # shard pushed once written (the first bytes leave after one shard, not the delta).
            outgoing = Outgoing(header, payload, encoder(delta, header.spec), on_encoded=lambda layout: None)
            try:
                push(deltas, meta, header, outgoing, progress=sent)
            finally:
                outgoing.wait()
            layout = outgoing.result()
            push_s = time.perf_counter() - start
            spare, delta = delta, {}  # as the worker: decoded into at the next fetch
            record(
                event="pushed",
                round=spec.round,
                t=time.time(),
                train_s=train_s,
                encode_s=outgoing.seconds,
                first_byte_s=(first_byte[0] if first_byte else math.nan) - start,
                push_s=push_s,
                bytes_up=layout.total_bytes,
            )
            done = spec.round
    finally:
        stop.set()
        channel.close()
        payload.unlink(missing_ok=True)
        out.close()
    return 0


# ---------------------------------------------------------------- the driver


def daemon_config(tmp: Path, port: int, init: Path, k: int, rounds: int) -> Path:
    tokens = "\n".join(f'site{i} = "token{i}"' for i in range(k))
    path = tmp / "aggregator.toml"
    path.write_text(
        f'listen = "127.0.0.1:{port}"\nstate_dir = "{tmp / "state"}"\ninit_state = "{init}"\n'
        f'run_id = "bench-rounds"\nadmin_token = "{ADMIN}"\nrounds = {rounds}\n'
        # 10 s beats (3 missed = dropped): K sites encoding on 2 cores can starve a beat thread for seconds.
        f"heartbeat_interval_s = 10.0\n"
        f"[round]\nmin_sites_to_open = {k}\nmin_sites = 0\n[sites]\n{tokens}\n"
    )
    return path


def run_ours(
    k: int, rounds: int, shapes: dict[str, tuple[int, ...]], work: Path, timeout: float = 1800
) -> dict[str, Any]:
    """One run of the daemon and K site processes; every figure of it."""
    work.mkdir(parents=True, exist_ok=True)
    # A fresh run each time: with an old state directory the daemon would resume the finished run.
    shutil.rmtree(work / "state", ignore_errors=True)
    init = work / "init.safetensors"
    if not init.exists():
        write_init(shapes, init)
    port = free_port()
    config = daemon_config(work, port, init, k, rounds)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    sampler = TreeSampler()
    with Procs(work / "logs") as procs:
        daemon = procs.start(
            "daemon",
            [sys.executable, "-m", "common.cli", "serve", "--config", str(config)],
            env=env,
            cwd=ROOT,
        )
        sampler.add("server", daemon.pid)
        sampler.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        admin = admin_pb2_grpc.AdminStub(channel)
        meta = auth_metadata(ADMIN)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    admin.GetStatus(admin_pb2.StatusRequest(), metadata=meta, timeout=2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise RuntimeError("daemon did not start:\n" + procs.log_tail("daemon")) from None
                    time.sleep(0.2)
            idle_rss_mb = status_kib(daemon.pid, "VmRSS") * 1024 / MB
            lo_start = loopback_bytes()
            cpu_mark = sampler.cpu_mark()
            started = time.time()
            sites = []
            for i in range(k):
                events = work / f"site{i}.jsonl"
                events.unlink(missing_ok=True)
                argv = [
                    sys.executable, "-m", "bench.round_overhead", "--site", f"site{i}",
                    "--target", f"127.0.0.1:{port}", "--token", f"token{i}", "--init", str(init),
                    "--out", str(events), "--seed", str(100 + i),
                ]  # fmt: skip
                proc = procs.start(f"site{i}", argv, env=env, cwd=ROOT)
                sampler.add("sites", proc.pid)
                sites.append((proc, events))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p, _ in sites):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"K={k}: sites still running after {timeout:.0f} s")
                if daemon.poll() is not None:
                    raise RuntimeError("daemon died:\n" + procs.log_tail("daemon"))
                time.sleep(0.2)
            lo_bytes = loopback_bytes() - lo_start
            foreign_cpu = sampler.foreign_cpu_seconds(cpu_mark)
            elapsed = time.time() - started
            failed = [i for i, (p, _) in enumerate(sites) if p.returncode != 0]
            if failed:
                raise RuntimeError(f"site{failed[0]} failed:\n" + procs.log_tail(f"site{failed[0]}"))
            sampler.sample()
            hwm_mb = status_kib(daemon.pid, "VmHWM") * 1024 / MB
            detail = {
                r: admin.GetRound(admin_pb2.GetRoundRequest(round=r), metadata=meta, timeout=10)
                for r in range(1, rounds + 1)
            }
        finally:
            sampler.stop()
            channel.close()
    site_events = [[json.loads(line) for line in path.read_text().splitlines()] for _, path in sites]
    per_round = []
    applied_prev = detail[1].opened_unix_ms / 1000
    for r in range(1, rounds + 1):
        applied = [
            ev["t"] for site in site_events for ev in site if ev["event"] == "applied" and ev["round"] == r
        ]
        pushed = [ev for site in site_events for ev in site if ev["event"] == "pushed" and ev["round"] == r]
        if len(applied) != k or len(pushed) != k:
            raise RuntimeError(f"K={k} round {r}: {len(applied)} sites applied, {len(pushed)} pushed")
        d = detail[r]
        round_s = max(applied) - applied_prev
        train_s = max(ev["train_s"] for ev in pushed)
        per_round.append(
            {
                "round": r,
                "round_s": round_s,
                "train_s": train_s,
                "overhead_s": round_s - train_s,
                "open_to_published_s": (d.published_unix_ms - d.opened_unix_ms) / 1000,
                "aggregate_s": d.aggregate_seconds,
                "encode_s": statistics.median(ev["encode_s"] for ev in pushed),
                "first_byte_s": statistics.median(ev["first_byte_s"] for ev in pushed),
                "push_s": max(ev["push_s"] for ev in pushed),
                "bytes_in": d.bytes_in,
                "bytes_out": d.bytes_out,
            }
        )
        applied_prev = max(applied)
    return {
        "k": k,
        "rounds": per_round,
        "elapsed_s": elapsed,
        "server_peak_rss_MB": sampler.peak_mb("server"),
        "server_hwm_MB": hwm_mb,
        "server_idle_rss_MB": idle_rss_mb,
        "sites_peak_rss_MB": sampler.peak_mb("sites"),
        "loopback_bytes_per_round": lo_bytes / rounds,
        # CPU used by other processes on the machine while this ran, as a share of all its cores.
        "foreign_cpu_share": foreign_cpu / (elapsed * (os.cpu_count() or 1)),
    }


# ---------------------------------------------------------------- the compute limit


def codec_work(shapes: dict[str, tuple[int, ...]], runs: int = 3) -> dict[str, float]:
    """Single-thread seconds, per delta of these shapes, of the round's codec primitives on our shards.

    ``compress``: zstd level 1, with the encoder's parameters, of the
    (already byte-shuffled) blocks our encoder frames; ``decompress``: zstd of those frames; ``add``: torch
    ``acc.add_(delta, alpha=w)`` over the whole state. Each is the minimum of
    ``runs``: the limit is what the machine can do, not what it did while busy.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        delta = realistic_delta(shapes, seed=2)
        frames, wire_bytes = encoded_frames(delta)
        dctx = zstandard.ZstdDecompressor()
        blocks = [dctx.decompress(f, max_output_size=raw) for f, raw in frames]
        cctx = new_compressor(1, shuffled=True)

        def timed(fn: Any) -> float:
            best = math.inf
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            return best

        compress = timed(lambda: [cctx.compress(b) for b in blocks])
        decompress = timed(lambda: [dctx.decompress(f, max_output_size=raw) for f, raw in frames])
        acc = {n: torch.zeros_like(t) for n, t in delta.items()}
        add = timed(lambda: [acc[n].add_(t, alpha=0.25) for n, t in delta.items()])
    finally:
        torch.set_num_threads(torch_threads)
    return {
        "compress_s": compress,
        "decompress_s": decompress,
        "add_s": add,
        "wire_bytes": float(wire_bytes),
        "raw_bytes": float(sum(t.numel() * 4 for t in delta.values())),
    }


def compute_limit(work: dict[str, float], k: int, cores: int) -> float:
    """Seconds a round's codec work needs on ``cores`` cores, perfectly spread.

    K compressions at the sites, K decompressions + folds at the aggregator,
    one compression of the global difference, K decompressions + applies at
    the sites.
    """
    c, d, a = work["compress_s"], work["decompress_s"], work["add_s"]
    return (k * c + k * (d + a) + c + k * (d + a)) / cores


def summarize(result: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Median (min, max) over the rounds of each per-round figure."""
    out = {}
    for key in (
        "round_s",
        "overhead_s",
        "train_s",
        "open_to_published_s",
        "aggregate_s",
        "encode_s",
        "first_byte_s",
        "push_s",
    ):
        values = [r[key] for r in result["rounds"] if key in r]
        if not values:  # saved runs from before a figure existed
            continue
        out[key] = (statistics.median(values), min(values), max(values))
    bytes_round = [float(r["bytes_in"] + r["bytes_out"]) for r in result["rounds"]]
    out["wire_bytes"] = (statistics.median(bytes_round), min(bytes_round), max(bytes_round))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="K=2, 1 round, a 1/8-size model")
    parser.add_argument("--site", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.site:
        return site_main(args)
    if args.quick:
        args.ks, args.rounds = [2], 1
    shapes = model_shapes(args.quick)
    work_limits = codec_work(shapes)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="gdfed-rounds-") as tmp:
        for k in args.ks:
            result = run_ours(k, args.rounds, shapes, Path(tmp) / f"k{k}")
            s = summarize(result)
            limit = compute_limit(work_limits, k, cores)
            print(
                f"K={k}: round {s['round_s'][0]:.2f} s ({s['round_s'][1]:.2f}-{s['round_s'][2]:.2f}), "
                f"overhead {s['overhead_s'][0]:.2f} s, limit {limit:.2f} s (x{s['overhead_s'][0] / limit:.2f}), "
                f"a site's encode {s['encode_s'][0]:.2f} s, encode → first byte {s['first_byte_s'][0]:.2f} s, "
                f"daemon peak RSS {result['server_peak_rss_MB']:.0f} MB (VmHWM {result['server_hwm_MB']:.0f}), "
                f"wire {s['wire_bytes'][0] / MB:.0f} MB/round, loopback {result['loopback_bytes_per_round'] / MB:.0f} MB/round",
                flush=True,
            )
            print(json.dumps(result["rounds"], indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
