"""Every way a delta stream can be wrong is refused with its typed error: never a crash, a hang, or a bomb.

Tampered layouts are rebuilt consistently (tests/codec_helpers.py) so that each
case reaches the one check it is aimed at: a frame swapped by an attacker
comes with matching sizes and digests, and must still be caught by what it
cannot fake.

On the wire (revision 2) the header carries the codec and the manifest, which
are refused before any payload byte is read (:func:`refused_before_payload`);
each shard's spec comes with the chunk that ends the shard and is refused
there, before that shard is decoded (:func:`refused_at_spec`); a stored layout
(what decode_file reads) is refused whole before its payload is read.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import struct
import tracemalloc
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common.codec import (
    DecodeLimits,
    DeltaStreamDecoder,
    decode_chunks,
    decode_file,
    make_chunk,
    validate_layout,
)
from common.codec.layout import expected_frame_sizes, frame_bound, header_bound
from common.codec.shuffle import unshuffle_into
from common.delta import MIB, Cast, Chunk, Codec, Digest, PayloadLayout, Piece, TensorSpec
from common.dtypes import DType
from common.errors import (
    ChunkOrderError,
    DataLoss,
    GdfedError,
    InvalidArgument,
    LimitExceeded,
    MalformedShard,
    ManifestMismatch,
    NonFiniteValues,
    TruncatedStream,
)
from tests.codec_helpers import (
    assert_bit_exact,
    block_frame,
    chunks,
    decode_bytes,
    encode_bytes,
    flip,
    frame_offsets,
    header,
    only_first,
    rebuild,
    replace_shard,
    resign,
    safetensors_header,
    shard_header_json,
    split_frames,
    unzstd,
    with_header_frame,
    zstd,
)

Q = "model.layers.0.q_proj.weight"
CODEC = Codec(block_bytes=64 * 1024)


def reference_delta() -> dict[str, torch.Tensor]:
    """Two shards: q_proj split across them, shard 0 with two block frames, shard 1 with five pieces."""
    gen = torch.Generator().manual_seed(0)
    return {
        Q: torch.randn(100, 300, generator=gen) * 0.02,
        "model.layers.0.q_proj.bias": torch.randn(300, generator=gen),
        "step": torch.tensor(7),
        "mask": torch.rand(10, generator=gen) > 0.5,
        "model.norm.weight": torch.randn(64, generator=gen).bfloat16(),
    }


@functools.cache
def _reference() -> tuple[PayloadLayout, bytes]:
    layout, payload = encode_bytes(reference_delta(), CODEC, shard_bytes=100_000)
    # The cases below rely on this shape of layout.
    assert [len(s.frame_bytes) for s in layout.shards] == [3, 6]
    assert [len(s.pieces) for s in layout.shards] == [1, 5]
    return layout, payload


@pytest.fixture
def ref() -> tuple[PayloadLayout, bytes]:
    return _reference()


def small_delta() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "b": torch.tensor([1, -2, 3], dtype=torch.int16),
        "c": torch.tensor(True),
    }


@functools.cache
def _small() -> tuple[PayloadLayout, bytes]:
    """Three shards of a few bytes each: small enough to flip every byte of the payload."""
    layout, payload = encode_bytes(small_delta(), Codec(), shard_bytes=12)
    assert len(layout.shards) == 3
    return layout, payload


def decode_both(layout: PayloadLayout, payload: bytes, **kwargs: Any) -> None:
    """Decode through the chunk stream (1 KiB chunks) and from a file; both must raise the same type."""
    errors: list[BaseException] = []
    decoders: list[Callable[[], object]] = [
        lambda: decode_bytes(layout, payload, chunk_bytes=1024, **kwargs),
        lambda: decode_file(io.BytesIO(payload), layout, **kwargs),
    ]
    for decode in decoders:
        try:
            decode()
        except GdfedError as exc:
            errors.append(exc)
        else:
            raise AssertionError("decoding did not fail")
    assert type(errors[0]) is type(errors[1]), errors
    raise errors[0]


class NoPayload(io.BytesIO):
    """A payload source that fails the test if read: checks must come before the payload."""

    def read(self, size: int | None = -1, /) -> bytes:
        raise AssertionError("the payload was read before the header was refused")

    def seek(self, offset: int, whence: int = 0, /) -> int:
        raise AssertionError("the payload was read before the header was refused")


def refused_before_payload(layout: PayloadLayout, payload: bytes, **kwargs: Any) -> None:
    """Decode by chunks (only the first may be taken) and from a file that may not be read; raise."""
    errors: list[BaseException] = []
    for decode in (
        lambda: decode_chunks(only_first(chunks(layout, payload, 1024)), **kwargs),
        lambda: decode_file(NoPayload(), layout, **kwargs),
        lambda: DeltaStreamDecoder(**kwargs).feed(chunks(layout, payload, 1024)[0]),
    ):
        try:
            decode()
        except GdfedError as exc:
            errors.append(exc)
        else:
            raise AssertionError("the header was accepted")
    assert len({type(e) for e in errors}) == 1, errors
    raise errors[0]


def refused_at_spec(layout: PayloadLayout, payload: bytes, *, honest: bool = True, **kwargs: Any) -> None:
    """A lying shard spec: refused from a stored layout before its payload is read, and in a stream at the
    chunk that carries it (or, for what only the whole can tell, at the last chunk); raise.

    ``honest``: the stream is cut at the shards' real ends (the reference's), the
    lying specs riding on the chunks that end them; else at the ends ``layout`` claims.
    """
    errors: list[BaseException] = []
    try:
        decode_file(NoPayload(), layout, **kwargs)
    except GdfedError as exc:
        errors.append(exc)
    else:
        raise AssertionError("the stored layout was accepted")
    stream = chunks(layout, payload, 1024, cut=_reference()[0] if honest else None)
    decoder = DeltaStreamDecoder(**kwargs)
    fed = 0
    try:
        for chunk in stream:
            decoder.feed(chunk)
            fed += 1
        decoder.finish()
    except GdfedError as exc:
        errors.append(exc)
    else:
        raise AssertionError("the stream was accepted")
    finally:
        decoder.close()
    assert stream[fed].shard is not None or stream[fed].last, "refused before the spec arrived"
    assert type(errors[0]) is type(errors[1]), errors
    raise errors[1]


def expect(
    cls: type[GdfedError], code: grpc.StatusCode, field: str | None = None, match: str | None = None
) -> Any:
    """pytest.raises for exactly ``cls`` (not a subclass or a parent), checking its status code."""
    return _Expect(cls, code, field, match)


# Fields of the chunk stream itself, which messages describe in words rather than by name.
_STREAM_FIELDS = ("offset", "crc32", "header", "data", "last")


class _Expect:
    def __init__(self, cls: type[GdfedError], code: grpc.StatusCode, field: str | None, match: str | None):
        self.cls, self.code, self.field, self.match = cls, code, field, match
        self.value: GdfedError | None = None

    def __enter__(self) -> _Expect:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: object) -> bool:
        assert value is not None, f"expected {self.cls.__name__}, nothing was raised"
        assert type(value) is self.cls, f"expected {self.cls.__name__}, got {type(value).__name__}: {value}"
        assert isinstance(value, GdfedError)
        assert value.code == self.code
        if self.field is not None:
            assert value.field == self.field, value.field
            if not self.field.startswith(_STREAM_FIELDS):
                # A header field: the message names it, so an operator knows what to fix.
                assert self.field.split(".")[0] in value.message, value.message
        if self.match is not None:
            assert self.match in value.message, value.message
        self.value = value
        return True


INVALID = grpc.StatusCode.INVALID_ARGUMENT
DATA_LOSS = grpc.StatusCode.DATA_LOSS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
ABORTED = grpc.StatusCode.ABORTED


def test_reference_payload_decodes(ref):
    """The untampered fixtures decode; every failure below is the tampering's doing."""
    layout, payload = ref
    assert_bit_exact(decode_bytes(layout, payload, chunk_bytes=1024), reference_delta())
    assert_bit_exact(decode_file(io.BytesIO(payload), layout), reference_delta())
    assert_bit_exact(decode_bytes(*_small()), small_delta())
    assert [c.shard for c in chunks(layout, payload, 4096) if c.shard] == list(layout.shards)


