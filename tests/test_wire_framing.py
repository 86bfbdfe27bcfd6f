"""The DeltaChunk framing by hand (common.serde.chunk_to_wire/chunk_from_wire) against protobuf's own.

Both directions must agree with protobuf byte for byte: what chunk_to_wire
writes is what protobuf serializes, and what chunk_from_wire reads from any
bytes is what protobuf parses (or both refuse them), with ``data`` a view into
the received bytes rather than a copy. Also the storage forms of a layout and
of a list of shard specs.
"""

from __future__ import annotations

import io

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import serde
from common.codec import encode
from common.codec.chunks import make_chunk
from common.codec.protowire import varint
from common.delta import (
    Cast,
    Chunk,
    Codec,
    DeltaHeader,
    DeltaKind,
    Digest,
    Lossy,
    PayloadLayout,
    PayloadSpec,
    Piece,
    ShardSpec,
    TensorSpec,
    UploadMetrics,
)
from common.dtypes import DType
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import delta_pb2 as pb

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
texts = st.text(max_size=12)

shard_specs = st.builds(
    ShardSpec,
    compressed_bytes=u64,
    raw_bytes=u64,
    digest=st.binary(max_size=40),
    pieces=st.lists(st.builds(Piece, u32, u64, u64), max_size=4).map(tuple),
    frame_bytes=st.lists(u32, max_size=5).map(tuple),
)

tensor_specs = st.builds(
    TensorSpec,
    st.text(min_size=1, max_size=10),
    st.sampled_from([d for d in DType if d.value]),
    st.lists(st.integers(0, 2**40), max_size=3).map(tuple),
)

codecs = st.builds(
    Codec,
    cast=st.sampled_from(Cast),
    byte_shuffle=st.booleans(),
    block_bytes=u32,
    zstd_level=st.integers(-5, 22),
    lossy=st.sampled_from(Lossy),
    topk_fraction=st.floats(allow_nan=False),
    digest=st.sampled_from(Digest),
)

headers = st.builds(
    DeltaHeader,
    spec=st.builds(PayloadSpec, codecs, st.lists(tensor_specs, max_size=3).map(tuple)),
    run_id=texts,
    round=u64,
    site_id=texts,
    upload_id=texts,
    sample_count=u64,
    base_round=u64,
    kind=st.sampled_from(DeltaKind),
    metrics=st.builds(
        UploadMetrics,
        train_loss=st.floats(0, 1e6),
        eval_loss=st.floats(0, 1e6),
        steps=u64,
        train_seconds=st.floats(0, 1e6),
    ),
)

chunks = st.builds(
    Chunk,
    offset=u64,
    data=st.binary(max_size=3000),
    crc32=u32,
    last=st.booleans(),
    header=st.none() | headers,
    shard=st.none() | shard_specs,
)


def _same(got: Chunk, want: Chunk) -> None:
    assert got == want
    assert bytes(got.data) == bytes(want.data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk=chunks)
def test_both_directions_agree_with_protobuf(chunk: Chunk) -> None:
    raw = serde.chunk_to_wire(chunk)
    assert raw == serde.chunk_to_proto(chunk).SerializeToString()
    parsed = serde.chunk_from_wire(raw)
    _same(parsed, serde.chunk_from_proto(pb.DeltaChunk.FromString(raw)))
    _same(parsed, chunk)


def test_data_is_a_view_into_the_message_not_a_copy() -> None:
    chunk = make_chunk(7, bytes(range(256)) * 4096, False)
    raw = serde.chunk_to_wire(chunk)
    parsed = serde.chunk_from_wire(raw)
    assert isinstance(parsed.data, memoryview) and parsed.data.obj is raw
    assert parsed.data.tobytes() == chunk.data
    assert parsed.crc32 == chunk.crc32
    # A view of bytes to send is taken as it is, copied once into the message.
    assert serde.chunk_to_wire(parsed) == raw


def _outcome(raw: bytes) -> tuple[str, object]:
    """What protobuf (then chunk_from_proto) makes of ``raw``: a chunk, or the error's kind."""
    try:
        msg = pb.DeltaChunk.FromString(raw)
    except DecodeError:
        return "malformed", None
    try:
        return "chunk", serde.chunk_from_proto(msg)
    except InvalidArgument as exc:
        return "invalid", exc.field


