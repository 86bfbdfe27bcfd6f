"""The limits of this machine that bound a round: memcpy, zstd on our shards, loopback gRPC, torch's weighted add.

bench/codec.py already measures a memcpy and single-thread zstd
decompression of our frames, and bench/aggregator.py the latter again
beside ingest; this adds the rest, each as the median of several runs with
the spread, on the same GPT-2-small-shaped delta:

- memcpy into a preallocated buffer (``np.copyto``);
- zstd level 1 with the encoder's parameters (``new_compressor``: a 2^8 hash
  table for byte planes), one thread, compressing the byte-shuffled 1 MiB
  blocks our encoder frames, and decompressing those frames;
- gRPC over 127.0.0.1, a client stream of 1 MiB raw-bytes messages (identity
  serializers, no protobuf) into a server in another process;
- torch ``acc.add_(delta, alpha=w)`` in fp32, on 1 thread and on every core;
- per core, of the steps every payload byte passes on the wire (issue 19): the
  SHA-256 and BLAKE3 frame digests (``common.codec.digests.frame_digest``) of
  our 1 MiB-block frames, CRC-32C of 1 MiB chunks, and the DeltaChunk framing
  at each end, protobuf's against common.serde's (which slices ``data`` out of
  the received bytes instead of copying it).

    python -m bench.limits [--runs 5] [--quick]

Writes the "limits" section of docs/benchmarks.md and keys ``limits_*`` of
docs/benchmarks.json (not with --quick).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch
import zstandard

from bench.procs import Procs, free_port
from bench.workload import (
    MB,
    encoded_frames,
    encoded_payload,
    gpt2_small_shapes,
    machine,
    median_spread,
    payload_frames,
    realistic_delta,
    write_section,
)
from common.codec import iter_chunks
from common.codec.blocks import new_compressor
from common.codec.chunks import crc32c
from common.codec.digests import frame_digest
from common.delta import Codec, DeltaHeader, Digest
from common.pb.gradualdiff.v1 import delta_pb2
from common.serde import chunk_from_wire, chunk_to_proto, chunk_to_wire

ROOT = Path(__file__).resolve().parent.parent
SINK = "/bench.Sink/Stream"
CHUNK = 1 << 20
GIB = 1 << 30


def _identity(data: bytes) -> bytes:
    return data


def grpc_sink(port: int) -> None:
    """Run in a child process: a gRPC server whose one client-streaming method counts the bytes it gets."""

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        for message in requests:
            total += len(message)
        return str(total).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench.Sink",
        {
            "Stream": grpc.stream_unary_rpc_method_handler(
                stream, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    options = [("grpc.max_receive_message_length", 8 * CHUNK)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def grpc_stream_MBps(total_bytes: int, runs: int) -> list[float]:
    """MB/s of a 1 MiB-message client stream into a server process over loopback, per run."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, Procs(Path(tmp)) as procs:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        procs.start(
            "sink", [sys.executable, "-m", "bench.limits", "--grpc-sink", str(port)], env=env, cwd=ROOT
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        call = channel.stream_unary(SINK, request_serializer=_identity, response_deserializer=_identity)
        payload = os.urandom(CHUNK)
        count = total_bytes // CHUNK
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            got = int(call(iter([payload] * count), timeout=600))
            rates.append(got / (time.perf_counter() - start) / MB)
        channel.close()
    return rates


def zstd_rates(delta: dict[str, torch.Tensor], runs: int) -> tuple[list[float], list[float], float]:
    """Single-thread zstd level 1 (the encoder's parameters) MB/s (of uncompressed bytes) on our shards: compress, decompress; wire bytes."""
    frames, wire_bytes = encoded_frames(delta)
    dctx = zstandard.ZstdDecompressor()
    blocks = [dctx.decompress(f, max_output_size=raw) for f, raw in frames]
    raw_bytes = sum(len(b) for b in blocks)
    cctx = new_compressor(1, shuffled=True)
    comp, decomp = [], []
    for _ in range(runs):
        start = time.perf_counter()
        for b in blocks:
            cctx.compress(b)
        comp.append(raw_bytes / (time.perf_counter() - start) / MB)
        start = time.perf_counter()
        for f, raw in frames:
            dctx.decompress(f, max_output_size=raw)
        decomp.append(raw_bytes / (time.perf_counter() - start) / MB)
    return comp, decomp, float(wire_bytes)