# --- the chunk stream ----------------------------------------------------------------------------


def test_truncated_stream(ref):
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    decoder = DeltaStreamDecoder()
    for chunk in stream[:-1]:
        decoder.feed(chunk)
    with expect(TruncatedStream, ABORTED, field="offset") as err:
        decoder.finish()
    assert str(stream[-1].offset) in err.value.message  # where to resume
    decoder.close()
    with expect(TruncatedStream, ABORTED):
        decode_chunks(stream[:-1])
    # Stopped at a shard boundary, with every shard received so far complete.
    boundary = layout.shards[0].compressed_bytes
    with expect(TruncatedStream, ABORTED):
        decode_chunks(chunks(layout, payload, boundary)[:1])


def test_stream_with_no_chunks():
    with expect(TruncatedStream, ABORTED, field="header"):
        decode_chunks([])
    with expect(TruncatedStream, ABORTED, field="header"):
        DeltaStreamDecoder().finish()


def test_first_chunk_without_header(ref):
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    headless = dataclasses.replace(stream[0], header=None)
    with expect(ChunkOrderError, INVALID, field="header"):
        DeltaStreamDecoder().feed(headless)
    with expect(ChunkOrderError, INVALID, field="header"):
        DeltaStreamDecoder().feed(stream[1])
    with expect(ChunkOrderError, INVALID, field="header"):
        decode_chunks([headless, *stream[1:]])
    with expect(ChunkOrderError, INVALID, field="header"):
        decode_chunks(stream[1:])


def _reorder(stream: list[Chunk], how: str) -> list[Chunk]:
    if how == "swapped":
        return [stream[0], stream[2], stream[1], *stream[3:]]
    if how == "duplicated":
        return [stream[0], stream[1], stream[1], *stream[2:]]
    if how == "gap":
        return [stream[0], stream[1], *stream[3:]]
    if how == "first-again":
        return [stream[0], stream[1], stream[0], *stream[2:]]
    if how == "reversed":
        return [stream[0], *reversed(stream[1:])]
    raise ValueError(how)


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("swapped", "gap"),
        ("duplicated", "repeats"),
        ("gap", "gap"),
        ("first-again", "repeats"),
        ("reversed", "gap"),
    ],
)
def test_chunks_out_of_order(ref, how, words):
    layout, payload = ref
    with expect(ChunkOrderError, INVALID, field="offset", match=words):
        decode_chunks(_reorder(chunks(layout, payload, 4096), how))


def test_later_chunk_with_a_different_header(ref):
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    assert stream[0].header is not None
    other = dataclasses.replace(stream[0].header, round=99)
    with expect(ChunkOrderError, INVALID, field="header"):
        decode_chunks([stream[0], dataclasses.replace(stream[1], header=other), *stream[2:]])
    # The same header again (a resumed stream's first chunk) is not an error.
    again = [stream[0], dataclasses.replace(stream[1], header=stream[0].header), *stream[2:]]
    assert_bit_exact(decode_chunks(again)[1], reference_delta())


def test_data_after_the_last_chunk(ref):
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    with expect(ChunkOrderError, INVALID, field="offset", match="after the last"):
        decode_chunks([*stream, make_chunk(layout.total_bytes, b"x", True)])
    with expect(ChunkOrderError, INVALID, field="offset"):
        decode_chunks([*stream, make_chunk(layout.total_bytes, b"", False)])


def test_last_flag_on_a_chunk_that_does_not_end_the_payload(ref):
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    with expect(ChunkOrderError, INVALID, field="last"):
        decode_chunks([stream[0], dataclasses.replace(stream[1], last=True), *stream[2:]])
    with expect(ChunkOrderError, INVALID, field="last"):
        decode_chunks([dataclasses.replace(stream[0], last=True), *stream[1:]])


def test_chunk_running_past_its_shard(ref):
    """A chunk carrying a spec must end where the spec says its shard ends."""
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    last = stream[-1]
    longer = make_chunk(last.offset, bytes(last.data) + b"\0", True, shard=last.shard)
    with expect(MalformedShard, INVALID, field="shards[1].compressed_bytes", match="ends exactly"):
        decode_chunks([*stream[:-1], longer])
    shorter = make_chunk(last.offset, last.data[:-1], True, shard=last.shard)
    with expect(MalformedShard, INVALID, field="shards[1].compressed_bytes"):
        decode_chunks([*stream[:-1], shorter])


def test_chunk_running_past_the_payload(ref):
    """Once the shards cover the manifest, not one byte more: the end of the payload is known."""
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    more = [dataclasses.replace(stream[-1], last=False), make_chunk(layout.total_bytes, b"x", True)]
    with expect(InvalidArgument, INVALID, field="data", match="past the end of the payload"):
        decode_chunks([*stream[:-1], *more])


def test_spec_on_a_chunk_inside_its_shard(ref):
    """The spec rides on a chunk before the shard's end: it does not end there."""
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    first_end = next(i for i, c in enumerate(stream) if c.shard is not None)
    early = dataclasses.replace(stream[first_end - 1], shard=stream[first_end].shard)
    with expect(MalformedShard, INVALID, field="shards[0].compressed_bytes", match="ends exactly"):
        decode_chunks([*stream[: first_end - 1], early, *stream[first_end:]])


