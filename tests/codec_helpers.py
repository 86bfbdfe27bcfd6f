"""Helpers for codec tests: encode to bytes, take a payload apart, and rebuild a consistent layout after tampering.

A tampered payload is only interesting when it gets past the checks it was not
aimed at: :func:`rebuild` recomputes every size and digest the shard specs carry
(frame sizes, compressed sizes, shard and payload digests) from the frames as
given, so the only thing left wrong is the one thing a test changed on purpose.
On the wire (revision 2) the header carries the codec and manifest, and each
shard's spec travels with the chunk that ends the shard: :func:`chunks` cuts a
stream that way from a layout, whatever it claims.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import zstandard

from common.codec import decode_chunks, encode, iter_chunks, make_chunk
from common.codec.digests import digest_of_digests
from common.codec.layout import DEFAULT_LIMITS, DEFAULT_SHARD_BYTES, DecodeLimits
from common.codec.shuffle import shuffle
from common.conformance import tamper
from common.conformance.tamper import Frames  # and rebuild, unzstd: tests tamper as the vectors do
from common.conformance.tamper import rebuild as rebuild
from common.conformance.tamper import unzstd as unzstd
from common.delta import Chunk, Codec, DeltaHeader, PayloadLayout, ShardSpec, TensorSpec
from common.dtypes import DType, itemsize

# Integer types of the same width, to compare floats bit for bit.
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width (floats), or ``t`` itself: equal bits compare equal."""
    return t.view(_BITS[t.dtype]) if t.dtype in _BITS else t


