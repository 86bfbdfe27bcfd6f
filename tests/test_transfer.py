"""The worker's fetch (client.transfer.Sync) against a scripted aggregator that breaks its streams.

The scripted aggregator is a real gRPC server on 127.0.0.1 serving real
encoded payloads (common.codec) through FetchDiff, and cutting the stream
where the test says. What is checked: a delta is applied whole or not at
all, and a retry after a broken chain resumes from the round reached, so no
difference is ever added twice.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace

import grpc
import pytest
import torch

from client.delta_stub import DeltaStub
from client.transfer import Sync
from common.codec import encode, iter_chunks
from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout
from common.errors import DataLoss
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2
from common.serde import chunk_to_proto

SHAPES = {"a.weight": (300, 257), "b.bias": (33,)}
CHUNK = 16 * 1024  # small chunks, so a delta spans many messages


def _delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in SHAPES.items()}


@dataclass
class Stored:
    header: DeltaHeader
    layout: PayloadLayout
    payload: bytes

    def messages(self) -> list[delta_pb2.DeltaChunk]:
        source = io.BytesIO(self.payload)
        return [chunk_to_proto(c) for c in iter_chunks(self.header, self.layout, source, chunk_bytes=CHUNK)]


def _store(tensors: dict[str, torch.Tensor], round_number: int, kind: DeltaKind) -> Stored:
    sink = io.BytesIO()
    layout = encode(tensors, Codec(), sink)
    header = DeltaHeader(
        spec=layout.spec, run_id="run", round=round_number, base_round=round_number - 1, kind=kind
    )
    return Stored(header, layout, sink.getvalue())


@dataclass
class Script:
    """What the scripted aggregator serves: the chain of differences, and where to cut each call."""

    diffs: list[Stored]
    cut_after: list[int | None] = field(default_factory=list)  # per call: messages sent before UNAVAILABLE
    asked: list[int] = field(default_factory=list)  # have_round of each call
    lock: threading.Lock = field(default_factory=threading.Lock)


class ScriptedAggregator:
    """Serves FetchDiff only (registered by name: the other methods answer UNIMPLEMENTED)."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def FetchDiff(
        self, request: federation_pb2.FetchDiffRequest, context: grpc.ServicerContext
    ) -> Iterator[delta_pb2.DeltaChunk]:
        with self.script.lock:
            call = len(self.script.asked)
            self.script.asked.append(request.have_round)
            cut = self.script.cut_after[call] if call < len(self.script.cut_after) else None
        sent = 0
        for stored in self.script.diffs[request.have_round :]:
            for message in stored.messages():
                if cut is not None and sent == cut:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "scripted cut")
                sent += 1
                yield message