def test_spec_never_sent(ref):
    """A shard's bytes without its spec: the next spec miscounts its shard, or the last chunk ends none."""
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    ends = [i for i, c in enumerate(stream) if c.shard is not None]
    assert len(ends) == 2
    no_first = [dataclasses.replace(c, shard=None) if i == ends[0] else c for i, c in enumerate(stream)]
    with expect(MalformedShard, INVALID, field="shards[0].pieces[0]", match="starts at element 25000"):
        decode_chunks(no_first)  # shard 1's spec, taken for shard 0's: its pieces do not start the manifest
    late = [*no_first[: ends[1]], dataclasses.replace(no_first[ends[1]], shard=layout.shards[0])]
    with expect(MalformedShard, INVALID, field="shards[0].compressed_bytes", match="ends exactly"):
        decode_chunks(late)  # shard 0's spec, one shard late
    no_last = [*stream[:-1], dataclasses.replace(stream[-1], shard=None)]
    with expect(ChunkOrderError, INVALID, field="last", match="whose spec never came"):
        decode_chunks(no_last)


def test_last_chunk_with_shards_missing(ref):
    """The stream ends (``last``) after shard 0: the manifest is not covered."""
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    end = next(i for i, c in enumerate(stream) if c.shard is not None)
    cut = [*stream[:end], dataclasses.replace(stream[end], last=True)]
    with expect(
        MalformedShard, INVALID, field="manifest[0]", match=f"cover 25000 of 30000 elements of {Q!r}"
    ):
        decode_chunks(cut)


def test_bytes_of_an_unfinished_shard_are_bounded(ref):
    """Chunks that never bring a spec: refused once they pass what a shard may hold, never buffered further.

    The bound is what is left of the manifest (its data and headers), and the shard raw-size limit.
    """
    layout, _ = ref
    junk = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    for limits, bound in (
        (DecodeLimits(), frame_bound(121_346 + header_bound(5, 512))),
        (DecodeLimits(max_shard_raw_bytes=50_000), frame_bound(50_000)),
    ):
        decoder = DeltaStreamDecoder(limits=limits)
        offset = 0
        with expect(LimitExceeded, EXHAUSTED, field="data", match="with no spec yet") as err:
            for i in range(100):
                decoder.feed(make_chunk(offset, junk, False, header(layout) if i == 0 else None))
                offset += len(junk)
        decoder.close()
        assert err.value.limit == bound
        assert offset <= bound < offset + len(junk)


def test_max_total_bytes_refuses_the_chunk_that_passes_it(ref):
    """No total travels: the limit refuses the first chunk that runs past it (a stored layout, up front)."""
    layout, payload = ref
    tight = DecodeLimits(max_total_bytes=layout.total_bytes - 1)
    with expect(LimitExceeded, EXHAUSTED, field="data") as err:
        decode_bytes(layout, payload, chunk_bytes=4096, limits=tight)
    assert err.value.limit == layout.total_bytes - 1
    assert str(layout.total_bytes - 1) in err.value.message
    with expect(LimitExceeded, EXHAUSTED, field="total_bytes"):
        decode_file(NoPayload(), layout, limits=tight)
    exact = DecodeLimits(max_total_bytes=layout.total_bytes)
    assert_bit_exact(decode_bytes(layout, payload, limits=exact), reference_delta())
    assert_bit_exact(decode_file(io.BytesIO(payload), layout, limits=exact), reference_delta())


def test_chunk_larger_than_max_chunk_bytes(ref):
    layout, payload = ref
    with expect(LimitExceeded, EXHAUSTED, field="data") as err:
        decode_chunks(chunks(layout, payload, 4096), limits=DecodeLimits(max_chunk_bytes=4095))
    assert err.value.limit == 4095
    # The default limit is gRPC's 1 MiB; one byte more is refused before anything else is looked at.
    oversized = make_chunk(0, bytes(MIB + 1), False, header(layout))
    with expect(LimitExceeded, EXHAUSTED, field="data") as err:
        DeltaStreamDecoder().feed(oversized)
    assert err.value.limit == MIB


def test_flipped_byte_with_the_crc_left_as_is(ref):
    layout, payload = ref
    stream = chunks(layout, payload, 4096)
    damaged = dataclasses.replace(stream[3], data=flip(bytes(stream[3].data), 100))
    with expect(DataLoss, DATA_LOSS, field="crc32"):
        decode_chunks([*stream[:3], damaged, *stream[4:]])
    wrong_crc = dataclasses.replace(stream[0], crc32=stream[0].crc32 ^ 1)
    with expect(DataLoss, DATA_LOSS, field="crc32"):
        decode_chunks([wrong_crc, *stream[1:]])


# --- damaged payload bytes behind a valid CRC ---------------------------------------------------


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_is_data_loss(mask):
    """Flip each byte of a small payload in turn (frame headers, zstd headers, data): always DATA_LOSS."""
    layout, payload = _small()
    for offset in range(len(payload)):
        damaged = flip(payload, offset, mask)
        with expect(DataLoss, DATA_LOSS, match="digest"):
            decode_both(layout, damaged)


def _interesting_offsets(layout: PayloadLayout, payload: bytes) -> list[int]:
    """The zstd frame header (and first block header) of every frame, its last byte, and random bytes."""
    offsets: set[int] = set()
    for shard, starts in zip(layout.shards, frame_offsets(layout), strict=True):
        for start, size in zip(starts, shard.frame_bytes, strict=True):
            offsets.update(range(start, start + min(size, 16)))
            offsets.add(start + size - 1)
    rng = np.random.default_rng(1)
    offsets.update(int(x) for x in rng.integers(0, len(payload), 40))
    return sorted(offsets)


def test_flipped_byte_with_recomputed_crc_is_data_loss(ref):
    """An attacker recomputing the chunk CRCs still cannot get damaged bytes past the shard digest."""
    layout, payload = ref
    offsets = _interesting_offsets(layout, payload)
    assert len(offsets) > 100
    for offset in offsets:
        with expect(DataLoss, DATA_LOSS, match="digest") as err:
            decode_both(layout, flip(payload, offset))
        assert err.value.field in ("shards[0].digest", "shards[1].digest")


def test_flip_in_header_frame_and_zstd_headers_names_the_shard(ref):
    layout, payload = ref
    starts = frame_offsets(layout)
    cases = {
        starts[0][0] + 20: "shards[0].digest",  # inside frame 0's compressed JSON
        starts[1][0] + 2: "shards[1].digest",  # frame 0's zstd magic number
        starts[1][0] + 5: "shards[1].digest",  # frame 0's declared content size
        starts[0][1] + 4: "shards[0].digest",  # a block frame's frame header descriptor
        starts[0][2] + 6: "shards[0].digest",  # ... its content size
        starts[1][5] + 7: "shards[1].digest",  # the last frame
    }
    for offset, field in cases.items():
        with expect(DataLoss, DATA_LOSS, field=field):
            decode_both(layout, flip(payload, offset))


def test_wrong_stored_payload_digest(ref):
    """The payload digest does not travel; a stored layout's is checked before its payload is read."""
    layout, payload = ref
    lying = dataclasses.replace(layout, digest=flip(layout.digest, 0))
    with expect(DataLoss, DATA_LOSS, field="digest"):
        decode_file(NoPayload(), lying)
    with expect(InvalidArgument, INVALID, field="digest"):
        decode_file(NoPayload(), dataclasses.replace(layout, digest=layout.digest[:31]))
    # A receiver of the stream computes it over the specs that came.
    decoder = DeltaStreamDecoder()
    for chunk in chunks(lying, payload, 4096):
        decoder.feed(chunk)
    decoder.finish()
    assert decoder.layout == layout


