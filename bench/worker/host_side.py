"""The host side of a full fine-tune: the worker's peak RSS outside training, before and after issue 17.

A GPT-2-small-shaped model (124M parameters, built from a config, fp32, every
parameter trains) in a child process that does, phase by phase, what the
worker does around a round with the worker's own functions, against a
scripted aggregator in another process on 127.0.0.1 (real gRPC: ``push`` and
``Sync`` of client.transfer):

    hold           the round's start: trainable_state (the one fp32 copy a worker keeps)
    (train)        a stand-in, not measured: every parameter moves by a small random step
    encode+upload  the difference trained − start, encoded to a payload file and pushed
                   (client.transfer.push)
    reset          the model back to the start (load_trainable)
    fetch          client.transfer.Sync: the global difference of the round, applied to the start

``--mode old`` is the worker before issue 17: the trained state copied out of
the model (what train_round hands back), the difference taken in place
(client.train.difference), a dict encoded, its tensors kept as the fetch's
decode buffers, the payload encoded whole before its push. ``--mode lean`` is
the worker now: client.delta_source.Difference encoded a piece at a time from
the model's parameters on client.outgoing's thread while the push streams each
shard once written (issue 19), the fetch spooled to disk and applied a few MiB
at a time. Each phase starts by resetting the
process's VmHWM (``echo 5 > /proc/self/clear_refs``); its peak is VmHWM then
minus the baseline: the process with the model loaded and touched (one
forward pass), malloc tuned as ``gdfed work`` tunes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from bench.procs import free_port

SITE = "site-a"
TRAIN_STEP = 1e-4  # the stand-in training step's scale; weights are ~0.02


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def gpt2_small() -> Any:
    """GPT-2 small (n_embd 768, 12 layers, vocab 50257, tied head), from a config, seeded."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024))


