"""Take a payload apart into its zstd frames and put it back, every size and digest recomputed.

A malformed vector is only useful when it has exactly one defect: a frame
changed on purpose comes with the frame sizes, shard sizes and hash tree that
match it, so a receiver must catch it by what cannot be faked (the declared
content size, the safetensors header, the values), not by a digest.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from common.codec.blocks import new_compressor
from common.codec.digests import digest_of_digests, frame_digest
from common.codec.layout import block_sizes, wire_dtypes
from common.codec.shuffle import shuffle, unshuffle_into
from common.delta import PayloadLayout
from common.dtypes import itemsize, numpy_storage

Frames = list[bytes]


def split_frames(layout: PayloadLayout, payload: bytes) -> list[Frames]:
    """The payload's frames, shard by shard, as the layout's ``frame_bytes`` cut them."""
    shards: list[Frames] = []
    offset = 0
    for shard in layout.shards:
        frames = []
        for size in shard.frame_bytes:
            frames.append(payload[offset : offset + size])
            offset += size
        shards.append(frames)
    return shards


def rebuild(
    layout: PayloadLayout, shards: Sequence[Frames], raw_bytes: Mapping[int, int] | None = None
) -> tuple[PayloadLayout, bytes]:
    """The layout made consistent with ``shards``' frames (sizes, shard and payload digests), and the payload.

    Pieces and manifest stay; ``raw_bytes`` overrides a shard's decompressed size.
    Digests are taken with the codec's algorithm.
    """
    algo = layout.codec.digest
    specs = []
    for i, (spec, frames) in enumerate(zip(layout.shards, shards, strict=True)):
        specs.append(
            dataclasses.replace(
                spec,
                compressed_bytes=sum(len(f) for f in frames),
                raw_bytes=(raw_bytes or {}).get(i, spec.raw_bytes),
                digest=digest_of_digests(algo, [frame_digest(algo, f) for f in frames]),
                frame_bytes=tuple(len(f) for f in frames),
            )
        )
    rebuilt = dataclasses.replace(
        layout,
        shards=tuple(specs),
        total_bytes=sum(s.compressed_bytes for s in specs),
        digest=digest_of_digests(algo, [s.digest for s in specs]),
    )
    return rebuilt, b"".join(b"".join(frames) for frames in shards)


def unzstd(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(frame)


def zstd(raw: bytes, level: int, *, shuffled: bool, content_size: bool = True) -> bytes:
    """A frame as the encoder makes it (its parameters for byte planes), or one that omits its content size."""
    if not content_size:
        return zstandard.ZstdCompressor(level=level, write_content_size=False).compress(raw)
    return new_compressor(level, shuffled).compress(raw)


def frame_index(layout: PayloadLayout, shard: int, piece: int) -> int:
    """Index, within its shard, of the first frame of piece ``piece`` (frame 0 is the header)."""
    wire = wire_dtypes(layout.manifest, layout.codec)
    index = 1
    for p in layout.shards[shard].pieces[:piece]:
        index += len(block_sizes(p.count * itemsize(wire[p.tensor]), layout.codec.block_bytes))
    return index


def edit_block(
    layout: PayloadLayout,
    payload: bytes,
    shard: int,
    piece: int,
    edit: Callable[[npt.NDArray[Any]], npt.NDArray[Any] | None],
) -> tuple[PayloadLayout, bytes]:
    """Change the values of the first block of a piece (as wire-dtype elements); digests follow.

    ``edit`` receives the block's elements (unshuffled) and changes them in place,
    or returns a new array (of another length, to make a frame of the wrong size;
    the shard's ``raw_bytes`` is kept, so the layout still expects the old size).
    """
    spec = layout.shards[shard].pieces[piece]
    wire = wire_dtypes(layout.manifest, layout.codec)[spec.tensor]
    size = itemsize(wire)
    shuffled = layout.codec.byte_shuffle
    frames = split_frames(layout, payload)
    f = frame_index(layout, shard, piece)
    raw = np.frombuffer(unzstd(frames[shard][f]), dtype=np.uint8)
    plain = np.empty_like(raw)
    if shuffled:
        unshuffle_into(raw, plain, size)
    else:
        plain[:] = raw
    values = plain.view(numpy_storage(wire))
    changed = edit(values)
    out = np.ascontiguousarray(values if changed is None else changed).view(np.uint8).reshape(-1)
    data = shuffle(out, size) if shuffled else out
    frames[shard][f] = zstd(data.tobytes(), layout.codec.zstd_level, shuffled=shuffled)
    return rebuild(layout, frames)


def replace_frame(
    layout: PayloadLayout, payload: bytes, shard: int, frame: int, new: bytes, *, raw_bytes: int | None = None
) -> tuple[PayloadLayout, bytes]:
    """Swap one compressed frame for ``new``; digests follow (``raw_bytes``: the shard's new decompressed size)."""
    frames = split_frames(layout, payload)
    frames[shard][frame] = new
    return rebuild(layout, frames, None if raw_bytes is None else {shard: raw_bytes})


def shard_header(layout: PayloadLayout, payload: bytes, shard: int) -> dict[str, Any]:
    """A shard's safetensors header, parsed (insertion order kept)."""
    raw = unzstd(split_frames(layout, payload)[shard][0])
    entries: dict[str, Any] = json.loads(raw[8:])
    return entries


def with_shard_header(
    layout: PayloadLayout, payload: bytes, shard: int, text: bytes, *, length: int | None = None
) -> tuple[PayloadLayout, bytes]:
    """Swap a shard's safetensors header for ``text`` (JSON, padded here to 8 bytes) and fix sizes and digests.

    ``length`` overrides the 8-byte length prefix (a header that lies about its size).
    """
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text) if length is None else length) + text
    old = len(unzstd(split_frames(layout, payload)[shard][0]))
    raw = layout.shards[shard].raw_bytes - old + len(header)
    frame = zstd(header, layout.codec.zstd_level, shuffled=False)
    return replace_frame(layout, payload, shard, 0, frame, raw_bytes=raw)


def flip(payload: bytes | memoryview, offset: int, mask: int = 0x10) -> bytes:
    """``payload`` with the byte at ``offset`` XORed with ``mask`` (the shard specs keep their digests: damage)."""
    out = bytearray(payload)
    out[offset] ^= mask
    return bytes(out)


def frame_offset(layout: PayloadLayout, shard: int, frame: int) -> int:
    """Payload offset at which a frame starts."""
    offset = layout.shard_offsets()[shard]
    return offset + sum(layout.shards[shard].frame_bytes[:frame])