def assert_bit_exact(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Same names in the same order, and each tensor with the same dtype, shape and bits."""
    assert list(got) == list(want)
    for name, tensor in want.items():
        out = got[name]
        assert out.dtype == tensor.dtype, name
        assert out.shape == tensor.shape, name
        assert torch.equal(bits(out), bits(tensor.contiguous())), name


def encode_bytes(
    tensors: Mapping[str, torch.Tensor], codec: Codec, *, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> tuple[PayloadLayout, bytes]:
    """Encode into memory: the layout and the payload bytes."""
    sink = io.BytesIO()
    layout = encode(tensors, codec, sink, shard_bytes=shard_bytes)
    payload = sink.getvalue()
    assert len(payload) == layout.total_bytes
    return layout, payload


def header(layout: PayloadLayout) -> DeltaHeader:
    return DeltaHeader(
        spec=layout.spec, run_id="run", round=1, site_id="site", upload_id="u1", sample_count=1
    )


def chunks(
    layout: PayloadLayout, payload: bytes, chunk_bytes: int = 1 << 20, *, cut: PayloadLayout | None = None
) -> list[Chunk]:
    """The chunk stream of ``payload`` as a sender would cut it, CRCs computed over the bytes as given.

    Cut at the shard ends ``cut`` (by default ``layout``) gives, each of
    ``layout``'s specs on the chunk that ends its shard, whatever the bytes: a
    payload shorter than that stops where it ends (the specs it does not reach
    are not sent), one longer sends its extra bytes after the last shard,
    without a spec; the final chunk is ``last``. So a lying sender reaches the
    receiver (``iter_chunks`` would stop at the sender); ``cut``, the honest
    layout, sends lying specs at the ends of the shards as they really are.
    """
    if cut is None and len(payload) == sum(s.compressed_bytes for s in layout.shards):
        return list(iter_chunks(header(layout), layout, io.BytesIO(payload), chunk_bytes=chunk_bytes))
    sizes = [s.compressed_bytes for s in (cut or layout).shards]
    cuts: list[tuple[int, int, ShardSpec | None]] = []  # (begin, end, spec of the shard ending at end)
    begin = 0
    for shard, size in zip(layout.shards, sizes, strict=True):
        end = begin + max(size, 0)  # a negative size (tampered) cuts an empty shard
        cuts.append((begin, min(end, len(payload)), shard if end <= len(payload) else None))
        if end >= len(payload):
            break
        begin = end
    else:
        cuts.append((begin, len(payload), None))
    out: list[Chunk] = []
    for begin, end, spec in cuts:
        offsets = range(begin, end, chunk_bytes) if end > begin else [begin]
        for offset in offsets:
            stop = min(offset + chunk_bytes, end)
            out.append(make_chunk(offset, payload[offset:stop], False, None, spec if stop == end else None))
    out[0] = dataclasses.replace(out[0], header=header(layout))
    out[-1] = dataclasses.replace(out[-1], last=True)
    return out


def decode_bytes(
    layout: PayloadLayout,
    payload: bytes,
    *,
    chunk_bytes: int = 1 << 20,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[TensorSpec] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a payload through the chunk path, as a receiver of a stream does."""
    _, tensors = decode_chunks(chunks(layout, payload, chunk_bytes), limits=limits, expected=expected)
    return tensors


def split_frames(layout: PayloadLayout, payload: bytes) -> list[Frames]:
    """The payload's zstd frames, shard by shard, as the layout's frame_bytes cut them (all of it)."""
    shards = tamper.split_frames(layout, payload)
    assert sum(len(f) for frames in shards for f in frames) == len(payload)
    return shards


def frame_offsets(layout: PayloadLayout) -> list[list[int]]:
    """Payload offset of every frame, shard by shard."""
    out: list[list[int]] = []
    offset = 0
    for shard in layout.shards:
        starts = []
        for size in shard.frame_bytes:
            starts.append(offset)
            offset += size
        out.append(starts)
    return out


def resign(layout: PayloadLayout) -> PayloadLayout:
    """The layout with its payload digest recomputed over its shards' digests."""
    algo = layout.codec.digest
    return dataclasses.replace(layout, digest=digest_of_digests(algo, [s.digest for s in layout.shards]))


def replace_shard(layout: PayloadLayout, index: int, **changes: object) -> PayloadLayout:
    """The layout with shard ``index``'s fields changed (digests left as they are)."""
    shards = list(layout.shards)
    shards[index] = dataclasses.replace(shards[index], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(layout, shards=tuple(shards))


def zstd(data: bytes, *, write_content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=write_content_size).compress(data)


def block_frame(values: np.ndarray, dtype: DType, codec: Codec) -> bytes:
    """A block frame holding ``values`` (any array of the wire dtype's width), as the encoder writes it."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1)
    data = shuffle(raw, itemsize(dtype)) if codec.byte_shuffle else raw
    return zstd(data.tobytes())


def safetensors_header(entries: Mapping[str, object] | str | bytes, *, length: int | None = None) -> bytes:
    """Header bytes of a safetensors file: the length prefix (``length`` if given) and padded JSON."""
    if isinstance(entries, bytes):
        text = entries
    elif isinstance(entries, str):
        text = entries.encode()
    else:
        text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text


def shard_header_json(layout: PayloadLayout, payload: bytes, shard: int) -> dict[str, dict[str, object]]:
    """The parsed safetensors header of a shard, as the encoder wrote it."""
    raw = unzstd(split_frames(layout, payload)[shard][0])
    entries: dict[str, dict[str, object]] = json.loads(raw[8:])
    return entries


def with_header_frame(
    layout: PayloadLayout, payload: bytes, shard: int, header_bytes: bytes
) -> tuple[PayloadLayout, bytes]:
    """Swap shard ``shard``'s frame 0 for ``header_bytes`` (compressed), fixing up raw size and digests."""
    frames = split_frames(layout, payload)
    old = len(unzstd(frames[shard][0]))
    frames[shard][0] = zstd(header_bytes)
    raw = layout.shards[shard].raw_bytes - old + len(header_bytes)
    return rebuild(layout, frames, raw_bytes={shard: raw})


def flip(payload: bytes, offset: int, mask: int = 0x01) -> bytes:
    """``payload`` with the byte at ``offset`` XORed with ``mask``."""
    out = bytearray(payload)
    out[offset] ^= mask
    return bytes(out)


def only_first(items: Iterable[Chunk]) -> Iterable[Chunk]:
    """Yield the first chunk, and fail the test if the decoder asks for a second one."""
    it = iter(items)
    yield next(it)
    raise AssertionError("the decoder read past the first chunk before rejecting the header")