def _serve(servicer: ScriptedAggregator) -> tuple[grpc.Server, DeltaStub]:
    handler = grpc.method_handlers_generic_handler(
        "gradualdiff.v1.Federation",
        {
            "FetchDiff": grpc.unary_stream_rpc_method_handler(
                servicer.FetchDiff,
                request_deserializer=federation_pb2.FetchDiffRequest.FromString,
                response_serializer=delta_pb2.DeltaChunk.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # The worker's framing (common.serde) against a server that serializes with protobuf.
    return server, DeltaStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


@pytest.fixture
def serve():
    servers = []

    def start(script: Script) -> DeltaStub:
        server, stub = _serve(ScriptedAggregator(script))
        servers.append(server)
        return stub

    yield start
    for server in servers:
        server.stop(grace=None)


def _chain(n: int) -> tuple[list[dict[str, torch.Tensor]], list[Stored]]:
    deltas = [_delta(seed) for seed in range(1, n + 1)]
    return deltas, [_store(d, r, DeltaKind.DIFF) for r, d in enumerate(deltas, start=1)]


def _expected(
    base: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base.items()}
    for d in deltas:
        for k, v in d.items():
            out[k].add_(v)
    return out


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def test_a_chain_is_applied_in_order(serve) -> None:
    deltas, stored = _chain(3)
    stub = serve(Script(stored))
    state = _base()
    synced = Sync(stub, (), "site-a", 0, state)()
    assert (synced.round, synced.deltas, synced.snapshot) == (3, 3, False)
    assert synced.bytes == sum(s.layout.total_bytes for s in stored)
    for name, value in _expected(_base(), deltas).items():
        assert torch.equal(state[name], value)


def test_a_retry_after_a_broken_chain_resumes_from_the_round_reached(serve) -> None:
    deltas, stored = _chain(3)
    first = len(stored[0].messages())
    # The first call breaks three messages into the second difference, the second call one message
    # into the third; the third call completes.
    script = Script(stored, cut_after=[first + 3, len(stored[1].messages()) + 1])
    stub = serve(script)
    state = _base()
    sync = Sync(stub, (), "site-a", 0, state)
    for expect_round in (1, 2):
        with pytest.raises(grpc.RpcError) as info:
            sync()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert sync.round == expect_round
        # What the state holds is exactly the rounds reached: the cut delta left no trace.
        for name, value in _expected(_base(), deltas[:expect_round]).items():
            assert torch.equal(state[name], value)
    synced = sync()
    assert script.asked == [0, 1, 2]
    assert (synced.round, synced.deltas) == (3, 3)
    for name, value in _expected(_base(), deltas).items():
        assert torch.equal(state[name], value)


def test_a_damaged_delta_leaves_the_state_as_it_was(serve) -> None:
    deltas, stored = _chain(2)
    bad = bytearray(stored[1].payload)
    bad[len(bad) // 2] ^= 0xFF
    # The damage is re-checksummed per chunk (a liar upstream, not the network): only the shard's digest catches it.
    stored[1] = replace(stored[1], payload=bytes(bad))
    stub = serve(Script(stored))
    state = _base()
    sync = Sync(stub, (), "site-a", 0, state)
    with pytest.raises(DataLoss):
        sync()
    assert sync.round == 1
    for name, value in _expected(_base(), deltas[:1]).items():
        assert torch.equal(state[name], value)


def test_a_snapshot_cut_midway_leaves_the_state_untouched(serve) -> None:
    target = _base()
    for k in target:
        target[k] += 1.0
    snap = _store(target, 4, DeltaKind.SNAPSHOT)
    snap = replace(snap, header=replace(snap.header, base_round=0))

    class SnapshotOnly(ScriptedAggregator):
        def FetchDiff(self, request, context):
            with self.script.lock:
                call = len(self.script.asked)
                self.script.asked.append(request.have_round)
            for i, message in enumerate(snap.messages()):
                if call == 0 and i == 5:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "scripted cut")
                yield message

    script = Script([])
    server, stub = _serve(SnapshotOnly(script))
    try:
        state = _base()
        sync = Sync(stub, (), "site-a", 0, state, snapshot=True)
        with pytest.raises(grpc.RpcError):
            sync()
        for name, value in _base().items():
            assert torch.equal(state[name], value)
        synced = sync()
        assert (synced.round, synced.snapshot) == (4, True)
        for name, value in target.items():
            assert torch.equal(state[name], value)
    finally:
        server.stop(grace=None)


def test_spare_tensors_are_decoded_into_and_reused_along_the_chain(serve) -> None:
    deltas, stored = _chain(3)
    stub = serve(Script(stored))
    state = _base()
    spare = {name: torch.full(shape, float("nan")) for name, shape in SHAPES.items()}
    pointers = {name: t.data_ptr() for name, t in spare.items()}
    synced = Sync(stub, (), "site-a", 0, state, spare=spare)()
    assert synced.round == 3
    for name, value in _expected(_base(), deltas).items():
        assert torch.equal(state[name], value)
    # The spare memory held every difference in turn; the last one is still in it.
    for name, value in spare.items():
        assert value.data_ptr() == pointers[name]
        assert torch.equal(value, deltas[-1][name])
        assert value.data_ptr() != state[name].data_ptr()


def test_a_broken_stream_into_spares_leaves_the_state_as_it_was(serve) -> None:
    deltas, stored = _chain(2)
    stub = serve(Script(stored, cut_after=[len(stored[0].messages()) + 2]))
    state = _base()
    spare = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    sync = Sync(stub, (), "site-a", 0, state, spare=spare)
    with pytest.raises(grpc.RpcError):
        sync()
    assert sync.round == 1
    for name, value in _expected(_base(), deltas[:1]).items():
        assert torch.equal(state[name], value)


def test_spares_of_another_shape_or_dtype_are_left_alone(serve) -> None:
    deltas, stored = _chain(1)
    stub = serve(Script(stored))
    state = _base()
    wrong = {"a.weight": torch.zeros(257, 300), "b.bias": torch.zeros(33, dtype=torch.float64)}
    Sync(stub, (), "site-a", 0, state, spare=wrong)()
    for name, value in _expected(_base(), deltas).items():
        assert torch.equal(state[name], value)
    assert not wrong["a.weight"].any() and not wrong["b.bias"].any()