@pytest.mark.parametrize("shard", [0, 1])
def test_wrong_shard_digest(ref, shard):
    layout, payload = ref
    lying = resign(replace_shard(layout, shard, digest=flip(layout.shards[shard].digest, 31)))
    with expect(DataLoss, DATA_LOSS, field=f"shards[{shard}].digest"):
        decode_both(lying, payload)
    # Without the payload digest recomputed, a stored layout is refused before its payload.
    unsigned = replace_shard(layout, shard, digest=flip(layout.shards[shard].digest, 31))
    with expect(DataLoss, DATA_LOSS, field="digest"):
        decode_file(NoPayload(), unsigned)
    short = resign(replace_shard(layout, shard, digest=b"\0" * 16))
    with expect(InvalidArgument, INVALID, field=f"shards[{shard}].digest"):
        refused_at_spec(short, payload)


def test_digest_algorithm_named_by_the_codec(ref):
    """The same frames under the other algorithm's name fail every shard's digest; unspecified is refused."""
    layout, payload = ref
    other = Digest.SHA256 if layout.codec.digest is Digest.BLAKE3 else Digest.BLAKE3
    renamed = dataclasses.replace(layout, codec=dataclasses.replace(layout.codec, digest=other))
    with expect(DataLoss, DATA_LOSS, field="shards[0].digest", match=other.name.lower()):
        decode_bytes(renamed, payload)
    sha = Codec(block_bytes=64 * 1024, digest=Digest.SHA256)
    sha_layout, sha_payload = encode_bytes(reference_delta(), sha, shard_bytes=100_000)
    assert sha_payload == payload and sha_layout.shards[0].digest != layout.shards[0].digest
    assert_bit_exact(decode_bytes(sha_layout, sha_payload), reference_delta())
    unspecified = dataclasses.replace(
        layout, codec=dataclasses.replace(layout.codec, digest=Digest.UNSPECIFIED)
    )
    with expect(InvalidArgument, INVALID, field="codec.digest"):
        refused_before_payload(unspecified, payload)


def test_frames_swapped_between_shards_is_data_loss(ref):
    """Whole frames moved around (sizes permitting) are caught by the digests too."""
    layout, payload = ref
    frames = split_frames(layout, payload)
    frames[1][2], frames[1][3] = frames[1][3], frames[1][2]
    with expect(DataLoss, DATA_LOSS, field="shards[1].digest"):
        decode_both(layout, b"".join(b"".join(f) for f in frames))


# --- a header lying about sizes ------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1, -1, 1 << 20])
def test_stored_total_bytes_wrong(ref, delta):
    """total_bytes no longer travels; a stored layout's is checked before its payload is read."""
    layout, _ = ref
    lying = dataclasses.replace(layout, total_bytes=layout.total_bytes + delta)
    with expect(InvalidArgument, INVALID, field="total_bytes"):
        decode_file(NoPayload(), lying)


def test_stored_total_bytes_over_the_limit(ref):
    layout, _ = ref
    lying = dataclasses.replace(layout, total_bytes=1 << 62)
    with expect(LimitExceeded, EXHAUSTED, field="total_bytes"):
        decode_file(NoPayload(), lying)


@pytest.mark.parametrize("delta", [1, -1])
def test_compressed_bytes_wrong(ref, delta):
    """A spec claiming bytes not sent (or fewer than sent), on the chunk that really ends its shard."""
    layout, payload = ref
    lying = replace_shard(layout, 1, compressed_bytes=layout.shards[1].compressed_bytes + delta)
    with expect(MalformedShard, INVALID, field="shards[1].compressed_bytes"):
        refused_at_spec(lying, payload)
    # Its frame sizes made to agree: the spec is sound, the chunk it rides on ends elsewhere.
    sizes = layout.shards[1].frame_bytes
    agreeing = replace_shard(
        layout,
        1,
        compressed_bytes=layout.shards[1].compressed_bytes + delta,
        frame_bytes=(*sizes[:-1], sizes[-1] + delta),
    )
    with expect(MalformedShard, INVALID, field="shards[1].compressed_bytes", match="ends exactly"):
        decode_chunks(chunks(agreeing, payload, 1024, cut=layout))


@pytest.mark.parametrize("delta", [1, -1, 8])
def test_raw_bytes_slightly_wrong(ref, delta):
    """A plausible raw size passes the header checks; frame 0's declared size then disagrees."""
    layout, payload = ref
    lying = replace_shard(layout, 0, raw_bytes=layout.shards[0].raw_bytes + delta)
    validate_layout(lying)
    with expect(MalformedShard, INVALID, field="shards[0].frame[0]", match="declares"):
        decode_both(lying, payload)


@pytest.mark.parametrize("raw_bytes", [0, 100_000 + 8, 100_000 + 1_000_000, 1 << 40])
def test_raw_bytes_impossible(ref, raw_bytes):
    """Too small to leave room for a header (<= 8 bytes), or a header larger than its entries allow."""
    layout, payload = ref
    lying = replace_shard(layout, 0, raw_bytes=raw_bytes)
    with expect(MalformedShard, INVALID, field="shards[0].raw_bytes"):
        refused_at_spec(lying, payload, limits=DecodeLimits(max_shard_raw_bytes=1 << 41))


def test_raw_bytes_over_the_limit(ref):
    layout, payload = ref
    lying = replace_shard(layout, 0, raw_bytes=300 * MIB)
    with expect(LimitExceeded, EXHAUSTED, field="shards[0].raw_bytes"):
        refused_at_spec(lying, payload)


def test_compressed_bytes_beyond_the_frame_bound_of_raw_bytes(ref):
    """What a receiver buffers before a spec is bounded by frame_bound(raw): a spec may not claim more."""
    layout, payload = ref
    shard = layout.shards[1]
    # The last three frames (8, 10 and 128 bytes decoded) 1000 bytes larger: each within its own bound.
    sizes = (*shard.frame_bytes[:3], *(size + 1000 for size in shard.frame_bytes[3:]))
    lying = replace_shard(layout, 1, frame_bytes=sizes, compressed_bytes=sum(sizes))
    assert sum(sizes) > frame_bound(shard.raw_bytes)
    with expect(MalformedShard, INVALID, field="shards[1].compressed_bytes", match="at most"):
        refused_at_spec(lying, payload)


def _with_frame_bytes(layout: PayloadLayout, shard: int, frame_bytes: tuple[int, ...]) -> PayloadLayout:
    changed = replace_shard(layout, shard, frame_bytes=frame_bytes, compressed_bytes=sum(frame_bytes))
    return dataclasses.replace(changed, total_bytes=sum(s.compressed_bytes for s in changed.shards))