def add_rates(nbytes: int, runs: int, threads: int) -> list[float]:
    """GB/s of fp32 ``acc.add_(delta, alpha=w)`` over ``nbytes`` on ``threads`` threads (bytes of delta read)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        delta = torch.randn(nbytes // 4)
        acc = torch.zeros_like(delta)
        acc.add_(delta, alpha=0.5)  # touch the pages first
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            acc.add_(delta, alpha=0.5)
            rates.append(nbytes / (time.perf_counter() - start) / MB)
    finally:
        torch.set_num_threads(before)
    return rates


def memcpy_rates(nbytes: int, runs: int) -> list[float]:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        np.copyto(dst, src)
        rates.append(nbytes / (time.perf_counter() - start) / MB)
    return rates


def cpu_rates(fn: Callable[[], object], nbytes: int, runs: int) -> list[float]:
    """MB/s of ``fn`` over ``nbytes`` per CPU-second of this thread, per run: one core's rate, whatever else runs."""
    fn()  # warm: first-call imports and allocations are not the step's cost
    rates = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        rates.append(nbytes / (time.thread_time() - start) / MB)
    return rates


def wire_rates(delta: dict[str, torch.Tensor], runs: int) -> dict[str, list[float]]:
    """Per-core MB/s of the integrity and framing steps on the encoded ``delta`` (issue 19)."""
    payload, layout = encoded_payload(delta)
    frames = [frame for frame, _ in payload_frames(payload, layout)]
    header = DeltaHeader(spec=layout.spec, run_id="bench", round=1, site_id="bench", upload_id="limits")
    chunks = list(iter_chunks(header, layout, io.BytesIO(payload)))
    wire = [chunk_to_wire(c) for c in chunks]
    # Same bytes on the wire: common.serde is a faster path to protobuf's encoding, not a new one.
    # Every step below drops each result at once, as a stream does (malloc reuses the buffers);
    # a list of results would time fresh pages faulted in, not the step.
    if wire != [chunk_to_proto(c).SerializeToString() for c in chunks]:
        raise RuntimeError("chunk_to_wire and protobuf serialize these chunks differently")
    messages = [chunk_to_proto(c) for c in chunks]
    nbytes = len(payload)

    def digests(algo: Digest) -> Callable[[], object]:
        return lambda: [frame_digest(algo, f) for f in frames]

    def parse_protobuf() -> None:
        for raw in wire:
            _ = delta_pb2.DeltaChunk.FromString(raw).data

    def parse_serde() -> None:
        for raw in wire:
            _ = chunk_from_wire(raw).data

    def serialize_protobuf() -> None:
        for c in chunks:
            chunk_to_proto(c).SerializeToString()

    def serialize_prebuilt() -> None:
        for m in messages:
            m.SerializeToString()

    def serialize_serde() -> None:
        for c in chunks:
            chunk_to_wire(c)

    return {
        "sha256_frame_digest_MBps": cpu_rates(digests(Digest.SHA256), nbytes, runs),
        "blake3_frame_digest_MBps": cpu_rates(digests(Digest.BLAKE3), nbytes, runs),
        "crc32c_MBps": cpu_rates(lambda: [crc32c(c.data) for c in chunks], nbytes, runs),
        "parse_protobuf_MBps": cpu_rates(parse_protobuf, nbytes, runs),
        "parse_serde_MBps": cpu_rates(parse_serde, nbytes, runs),
        "serialize_protobuf_MBps": cpu_rates(serialize_protobuf, nbytes, runs),
        "serialize_protobuf_prebuilt_MBps": cpu_rates(serialize_prebuilt, nbytes, runs),
        "serialize_serde_MBps": cpu_rates(serialize_serde, nbytes, runs),
    }


def measure(runs: int, quick: bool) -> dict[str, list[float]]:
    shapes = gpt2_small_shapes()
    if quick:
        shapes = {k: v for i, (k, v) in enumerate(shapes.items()) if i % 8 == 0}
    delta = realistic_delta(shapes)
    raw = sum(t.numel() * 4 for t in delta.values())
    comp, decomp, _ = zstd_rates(delta, runs)
    wire = wire_rates(delta, runs)
    del delta
    cores = os.cpu_count() or 1
    return {
        "memcpy_MBps": memcpy_rates(raw, runs),
        "zstd_compress_MBps": comp,
        "zstd_decompress_MBps": decomp,
        "grpc_raw_stream_MBps": grpc_stream_MBps((1 << 28) if quick else (1 << 30), runs),
        "torch_add_1thread_MBps": add_rates(raw, runs, 1),
        f"torch_add_{cores}threads_MBps": add_rates(raw, runs, cores),
        **wire,
    }


WIRE_LABELS = {
    "sha256_frame_digest_MBps": "SHA-256 frame digests (`frame_digest`), our 1 MiB-block frames",
    "blake3_frame_digest_MBps": "BLAKE3 frame digests (`frame_digest`), our 1 MiB-block frames",
    "crc32c_MBps": "CRC-32C of 1 MiB chunks (`common.codec.chunks.crc32c`)",
    "parse_protobuf_MBps": "parse a DeltaChunk: protobuf `DeltaChunk.FromString` + `.data` (copies)",
    "parse_serde_MBps": "parse a DeltaChunk: `common.serde.chunk_from_wire` (`data` a slice of the message)",
    "serialize_protobuf_MBps": "serialize: `chunk_to_proto` + `SerializeToString` (the sender before issue 19)",
    "serialize_protobuf_prebuilt_MBps": "serialize: `SerializeToString` alone (message built beforehand)",
    "serialize_serde_MBps": "serialize: `common.serde.chunk_to_wire` (data copied once)",
}