# ----------------------------------------------------------------------------- the scripted aggregator
def serve(directory: Path, port: int) -> None:
    """FetchDiff serves ``directory/global.payload`` (its layout in ``global.layout``); PushDelta takes and drops.

    Framed as the daemon frames (common.serde's zero-copy functions as gRPC's (de)serializers).
    """
    from common.codec import iter_chunks
    from common.delta import Chunk, DeltaHeader, DeltaKind
    from common.pb.gradualdiff.v1 import federation_pb2
    from common.serde import chunk_from_wire, chunk_to_wire, layout_from_bytes

    layout = layout_from_bytes((directory / "global.layout").read_bytes())
    header = DeltaHeader(spec=layout.spec, run_id="bench", round=2, base_round=1, kind=DeltaKind.DIFF)

    def fetch(request: Any, context: grpc.ServicerContext) -> Iterator[Chunk]:
        with (directory / "global.payload").open("rb") as source:
            yield from iter_chunks(header, layout, source)

    def push(requests: Iterator[Chunk], context: grpc.ServicerContext) -> Any:
        received, first = 0, None
        for request in requests:
            first = first or request.header
            received += len(request.data)
        return federation_pb2.PushReceipt(
            upload_id=first.upload_id if first else "", round=1, bytes_received=received, accepted=True
        )

    handler = grpc.method_handlers_generic_handler(
        "gradualdiff.v1.Federation",
        {
            "FetchDiff": grpc.unary_stream_rpc_method_handler(
                fetch,
                request_deserializer=federation_pb2.FetchDiffRequest.FromString,
                response_serializer=chunk_to_wire,
            ),
            "PushDelta": grpc.stream_unary_rpc_method_handler(
                push,
                request_deserializer=chunk_from_wire,
                response_serializer=federation_pb2.PushReceipt.SerializeToString,
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    (directory / "ready").write_text("1")
    server.wait_for_termination()


def write_global(directory: Path) -> None:
    """The round's global difference (GPT-2 small's shapes, a realistic small step), encoded as the aggregator does."""
    from bench.workload import realistic_delta
    from common.codec import BROADCAST_SHARD_BYTES, encode
    from common.delta import Codec
    from common.serde import layout_to_bytes

    delta = realistic_delta({n: tuple(p.shape) for n, p in gpt2_small().named_parameters()}, seed=7)
    with (directory / "global.payload").open("wb") as sink:
        layout = encode(delta, Codec(), sink, shard_bytes=BROADCAST_SHARD_BYTES)
    # Kept beside the payload, as the aggregator keeps its stored differences' layouts.
    (directory / "global.layout").write_bytes(layout_to_bytes(layout))


# ----------------------------------------------------------------------------- the measured worker
def measure(mode: str, target: str, directory: Path) -> dict[str, Any]:
    """The phases above in this process; peak RSS above the baseline per phase, in MB."""
    import torch

    from client.delta_source import Difference, trained_values
    from client.delta_stub import DeltaStub
    from client.model import LoadedModel, load_trainable, trainable_state
    from client.outgoing import Outgoing
    from client.train import difference
    from client.transfer import StoredPayload, Sync, push
    from common.codec import encode
    from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout, PayloadSpec, ShardSpec
    from common.malloc import tune_malloc

    tune_malloc()
    model = gpt2_small()
    model.eval()
    loaded = LoadedModel(model, None, [n for n, _ in model.named_parameters()], torch.device("cpu"))
    names = loaded.trainable
    copy_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 16, dtype=torch.long))
    baseline = _status_kib("VmRSS")
    peaks: dict[str, float] = {}
    stub = DeltaStub(grpc.insecure_channel(target))

    def phase(name: str) -> None:
        peaks[name] = (_status_kib("VmHWM") - baseline) * 1024 / 1e6

    _reset_peak()
    state = trainable_state(loaded)
    phase("hold")

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=TRAIN_STEP)

    # One phase, encode and upload: the worker now pushes each shard as it is encoded (issue 19);
    # before, the payload was encoded whole to its file, then pushed.
    _reset_peak()
    spare: dict[str, torch.Tensor] = {}
    payload = directory / f"{mode}.payload"
    if mode == "old":
        with payload.open("wb") as sink:
            trained = trainable_state(loaded)
            spare = difference(trained, state, names, own=set(names))
            load_trainable(loaded, state)
            layout = encode(spare, Codec(), sink)
            del trained
        header = DeltaHeader(spec=layout.spec, run_id="bench", round=1, site_id=SITE, upload_id="u-old")
        push(stub, (), header, StoredPayload(payload, layout))
    else:
        delta = Difference(trained_values(model, names, {}), state, names)
        spec = PayloadSpec(Codec(), delta.manifest)
        header = DeltaHeader(spec=spec, run_id="bench", round=1, site_id=SITE, upload_id="u-lean")

        def run(sink: BinaryIO, on_shard: Callable[[ShardSpec], None]) -> PayloadLayout:
            return encode(delta, spec.codec, sink, manifest=spec.manifest, on_shard=on_shard)

        outgoing = Outgoing(header, payload, run, on_encoded=lambda layout: None)
        try:
            push(stub, (), header, outgoing)
        finally:
            outgoing.wait()
        layout = outgoing.result()
        del delta, outgoing
    phase("encode+upload")

    _reset_peak()
    load_trainable(loaded, state)
    phase("reset")

    _reset_peak()
    synced = Sync(stub, (), SITE, 1, state, spare=spare, spool_dir=directory)()
    assert synced.round == 2 and synced.deltas == 1, synced
    del spare
    phase("fetch")
    digest = _state_digest(state, names)
    return {
        "mode": mode,
        "copy_mb": copy_mb,
        "baseline_mb": baseline * 1024 / 1e6,
        "peaks_mb": peaks,
        "upload_digest": layout.digest.hex(),
        "state_after_fetch_sha256": digest,
        "kind": DeltaKind.DIFF.name,
    }


def _state_digest(state: dict[str, Any], names: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in names:
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the parent
def run(
    modes: tuple[str, ...] = ("old", "lean"), child: tuple[str, ...] = ("-m", "bench.worker.host_side")
) -> dict[str, dict[str, Any]]:
    """Each mode in a child process of its own against one scripted aggregator; their results by mode."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        directory = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "bench.worker.host_side", "--write-global", str(directory)], check=True
        )
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.worker.host_side", "--serve", str(directory), "--port", str(port)]
        )
        try:
            deadline = time.monotonic() + 120
            while not (directory / "ready").exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the scripted aggregator did not start")
                time.sleep(0.1)
            for mode in modes:
                out = directory / f"{mode}.json"
                subprocess.run(
                    [
                        sys.executable,
                        *child,
                        "--measure",
                        mode,
                        "--target",
                        f"127.0.0.1:{port}",
                        "--dir",
                        str(directory),
                        "--out",
                        str(out),
                    ],
                    check=True,
                )
                results[mode] = json.loads(out.read_text())
        finally:
            server.terminate()
            server.wait(30)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write-global", type=Path)
    parser.add_argument("--serve", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--measure", choices=("old", "lean"))
    parser.add_argument("--target", default="")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.write_global:
        write_global(args.write_global)
    elif args.serve:
        serve(args.serve, args.port)
    elif args.measure:
        result = measure(args.measure, args.target, args.dir)
        args.out.write_text(json.dumps(result))
    else:
        print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