def test_frame_bytes_missing_or_extra(ref):
    layout, payload = ref
    sizes = layout.shards[1].frame_bytes
    for lying in (sizes[:-1], (*sizes, 10), (*sizes[:2], sizes[2] + sizes[3], *sizes[4:])):
        with expect(MalformedShard, INVALID, field="shards[1].frame_bytes"):
            refused_at_spec(_with_frame_bytes(layout, 1, lying), payload)


@pytest.mark.parametrize(("frame", "size"), [(1, 0), (0, 5000), (2, 70_000)])
def test_frame_bytes_out_of_bounds(ref, frame, size):
    """A frame of 0 bytes, or larger than zstd's bound for its decoded size."""
    layout, payload = ref
    sizes = list(layout.shards[0].frame_bytes)
    sizes[frame] = size
    with expect(MalformedShard, INVALID, field=f"shards[0].frame_bytes[{frame}]"):
        refused_at_spec(_with_frame_bytes(layout, 0, tuple(sizes)), payload)


def test_frame_bytes_shifted(ref):
    """Frame boundaries moved by one byte, sum unchanged."""
    layout, payload = ref
    a, b, c = layout.shards[0].frame_bytes
    shifted = replace_shard(layout, 0, frame_bytes=(a + 1, b - 1, c))
    validate_layout(resign(shifted))
    # The sender's digests no longer match the frames as cut: damaged.
    with expect(DataLoss, DATA_LOSS, field="shards[0].digest"):
        decode_both(shifted, payload)
    # An attacker re-signing the frames as cut: the frames themselves are malformed.
    frames = split_frames(shifted, payload)
    with expect(MalformedShard, INVALID):
        decode_both(*rebuild(shifted, frames))


def _with_pieces(layout: PayloadLayout, shard: int, pieces: Iterable[Piece]) -> PayloadLayout:
    return replace_shard(layout, shard, pieces=tuple(pieces))


PIECE_CASES: dict[str, Callable[[tuple[Piece, ...]], list[Piece]]] = {
    # shard 1's pieces: q_proj [25000, 30000), bias, step, mask, norm
    "overlap": lambda p: [Piece(0, 24_999, 5000), *p[1:]],
    "gap": lambda p: [Piece(0, 25_001, 4999), *p[1:]],
    "past-the-end": lambda p: [Piece(0, 25_000, 5001), *p[1:]],
    "short": lambda p: [Piece(0, 25_000, 4999), *p[1:]],
    "missing": lambda p: list(p[1:]),
    "tensor-out-of-range": lambda p: [*p[:4], Piece(5, 0, 64)],
    "negative-tensor": lambda p: [*p[:4], Piece(-1, 0, 64)],
    "twice-in-a-shard": lambda p: [*p, Piece(4, 0, 64)],
    "zero-count": lambda p: [*p[:2], Piece(2, 0, 0), *p[3:]],
    "negative-count": lambda p: [*p[:2], Piece(2, 0, -1), *p[3:]],
    "empty-shard": lambda p: [],
    "huge-count": lambda p: [*p[:4], Piece(4, 0, 2**62)],
}


@pytest.mark.parametrize("case", PIECE_CASES)
def test_pieces_not_covering_the_manifest(ref, case):
    layout, payload = ref
    lying = _with_pieces(layout, 1, PIECE_CASES[case](layout.shards[1].pieces))
    with expect(MalformedShard, INVALID) as err:
        refused_at_spec(lying, payload)
    assert err.value.field.startswith(("shards[1]", "manifest["))


def test_pieces_not_covering_a_tensor_the_manifest_grew(ref):
    """The last tensor one element longer: every spec is sound, the last chunk leaves it uncovered."""
    layout, payload = ref
    manifest = list(layout.manifest)
    manifest[4] = dataclasses.replace(manifest[4], shape=(65,))
    lying = dataclasses.replace(layout, manifest=tuple(manifest))
    with expect(MalformedShard, INVALID, match="cover 64 of 65 elements of 'model.norm.weight'") as err:
        refused_at_spec(lying, payload)
    assert err.value.field == "manifest[4]"
    # A tensor in the middle: the next shard's pieces move on before it is covered.
    manifest = list(layout.manifest)
    manifest[1] = dataclasses.replace(manifest[1], shape=(301,))
    lying = dataclasses.replace(layout, manifest=tuple(manifest))
    with expect(MalformedShard, INVALID, field="shards[1].pieces[2]", match="element 300 of tensor 1"):
        refused_at_spec(lying, payload)


def test_pieces_reordered_within_a_shard(ref):
    """Pieces (and their frames) out of the manifest's order: refused at the spec, whatever else adds up."""
    layout, payload = ref
    p = layout.shards[1].pieces
    frames = split_frames(layout, payload)
    frames[1][2], frames[1][3] = frames[1][3], frames[1][2]
    lying, tampered = rebuild(_with_pieces(layout, 1, [p[0], p[2], p[1], *p[3:]]), frames)
    with expect(MalformedShard, INVALID, field="shards[1].pieces[1]", match="in its order"):
        refused_at_spec(lying, tampered)
    with expect(MalformedShard, INVALID, field="shards[1].pieces[1]"):
        refused_at_spec(resign(_with_pieces(layout, 1, [p[0], p[2], p[1], *p[3:]])), payload)


@pytest.mark.parametrize("block_bytes", [0, 1000, 64 * 1024 + 4, 32 * MIB])
def test_codec_block_bytes_out_of_range(ref, block_bytes):
    layout, payload = ref
    lying = dataclasses.replace(layout, codec=dataclasses.replace(layout.codec, block_bytes=block_bytes))
    with expect(InvalidArgument, INVALID, field="codec.block_bytes"):
        refused_before_payload(lying, payload)


def test_codec_block_bytes_differs_from_the_frames(ref):
    """A valid but different block size makes the frame list disagree with the pieces."""
    layout, payload = ref
    lying = dataclasses.replace(layout, codec=dataclasses.replace(layout.codec, block_bytes=128 * 1024))
    with expect(MalformedShard, INVALID, field="shards[0].frame_bytes"):
        refused_at_spec(lying, payload)


def test_codec_byte_shuffle_flag_flipped(ref):
    """Claiming no shuffle on shuffled frames: every size and digest still holds, only the values can tell.

    Read unshuffled, the planes of Gaussian floats put sign/exponent bytes into
    mantissas and vice versa; here that yields NaN/inf, refused as such.
    """
    layout, payload = ref
    lying = dataclasses.replace(layout, codec=dataclasses.replace(layout.codec, byte_shuffle=False))
    validate_layout(lying)
    with expect(NonFiniteValues, INVALID, field=Q):
        decode_both(lying, payload)


# --- the manifest --------------------------------------------------------------------------------


def _with_manifest(layout: PayloadLayout, index: int, **changes: Any) -> PayloadLayout:
    manifest = list(layout.manifest)
    manifest[index] = dataclasses.replace(manifest[index], **changes)
    return dataclasses.replace(layout, manifest=tuple(manifest))