def render(results: dict[str, list[float]]) -> tuple[list[str], dict[str, object]]:
    """The markdown of the section and its JSON figures."""
    labels = {
        "memcpy_MBps": "memcpy (`np.copyto`, preallocated destination)",
        "zstd_compress_MBps": "zstd level 1 compress with the encoder's parameters, 1 thread, our shuffled 1 MiB blocks (MB in)",
        "zstd_decompress_MBps": "zstd decompress, 1 thread, our frames (MB out)",
        "grpc_raw_stream_MBps": "gRPC client stream over 127.0.0.1, 1 MiB raw-bytes messages, 1 GiB",
    }
    lines = [
        "## Limits of this machine (bench/limits.py)",
        "",
        f"Machine: {machine()}. Median of {len(results['memcpy_MBps'])} runs (min–max); the data is the",
        "GPT-2-small-shaped fp32 delta of the codec bench (497.8 MB), encoded with the exact codec.",
        "",
        "| limit | MB/s |",
        "|---|---|",
    ]
    figures: dict[str, object] = {}
    for key, values in results.items():
        med, lo, hi = median_spread(values)
        figures[f"limits_{key}"] = round(med, 1)
        figures[f"limits_{key}_min"] = round(lo, 1)
        figures[f"limits_{key}_max"] = round(hi, 1)
        if key in WIRE_LABELS:
            continue
        label = labels.get(key) or (
            f"torch fp32 `acc.add_(delta, alpha=w)`, {key.split('_')[2].replace('threads', ' threads').replace('1thread', '1 thread')} (MB of delta)"
        )
        lines.append(f"| {label} | {med:.0f} ({lo:.0f}–{hi:.0f}) |")
    lines += [
        "",
        "### Integrity and framing, per core (issue 19)",
        "",
        "Every step a payload byte passes on the wire besides zstd, on the same encoded delta: the frame digests",
        f"of the shard hash tree (default since wire revision 2: {Codec().digest.name}), the CRC-32C of each chunk, and",
        "the DeltaChunk (de)serialization at each end, protobuf's against common.serde's (the same wire bytes;",
        "the bench checks they agree). Timed by the thread's CPU clock, so the rate is one core's whatever",
        "else runs; *CPU-s per GiB* is what one GiB of payload costs at one end. Each result is dropped at once,",
        "as a stream drops a sent or parsed message, so malloc reuses its buffers: no page faults are counted.",
        "",
        "| step (1 thread) | MB/s | CPU-s per GiB |",
        "|---|---|---|",
    ]
    for key, label in WIRE_LABELS.items():
        med, lo, hi = median_spread(results[key])
        lines.append(f"| {label} | {med:.0f} ({lo:.0f}–{hi:.0f}) | {cpu_s_per_gib(med):.3f} |")
        figures[f"limits_{key.removesuffix('_MBps')}_cpu_s_per_GiB"] = round(cpu_s_per_gib(med), 4)

    def mid(key: str) -> float:
        return statistics.median(results[key])

    blake3_x = mid("blake3_frame_digest_MBps") / mid("sha256_frame_digest_MBps")
    parse_saved = cpu_s_per_gib(mid("parse_protobuf_MBps")) - cpu_s_per_gib(mid("parse_serde_MBps"))
    send_saved = cpu_s_per_gib(mid("serialize_protobuf_MBps")) - cpu_s_per_gib(mid("serialize_serde_MBps"))
    figures["limits_blake3_over_sha256"] = round(blake3_x, 2)
    lines += [
        "",
        f"BLAKE3 hashes {blake3_x:.1f} × as fast as SHA-256 per core. common.serde saves {parse_saved:.3f} CPU-s per",
        f"GiB on the receive path (parse) and {send_saved:.3f} on the send path (serialize) against protobuf.",
    ]
    return lines, figures


def cpu_s_per_gib(mbps: float) -> float:
    """CPU-seconds one GiB costs at ``mbps`` MB per CPU-second."""
    return GIB / MB / mbps


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="a 1/8-size delta, 256 MiB streams; writes no docs"
    )
    parser.add_argument("--grpc-sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpc_sink:
        grpc_sink(args.grpc_sink)
        return 0
    results = measure(3 if args.quick else args.runs, args.quick)
    lines, figures = render(results)
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        write_section("limits", table, figures)
        print("wrote docs/benchmarks.md and docs/benchmarks.json")
    else:
        print({k: round(statistics.median(v), 1) for k, v in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
