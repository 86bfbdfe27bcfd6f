"""Cutting a payload into the chunk stream the wire prescribes, and streams cut wrong on purpose.

:func:`cut` is the rule of docs/protocol.md written out on its own (chunks of
at most ``chunk_bytes`` from each shard's start, none crossing a shard's end,
the one ending a shard carrying its spec), independently of
``common.codec.chunks.iter_chunks``; the check compares the two, byte for byte.
A :class:`ChunkPlan` says what one chunk carries, so a malformed vector can
put a spec, a boundary or a flag where no sender would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from common.codec.chunks import crc32c
from common.delta import Chunk, DeltaHeader, PayloadLayout, ShardSpec


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One chunk: ``payload[offset:offset + length]``, with what else it carries.

    ``shard``: the index of the layout's shard whose spec this chunk carries
    (None: no spec); ``crc_ok`` False sends a CRC-32C with one bit flipped.
    """

    offset: int
    length: int
    last: bool = False
    header: bool = False
    shard: int | None = None
    crc_ok: bool = True


def shard_ends(layout: PayloadLayout) -> list[int]:
    """Payload offset at which each shard ends."""
    ends, at = [], 0
    for shard in layout.shards:
        at += shard.compressed_bytes
        ends.append(at)
    return ends


def cut(layout: PayloadLayout, *, chunk_bytes: int, start: int = 0) -> list[ChunkPlan]:
    """The stream a sender sends from ``start``: the first chunk with the header, the final one ``last``.

    Each shard's bytes from ``max(start, its beginning)`` go in chunks of at
    most ``chunk_bytes``; the one ending a shard carries its spec, so the spec
    of every shard ending after ``start`` is sent (again, on a resume). A
    payload without shards is one empty chunk.
    """
    plans: list[ChunkPlan] = []
    begin = 0
    for index, end in enumerate(shard_ends(layout)):
        offset = max(begin, start)
        while offset < end:
            length = min(chunk_bytes, end - offset)
            plans.append(ChunkPlan(offset, length, shard=index if offset + length == end else None))
            offset += length
        begin = end
    if not plans:
        plans.append(ChunkPlan(start, 0))
    plans[0] = dataclasses.replace(plans[0], header=True)
    plans[-1] = dataclasses.replace(plans[-1], last=True)
    return plans


def build(
    header: DeltaHeader,
    layout: PayloadLayout,
    payload: bytes,
    plans: Sequence[ChunkPlan],
    specs: Sequence[ShardSpec] | None = None,
) -> list[Chunk]:
    """The chunks ``plans`` describe, over ``payload``; ``specs`` replaces the layout's shard specs (tampering)."""
    shards = layout.shards if specs is None else specs
    chunks = []
    for p in plans:
        data = payload[p.offset : p.offset + p.length]
        crc = crc32c(data) if p.crc_ok else crc32c(data) ^ 0x1
        chunks.append(
            Chunk(
                offset=p.offset,
                data=data,
                crc32=crc,
                last=p.last,
                header=header if p.header else None,
                shard=None if p.shard is None else shards[p.shard],
            )
        )
    return chunks
