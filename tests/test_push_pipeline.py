"""The worker's pipelined push (client.outgoing, client.transfer.push) against a scripted aggregator.

The worker encodes its upload on a thread into its spool file while the
push streams each shard as soon as it is written. The scripted aggregator is
a real gRPC server on 127.0.0.1 that parses the worker's messages with
protobuf (the worker frames them with common.serde), keeps what it receives
and cuts streams where a test says. The encoder reads its tensors through a
mapping that holds one tensor back until the test lets it go, so each test
knows that the encoder is still running at the moment it checks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from client.delta_stub import DeltaStub
from client.local_state import LocalState
from client.outgoing import Outgoing, start_encoding
from client.transfer import RESUMABLE, push
from common.codec.encoder import manifest_of
from common.delta import Chunk, Codec, DeltaHeader, DeltaKind, PayloadSpec
from common.errors import NonFiniteValues
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2
from common.retry import Retrier, RetryPolicy
from common.serde import chunk_from_proto

RUN = "run-1"
SHARD = 64 * 1024  # shards of 64 KiB: the held-back tensor is the fourth shard
FAST = RetryPolicy(first_delay=0.01, max_delay=0.05, max_elapsed=30.0, retry_on=RESUMABLE)
WAIT_S = 30.0


class Gated(Mapping[str, torch.Tensor]):
    """Tensors for the encoder; ``held`` is handed over only once ``release`` is set."""

    def __init__(self, tensors: dict[str, torch.Tensor], held: str) -> None:
        self._tensors, self._held = tensors, held
        self.release = threading.Event()
        self.asked = threading.Event()  # the encoder is waiting for the held tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == self._held:
            self.asked.set()
            if not self.release.wait(WAIT_S):
                raise TimeoutError(f"tensor {name!r} was never released")
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _tensors(bad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    held = torch.randn(SHARD // 4, generator=g)
    if bad:
        held[7] = float("nan")
    return {"a.weight": torch.randn(3 * SHARD // 4, generator=g), "b.weight": held}


@dataclass
class Intake:
    """PushDelta and GetUploadOffset of one upload: what arrived, per stream, and where to cut."""

    cut_after: list[int | None] = field(default_factory=list)  # per stream: chunks taken, then UNAVAILABLE
    on_chunk: list[object] = field(default_factory=list)  # callables (stream, index, chunk)
    held: bytearray = field(default_factory=bytearray)  # the committed bytes
    streams: list[list[Chunk]] = field(default_factory=list)
    complete: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def push(
        self, requests: Iterator[delta_pb2.DeltaChunk], context: grpc.ServicerContext
    ) -> federation_pb2.PushReceipt:
        with self.lock:
            number = len(self.streams)
            chunks: list[Chunk] = []
            self.streams.append(chunks)
            cut = self.cut_after[number] if number < len(self.cut_after) else None
        for message in requests:
            if cut is not None and len(chunks) == cut:
                # Committed: all but the last 100 bytes, so the resume starts inside a chunk.
                del self.held[max(0, len(self.held) - 100) :]
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted cut")
            chunk = chunk_from_proto(message)
            if chunk.offset != len(self.held):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"offset {chunk.offset}")
            self.held += bytes(chunk.data)
            chunks.append(chunk)
            for hook in self.on_chunk:
                hook(number, len(chunks) - 1, chunk)  # type: ignore[operator]
            if chunk.last:
                self.complete = True
                return federation_pb2.PushReceipt(upload_id="u", round=1, accepted=True)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before its last chunk")
        raise AssertionError("unreachable")

    def offset(
        self, request: federation_pb2.UploadOffsetRequest, context: grpc.ServicerContext
    ) -> federation_pb2.UploadOffsetReply:
        return federation_pb2.UploadOffsetReply(committed_offset=len(self.held), complete=self.complete)


@pytest.fixture
def serve() -> Iterator[tuple[Intake, DeltaStub]]:
    intake = Intake()
    handler = grpc.method_handlers_generic_handler(
        "gradualdiff.v1.Federation",
        {
            "PushDelta": grpc.stream_unary_rpc_method_handler(
                intake.push,
                request_deserializer=delta_pb2.DeltaChunk.FromString,
                response_serializer=federation_pb2.PushReceipt.SerializeToString,
            ),
            "GetUploadOffset": grpc.unary_unary_rpc_method_handler(
                intake.offset,
                request_deserializer=federation_pb2.UploadOffsetRequest.FromString,
                response_serializer=federation_pb2.UploadOffsetReply.SerializeToString,
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield intake, DeltaStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def _start(local: LocalState, tensors: Mapping[str, torch.Tensor]) -> Outgoing:
    manifest = manifest_of(_tensors())
    header = DeltaHeader(
        spec=PayloadSpec(Codec(), manifest),
        run_id=RUN,
        round=1,
        site_id="site-a",
        upload_id="site-a-r1-0001",
        sample_count=1,
        kind=DeltaKind.DIFF,
    )
    return start_encoding(header, tensors, local, shard_bytes=SHARD)


def _check_stream(intake: Intake, outgoing: Outgoing) -> None:
    """What arrived is the payload on disk, each shard's spec on the chunk that ends it."""
    layout = outgoing.result()
    assert bytes(intake.held) == outgoing.path.read_bytes()
    assert len(intake.held) == layout.total_bytes and len(layout.shards) == 4
    begin, shard_ends = 0, {}
    for shard in layout.shards:
        begin += shard.compressed_bytes
        shard_ends[begin] = shard
    for stream in intake.streams:
        assert stream[0].header == outgoing.header
        assert all(c.header is None for c in stream[1:])
        for chunk in stream:
            end = chunk.offset + len(chunk.data)
            assert chunk.shard == shard_ends.get(end), end
    assert intake.streams[-1][-1].last and intake.complete