def _check_like_protobuf(raw: bytes) -> None:
    kind, want = _outcome(raw)
    try:
        got = serde.chunk_from_wire(raw)
    except InvalidArgument as exc:
        if kind == "malformed":
            assert exc.reason == "MALFORMED_REQUEST"
            assert "DeltaChunk" in exc.message
        else:
            assert (kind, exc.field) == ("invalid", want), exc
        return
    assert kind == "chunk", f"protobuf: {kind} {want}; chunk_from_wire: {got}"
    assert isinstance(want, Chunk)
    _same(got, want)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes changed, cut, or inserted (fields of any number and wire type)."""
    raw = bytearray(serde.chunk_to_wire(draw(chunks)))
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["flip", "cut", "insert", "field"]))
        at = draw(st.integers(0, len(raw)))
        if what == "flip" and raw:
            raw[min(at, len(raw) - 1)] = draw(st.integers(0, 255))
        elif what == "cut":
            del raw[at:]
        elif what == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=6))
        else:
            number = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 15, 16, 2**29 - 1]))
            wire_type = draw(st.integers(0, 7))
            body = draw(st.binary(max_size=12))
            raw[at:at] = varint(number << 3 | wire_type) + varint(len(body)) + body
    return bytes(raw)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated() | st.binary(max_size=40))
def test_any_bytes_read_as_protobuf_reads_them(raw: bytes) -> None:
    _check_like_protobuf(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes([0x10] + [0xFF] * 9 + [0x7F]),  # a 10-byte varint: truncated to 64 bits
        bytes([0x10] + [0xFF] * 10 + [0x01]),  # 11 bytes: refused
        b"\x00\x01",  # field number 0
        b"\x12\x01\x00",  # offset with the wrong wire type: an unknown field
        b"\x13\x14",  # an empty group
        b"\x13\x1b\x1c\x14",  # nested groups
        b"\x13\x1c",  # a group closed by another number
        b"\x13",  # a group never closed
        b"\x14",  # a stray end of group
        b"\x1a\x02ab\x1a\x01c",  # data twice: the last one counts
        b"\x0a\x02\x08\x01\x0a\x02\x10\x02",  # the header twice: merged
        b"\x0a\x01\x0a\x0a\x01\x00",  # each occurrence parsed on its own
        b"\x32\x00",  # an empty shard spec is present
        b"\x1a\x05a",  # data running past the end
        b"\x25\x01\x02",  # a fixed32 cut short
        b"\x1e",  # wire type 6
        b"\x28\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # last: any non-zero varint is true
        b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number
        b"\xf8\xff\xff\xff\x1f\x01",  # a tag past 32 bits
        b"\x88\x80\x80\x80\x80\x00\x01",  # a 6-byte tag
        b"\x0a\x03\x30\x80\x01",  # a header whose kind is unknown: refused by chunk_from_proto alike
        b"\x0a\x02\x12\x01",  # a header whose site_id is cut short
        b"\x0a\x03\x12\x01\xff",  # a string that is not UTF-8
    ],
)
def test_edge_cases_read_as_protobuf_reads_them(raw: bytes) -> None:
    _check_like_protobuf(raw)


def test_non_chunk_bytes_are_malformed_request() -> None:
    with pytest.raises(InvalidArgument) as info:
        serde.chunk_from_wire(b"\xff\xff\xff")
    assert info.value.reason == "MALFORMED_REQUEST"
    assert info.value.code.name == "INVALID_ARGUMENT"


def _layout() -> tuple[PayloadLayout, bytes]:
    delta = {"w": torch.randn(300, 40), "b": torch.arange(5), "e": torch.empty(0)}
    layout = encode(delta, Codec(block_bytes=64 * 1024), io.BytesIO(), shard_bytes=20_000)
    return layout, serde.layout_to_bytes(layout)


def test_layout_and_shards_stored_and_read_back() -> None:
    layout, raw = _layout()
    assert len(layout.shards) > 2
    assert serde.layout_from_bytes(raw) == layout
    assert serde.shards_from_bytes(serde.shards_to_bytes(layout.shards)) == layout.shards
    assert serde.shards_from_bytes(b"") == ()
    empty = encode({}, Codec(), io.BytesIO())
    assert serde.layout_from_bytes(serde.layout_to_bytes(empty)) == empty


def test_stored_forms_refuse_what_they_did_not_write() -> None:
    _, raw = _layout()
    for bad in (raw[:-3], b"\x1e", b"\x0a\x05ab"):
        with pytest.raises(InvalidArgument) as info:
            serde.layout_from_bytes(bad)
        assert info.value.field == "layout"
    with pytest.raises(InvalidArgument) as info:
        serde.shards_from_bytes(b"\x0a\x09\x01")
    assert info.value.field == "shards"