@pytest.mark.parametrize(
    ("changes", "cls", "field"),
    [
        ({"name": ""}, InvalidArgument, "manifest[2].name"),
        ({"name": "mask"}, InvalidArgument, "manifest[3].name"),  # repeated: refused at its second use
        ({"name": "__metadata__"}, InvalidArgument, "manifest[2].name"),
        ({"name": "x" * 513}, InvalidArgument, "manifest[2].name"),
        ({"name": "é" * 257}, InvalidArgument, "manifest[2].name"),  # 514 bytes of UTF-8
        ({"shape": (1,) * 9}, LimitExceeded, "manifest[2].shape"),
        ({"shape": (-1,)}, LimitExceeded, "manifest[2].shape"),
        ({"shape": (-1, -1)}, LimitExceeded, "manifest[2].shape"),
        ({"shape": (2**62,)}, LimitExceeded, "manifest[2].shape"),
        ({"shape": (2**20, 2**20, 2**20)}, LimitExceeded, "manifest[2].shape"),
    ],
)
def test_manifest_refused(ref, changes, cls, field):
    layout, payload = ref
    with expect(cls, cls.code, field=field):
        refused_before_payload(_with_manifest(layout, 2, **changes), payload)


def test_manifest_decoding_to_too_many_bytes(ref):
    """A few huge tensors, each under the element limit, together over the decoded-size limit."""
    layout, payload = ref
    lying = dataclasses.replace(
        layout, manifest=tuple(TensorSpec(f"t{i}", DType.F64, (2**36,)) for i in range(2))
    )
    with expect(LimitExceeded, EXHAUSTED, field="manifest"):
        refused_before_payload(lying, payload)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda m: [*m[:1], dataclasses.replace(m[1], shape=(3, 100)), *m[2:]],
            "'model.layers.0.q_proj.bias'",
        ),
        (lambda m: [*m[:3], dataclasses.replace(m[3], dtype=DType.U8), *m[4:]], "'mask'"),
        (
            lambda m: [*m[:4], dataclasses.replace(m[4], name="model.final_norm.weight")],
            "'model.final_norm.weight'",
        ),
        (lambda m: [*m, TensorSpec("lm_head.weight", DType.F32, (10,))], "'lm_head.weight'"),
        (lambda m: m[:-1], "'model.norm.weight'"),
    ],
    ids=["shape", "dtype", "renamed", "missing", "extra"],
)
def test_manifest_mismatch(ref, change, named):
    layout, payload = ref
    expected = change(list(layout.manifest))
    with expect(ManifestMismatch, INVALID, field="manifest", match=named):
        refused_before_payload(layout, payload, expected=expected)


def test_expected_manifest_accepted_in_any_order(ref):
    layout, payload = ref
    assert_bit_exact(decode_bytes(layout, payload, expected=layout.manifest), reference_delta())
    shuffled = list(reversed(layout.manifest))
    assert_bit_exact(decode_bytes(layout, payload, expected=shuffled), reference_delta())


# --- limits --------------------------------------------------------------------------------------


# max_total_bytes: no total travels, see test_max_total_bytes_refuses_the_chunk_that_passes_it.
LIMIT_CASES: list[tuple[str, Callable[[PayloadLayout], int], type[GdfedError], str]] = [
    ("max_tensors", lambda lay: 5, LimitExceeded, "manifest"),
    ("max_shard_raw_bytes", lambda lay: lay.shards[0].raw_bytes, LimitExceeded, "shards[0].raw_bytes"),
    ("max_dims", lambda lay: 2, LimitExceeded, "manifest[0].shape"),
    ("max_name_bytes", lambda lay: len(Q), InvalidArgument, "manifest[0].name"),
    ("max_tensor_elements", lambda lay: 30_000, LimitExceeded, "manifest[0].shape"),
    ("max_decoded_bytes", lambda lay: 121_346, LimitExceeded, "manifest"),
]


