"""A resumed push that races another stream of the same upload asks the offset again, never gives up.

A stream the link cut may still be draining on the aggregator when the worker asks where to
resume; it then commits more, and the worker's stream starts behind: WRONG_OFFSET. That is no
reason to drop the upload (which "round over" would do): ``client.transfer.push`` asks again.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client.delta_stub import DeltaStub
from client.transfer import StoredPayload, push
from common.pb.gradualdiff.v1 import federation_pb2
from tests.scripted import MakeHarness, harnesses, random_delta

CHUNK = 1024


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


class RacingStub:
    """The real stub, except that right after the first offset it answers, another stream of the
    same upload (a real one, to the real aggregator) commits more bytes: the race, made certain."""

    def __init__(self, stub: Any, race: Any) -> None:
        self._stub, self._race = stub, race
        self.PushDelta = stub.PushDelta
        self.offsets: list[int] = []

    def GetUploadOffset(self, request: Any, **kwargs: Any) -> federation_pb2.UploadOffsetReply:
        reply: federation_pb2.UploadOffsetReply = self._stub.GetUploadOffset(request, **kwargs)
        self.offsets.append(reply.committed_offset)
        if len(self.offsets) == 1:
            self._race()
        return reply


def test_a_push_behind_another_stream_asks_the_offset_again(harness: MakeHarness, tmp_path: Path) -> None:
    h = harness({"a": 10})
    h.join_all()
    a = h["a"]
    head, payload = a.header(random_delta(3, h.init), round=1, base=0, shard_bytes=8 * 1024)
    chunks = list(a.chunks(head, payload, chunk_bytes=CHUNK))
    assert len(chunks) > 8
    # A first stream, cut after a quarter: the aggregator keeps what it committed.
    with pytest.raises(grpc.RpcError):  # ABORTED RESUME_AT_OFFSET; test_error_details checks it
        a.push_messages(iter(chunks[: len(chunks) // 4]))
    quarter = sum(len(c.data) for c in chunks[: len(chunks) // 4])
    # The other stream resumes at the quarter (its first chunk carries the header) and is cut again.
    racing = list(
        itertools.islice(a.chunks(head, payload, start=quarter, chunk_bytes=CHUNK), len(chunks) // 4)
    )
    further = quarter + sum(len(c.data) for c in racing)
    stub = RacingStub(DeltaStub(a.channel), lambda: _swallow(lambda: a.push_messages(iter(racing))))
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    receipt = push(stub, a.metadata, head, StoredPayload(path, payload.layout), resume=True)  # type: ignore[arg-type]
    assert receipt.accepted and not receipt.duplicate
    # It asked, was overtaken, asked again and went on from where the other stream had got to.
    assert stub.offsets == [quarter, further]
    assert a.offset(head.upload_id).complete


def _swallow(call: Any) -> None:
    with contextlib.suppress(grpc.RpcError):  # the racing stream is cut short on purpose
        call()