def test_the_first_shard_leaves_before_the_encoder_is_done(
    tmp_path: Path, serve: tuple[Intake, DeltaStub]
) -> None:
    intake, stub = serve
    local = LocalState(tmp_path)
    tensors = Gated(_tensors(), held="b.weight")
    seen: dict[str, bool] = {}

    def on_chunk(stream: int, index: int, chunk: Chunk) -> None:
        if chunk.shard is not None and not tensors.release.is_set():
            # A shard is in while the encoder still waits for the last tensor: pipelined.
            seen["encoding"] = outgoing.layout is None and tensors.asked.wait(WAIT_S)
            tensors.release.set()
        if chunk.last:
            seen["recorded"] = local.pending(RUN, 1) is not None

    intake.on_chunk.append(on_chunk)
    outgoing = _start(local, tensors)
    receipt = push(stub, (), outgoing.header, outgoing, retrier=Retrier(FAST))
    assert receipt.accepted
    assert seen == {"encoding": True, "recorded": True}
    _check_stream(intake, outgoing)
    assert len(intake.streams) == 1


def test_a_stream_cut_while_encoding_resumes_at_the_committed_offset(
    tmp_path: Path, serve: tuple[Intake, DeltaStub]
) -> None:
    intake, stub = serve
    intake.cut_after = [2]  # two shards of 64 KiB in, then the link drops
    local = LocalState(tmp_path)
    tensors = Gated(_tensors(), held="b.weight")
    seen: dict[str, bool] = {}

    def on_chunk(stream: int, index: int, chunk: Chunk) -> None:
        if stream == 1 and index == 0:
            seen["resumed while encoding"] = tensors.asked.wait(WAIT_S) and outgoing.layout is None
            tensors.release.set()

    intake.on_chunk.append(on_chunk)
    outgoing = _start(local, tensors)
    receipt = push(stub, (), outgoing.header, outgoing, retrier=Retrier(FAST))
    assert receipt.accepted and seen == {"resumed while encoding": True}
    assert len(intake.streams) == 2
    first_end = intake.streams[0][-1].offset + len(intake.streams[0][-1].data)
    assert intake.streams[1][0].offset == first_end - 100  # inside a shard, inside a chunk
    _check_stream(intake, outgoing)
    assert local.pending(RUN, 1) is not None


def test_an_encoder_error_stops_the_push_and_surfaces_as_itself(
    tmp_path: Path, serve: tuple[Intake, DeltaStub]
) -> None:
    intake, stub = serve
    local = LocalState(tmp_path)
    tensors = Gated(_tensors(bad=True), held="b.weight")
    intake.on_chunk.append(lambda stream, index, chunk: tensors.release.set())
    outgoing = _start(local, tensors)
    with pytest.raises(NonFiniteValues):
        push(stub, (), outgoing.header, outgoing, retrier=Retrier(FAST))
    with pytest.raises(NonFiniteValues):
        outgoing.result()
    assert not intake.complete and not any(c.last for s in intake.streams for c in s)
    assert local.pending(RUN, 1) is None  # nothing to resume: the round is trained again


def test_a_payload_whose_encoding_never_finished_is_not_pending(tmp_path: Path) -> None:
    local = LocalState(tmp_path)
    tensors = Gated(_tensors(), held="b.weight")
    outgoing = _start(local, tensors)
    assert tensors.asked.wait(WAIT_S)
    # What a worker killed now leaves: part of a payload, no record of the upload.
    assert outgoing.path.stat().st_size > 0
    assert LocalState(tmp_path).pending(RUN, 1) is None
    tensors.release.set()
    outgoing.result()
    restarted = LocalState(tmp_path).pending(RUN, 1)
    assert restarted is not None and restarted.layout == outgoing.result()
    assert restarted.header == outgoing.header