@pytest.mark.parametrize(("limit", "needed_by", "cls", "field"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_limit_exceeded_before_any_payload(ref, limit, needed_by, cls, field):
    """One under what the delta needs: refused from the header alone (a shard's limit: from its spec, before
    the shard is decoded). Exactly what it needs: decoded."""
    layout, payload = ref
    needed = needed_by(layout)
    refuse = refused_at_spec if field.startswith("shards") else refused_before_payload
    with expect(cls, cls.code, field=field) as err:
        refuse(layout, payload, limits=DecodeLimits(**{limit: needed - 1}))
    assert err.value.limit == needed - 1
    assert str(needed - 1) in err.value.message
    tight = DecodeLimits(**{limit: needed})
    assert_bit_exact(decode_bytes(layout, payload, limits=tight), reference_delta())
    assert_bit_exact(decode_file(io.BytesIO(payload), layout, limits=tight), reference_delta())


def test_huge_claimed_tensor_is_refused_without_allocating(ref):
    """A 128 GiB tensor under every default count limit: refused at its shard's spec, before any allocation.

    (decode_chunks allocates a tensor only once a shard spec covering it passed its checks.)
    """
    layout, payload = ref
    manifest = (TensorSpec("huge", DType.F32, (2**35,)),)
    shard = dataclasses.replace(layout.shards[0], pieces=(Piece(0, 0, 2**35),))
    lying = resign(
        dataclasses.replace(layout, manifest=manifest, shards=(shard,), total_bytes=shard.compressed_bytes)
    )
    tracemalloc.start()
    try:
        with expect(MalformedShard, INVALID, field="shards[0].raw_bytes"):
            refused_at_spec(lying, payload, honest=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The raw size is compared before the claimed piece's 2M block sizes are listed.
    assert peak < 96 * MIB


# --- zstd bombs and frames without a size --------------------------------------------------------


def _peak_while(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _raises(cls: type[BaseException], fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with pytest.raises(cls):
            fn()

    return run


def test_tracemalloc_sees_a_decompressed_bomb():
    """The measurement below can fail: decompressing a 64 MiB bomb does show up in the peak."""
    bomb = zstd(bytes(64 * MIB))
    assert len(bomb) < 4096
    assert _peak_while(lambda: zstandard.ZstdDecompressor().decompress(bomb)) >= 64 * MIB


def _swap_frame(layout: PayloadLayout, payload: bytes, shard: int, frame: int, new: bytes):
    frames = split_frames(layout, payload)
    frames[shard][frame] = new
    return rebuild(layout, frames)


@pytest.mark.parametrize(("shard", "frame"), [(0, 1), (0, 2), (1, 1)])
def test_zstd_bomb_is_refused_unexpanded(ref, shard, frame):
    """A block frame that expands to 64 MiB, with every size and digest fixed up: refused by its declared size."""
    layout, payload = ref
    bomb = zstd(bytes(64 * MIB))
    lying, tampered = _swap_frame(layout, payload, shard, frame, bomb)
    validate_layout(lying)  # sizes and digests are consistent: only the frame's own size can tell
    with expect(MalformedShard, INVALID, field=f"shards[{shard}].frame[{frame}]", match=str(64 * MIB)):
        decode_both(lying, tampered)
    peak = _peak_while(_raises(MalformedShard, lambda: decode_both(lying, tampered)))
    assert peak < 8 * MIB


def test_zstd_bomb_in_the_header_frame(ref):
    layout, payload = ref
    bomb = zstd(bytes(8 * MIB))
    lying, tampered = _swap_frame(layout, payload, 1, 0, bomb)
    validate_layout(lying)
    peak = _peak_while(_raises(MalformedShard, lambda: decode_both(lying, tampered)))
    assert peak < 4 * MIB


def set_content_size(frame: bytes, size: int) -> bytes:
    """``frame`` with the content size in its zstd frame header overwritten (same field width)."""
    descriptor = frame[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    assert width, "the frame declares no content size"
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    stored = size - 256 if width == 2 else size
    patched = frame[:at] + stored.to_bytes(width, "little") + frame[at + width :]
    assert zstandard.frame_content_size(patched) == size
    return patched


def test_zstd_bomb_lying_about_its_size(ref):
    """A 64 MiB frame that declares exactly the block's size: decompression stops at that size."""
    layout, payload = ref
    size = expected_frame_sizes(layout.shards[0], layout)[1]
    bomb = set_content_size(zstd(bytes(64 * MIB)), size)
    lying, tampered = _swap_frame(layout, payload, 0, 1, bomb)
    validate_layout(lying)
    with expect(MalformedShard, INVALID, field="shards[0].frame[1]", match="corrupt"):
        decode_both(lying, tampered)
    peak = _peak_while(_raises(MalformedShard, lambda: decode_both(lying, tampered)))
    assert peak < 8 * MIB


@pytest.mark.parametrize("missing", [1, 4, 600])
def test_frame_shorter_than_declared(ref, missing):
    """A frame declaring the right size but holding fewer bytes: zstd's own check refuses it."""
    layout, payload = ref
    frames = split_frames(layout, payload)
    size = expected_frame_sizes(layout.shards[1], layout)[2]
    short = set_content_size(zstd(unzstd(frames[1][2])[:-missing]), size)
    lying, tampered = _swap_frame(layout, payload, 1, 2, short)
    with expect(MalformedShard, INVALID, field="shards[1].frame[2]"):
        decode_both(lying, tampered)


@pytest.mark.parametrize(("shard", "frame"), [(0, 0), (0, 1), (1, 0), (1, 4)])
def test_frame_without_content_size(ref, shard, frame):
    """The same bytes, in a frame that does not declare its size up front: refused, not streamed."""
    layout, payload = ref
    frames = split_frames(layout, payload)
    unsized = zstd(unzstd(frames[shard][frame]), write_content_size=False)
    assert zstandard.frame_content_size(unsized) == -1
    lying, tampered = _swap_frame(layout, payload, shard, frame, unsized)
    with expect(MalformedShard, INVALID, field=f"shards[{shard}].frame[{frame}]", match="-1"):
        decode_both(lying, tampered)


def test_frame_that_is_not_zstd(ref):
    layout, payload = ref
    frames = split_frames(layout, payload)
    lying, tampered = _swap_frame(layout, payload, 1, 3, bytes(len(frames[1][3])))
    with expect(MalformedShard, INVALID, field="shards[1].frame[3]"):
        decode_both(lying, tampered)


# --- the safetensors header in frame 0 -----------------------------------------------------------


def _entries(ref: tuple[PayloadLayout, bytes]) -> dict[str, Any]:
    return shard_header_json(*ref, 1)


def _edit(ref: tuple[PayloadLayout, bytes], edit: Callable[[dict[str, Any]], object]) -> bytes:
    entries = _entries(ref)
    edit(entries)
    return safetensors_header(entries)


def _set(name: str, key: str, value: object) -> Callable[[dict[str, Any]], object]:
    return lambda e: e[name].__setitem__(key, value)


def _with_length(ref: tuple[PayloadLayout, bytes], wrong_by: int) -> bytes:
    good = safetensors_header(_entries(ref))
    return safetensors_header(_entries(ref), length=len(good) - 8 + wrong_by)


B = "model.layers.0.q_proj.bias"


def _huge_integer(ref: tuple[PayloadLayout, bytes]) -> bytes:
    """An offset of 5000 digits: more than Python's int parser takes (4300) by default."""
    text = json.dumps(_entries(ref), separators=(",", ":"))
    assert text.count("[20000,21200]") == 1
    return safetensors_header(text.replace("[20000,21200]", "[20000," + "9" * 5000 + "]"))


HEADER_CASES: dict[str, Callable[[tuple[PayloadLayout, bytes]], bytes]] = {
    "overlapping-offsets": lambda r: _edit(r, _set(B, "data_offsets", [19_996, 21_196])),
    "offsets-with-a-hole": lambda r: _edit(r, _set(B, "data_offsets", [20_004, 21_204])),
    "offsets-past-the-data": lambda r: _edit(r, _set("model.norm.weight", "data_offsets", [21_219, 21_347])),
    "absurd-shape": lambda r: _edit(r, _set(B, "shape", [2**62])),
    "2-d-shape": lambda r: _edit(r, _set(B, "shape", [3, 100])),
    "negative-shape": lambda r: _edit(r, _set(B, "shape", [-300])),
    "wrong-dtype": lambda r: _edit(r, _set(B, "dtype", "F16")),
    "unknown-dtype": lambda r: _edit(r, _set(B, "dtype", "F8_E4M3")),
    "float-shape": lambda r: _edit(r, _set(B, "shape", [300.0])),
    "float-offsets": lambda r: _edit(r, _set(B, "data_offsets", [20_000.0, 21_200.0])),
    "bool-shape": lambda r: _edit(r, _set("step", "shape", [True])),
    "entry-not-an-object": lambda r: _edit(r, lambda e: e.__setitem__(B, [1, 2])),
    "extra-key": lambda r: _edit(r, _set(B, "extra", 1)),
    "extra-entry": lambda r: _edit(r, lambda e: e.__setitem__("extra", dict(e[B]))),
    "missing-entry": lambda r: _edit(r, lambda e: e.pop(B)),
    "renamed-entry": lambda r: _edit(r, lambda e: e.__setitem__("other", e.pop(B))),
    "invalid-json": lambda r: safetensors_header('{"model.layers.0.q_proj.bias": {"dtype": "F32",'),
    "not-an-object": lambda r: safetensors_header("[1, 2, 3]"),
    "not-utf8": lambda r: safetensors_header(b'{"\xff\xfe": 1}'),
    "deeply-nested": lambda r: safetensors_header("[" * 5000 + "]" * 5000),
    "huge-integer": lambda r: _huge_integer(r),
    "length-too-long": lambda r: _with_length(r, 8),
    "length-too-short": lambda r: _with_length(r, -8),
    "length-one-short": lambda r: _with_length(r, -1),
    "length-absurd": lambda r: safetensors_header(_entries(r), length=2**63),
    "only-a-length": lambda r: struct.pack("<Q", 1) + b"{",
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_bad_safetensors_header(ref, case):
    """Frame 0 recrafted, recompressed, raw size and digests fixed up: the header check refuses it."""
    layout, payload = ref
    lying, tampered = with_header_frame(layout, payload, 1, HEADER_CASES[case](ref))
    validate_layout(lying)  # consistent sizes and digests: only the header check can tell
    with expect(MalformedShard, INVALID) as err:
        decode_both(lying, tampered)
    assert err.value.field.startswith("header"), err.value.field


def test_rewritten_but_equivalent_header_is_accepted(ref):
    """Spacing, key order and __metadata__ may differ: the check is entry for entry, not byte for byte."""
    layout, payload = ref
    entries = _entries(ref)
    text = json.dumps({"__metadata__": {"format": "pt"}, **dict(reversed(entries.items()))}, indent=1)
    lying, tampered = with_header_frame(layout, payload, 1, safetensors_header(text))
    assert_bit_exact(decode_bytes(lying, tampered), reference_delta())


# --- non-finite values smuggled into a frame -----------------------------------------------------


def _smuggle(layout, payload, shard, frame, values: np.ndarray, dtype: DType):
    return _swap_frame(layout, payload, shard, frame, block_frame(values, dtype, layout.codec))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_f32_in_a_block(ref, bad):
    layout, payload = ref
    frames = split_frames(layout, payload)
    values = np.frombuffer(unzstd(frames[0][2]), dtype=np.uint8)
    plain = np.empty_like(values)
    unshuffle_into(values, plain, 4)
    floats = plain.view(np.float32).copy()
    floats[-1] = bad
    with expect(NonFiniteValues, INVALID, field=Q, match=Q):
        decode_both(*_smuggle(layout, payload, 0, 2, floats, DType.F32))


@pytest.mark.parametrize("bits", [0x7FC0, 0x7F80, 0xFF80, 0x7F81])
def test_non_finite_bf16_in_a_block(ref, bits):
    layout, payload = ref
    values = np.zeros(64, dtype=np.uint16)
    values[10] = bits
    with expect(NonFiniteValues, INVALID, field="model.norm.weight"):
        decode_both(*_smuggle(layout, payload, 1, 5, values, DType.BF16))


@pytest.mark.parametrize(
    ("codec", "wire", "value"),
    [
        (Codec(cast=Cast.BF16), DType.BF16, np.uint16(0x7F80)),  # bf16 inf, upcast to f32/f64
        (Codec(cast=Cast.F16), DType.F16, np.uint16(0x7C00)),  # f16 inf
        (Codec(cast=Cast.F16, byte_shuffle=False), DType.F16, np.uint16(0xFE00)),  # f16 NaN
        (Codec(byte_shuffle=False), DType.F64, np.float64(-math.inf).view(np.uint64)),
    ],
)
def test_non_finite_after_upcast(codec, wire, value):
    """Finiteness is checked on the decoded (upcast) values, for every wire dtype."""
    delta = {"w": torch.zeros(100, dtype=torch.float64), "v": torch.zeros(5)}
    layout, payload = encode_bytes(delta, codec)
    values = np.zeros(100, dtype=value.dtype)
    values[99] = value
    with expect(NonFiniteValues, INVALID, field="w"):
        decode_both(*_smuggle(layout, payload, 0, 1, values, wire))


# --- robustness: random tampering never escapes as an untyped error ------------------------------

_INTS = st.sampled_from([0, 1, -1, 7, 8, 9, 255, 2**16, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1, -(2**63)])


@st.composite
def tampered(draw: st.DrawFn) -> tuple[PayloadLayout, bytes, dict[str, torch.Tensor] | None]:
    """A layout/payload with a few random changes, and the delta it must decode to if it decodes at all.

    None when an attacker re-signed the result: then any finite values may come out.
    """
    small = draw(st.booleans())
    layout, payload = _small() if small else _reference()
    original = small_delta() if small else reference_delta()
    frames = split_frames(layout, payload)
    shards = list(layout.shards)
    for _ in range(draw(st.integers(1, 3))):
        s = draw(st.integers(0, len(shards) - 1))
        what = draw(
            st.sampled_from(["compressed", "raw", "frame_size", "piece", "frame_bytes", "frame_swap"])
        )
        spec = shards[s]
        if what == "compressed":
            shards[s] = dataclasses.replace(spec, compressed_bytes=draw(_INTS))
        elif what == "raw":
            shards[s] = dataclasses.replace(spec, raw_bytes=spec.raw_bytes + draw(st.integers(-300, 300)))
        elif what == "frame_size":
            sizes = list(spec.frame_bytes)
            sizes[draw(st.integers(0, len(sizes) - 1))] = draw(_INTS)
            shards[s] = dataclasses.replace(spec, frame_bytes=tuple(sizes))
        elif what == "piece":
            pieces = list(spec.pieces)
            p = draw(st.integers(0, len(pieces) - 1))
            field = draw(st.sampled_from(["tensor", "start", "count"]))
            pieces[p] = dataclasses.replace(pieces[p], **{field: draw(_INTS)})
            shards[s] = dataclasses.replace(spec, pieces=tuple(pieces))
        elif what == "frame_bytes":
            f = draw(st.integers(0, len(frames[s]) - 1))
            frame = bytearray(frames[s][f])
            if frame:  # an earlier change may have emptied it
                frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
            frames[s][f] = bytes(frame)
        else:
            f = draw(st.integers(0, len(frames[s]) - 1))
            frames[s][f] = draw(
                st.sampled_from([b"", b"\x28\xb5\x2f\xfd", zstd(b"x" * 9), zstd(bytes(100_000))])
            )
    layout = dataclasses.replace(layout, shards=tuple(shards))
    if draw(st.booleans()):
        layout, payload = rebuild(layout, frames)  # an attacker: sizes and digests made consistent
        return layout, payload, None
    return resign(layout), b"".join(b"".join(f) for f in frames), original


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(case=tampered())
def test_random_tampering_is_refused_with_a_typed_error(case):
    layout, payload, original = case
    decoders: list[Callable[[], dict[str, torch.Tensor]]] = [
        lambda: decode_bytes(layout, payload, chunk_bytes=4096),
        lambda: decode_file(io.BytesIO(payload), layout),
    ]
    for decode in decoders:
        try:
            tensors = decode()
        except GdfedError as exc:
            event(f"{type(exc).__name__} {exc.field.split('.')[-1].split('[')[0]}")
            assert exc.code != grpc.StatusCode.INTERNAL
            if original is not None:
                # Without an attacker fixing the digests, damaged frame bytes are DATA_LOSS;
                # header fields may be refused by their own checks first.
                assert isinstance(exc, DataLoss | InvalidArgument | LimitExceeded)
        else:
            event("decoded")
            if original is not None:  # the changes were no-ops: the delta must be intact
                assert_bit_exact(tensors, original)
