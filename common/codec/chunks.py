"""Cutting a payload into chunks, and checking a chunk stream's order and checksums."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

from common.delta import MIB, Chunk, DeltaHeader
from common.errors import ChunkOrderError, DataLoss, InvalidArgument, LimitExceeded

DEFAULT_CHUNK_BYTES = 1 * MIB


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``; hardware-accelerated, ~16 GB/s here against zlib.crc32's 1.9."""
    return int(google_crc32c.value(data))


def make_chunk(offset: int, data: bytes, last: bool, header: DeltaHeader | None = None) -> Chunk:
    """A chunk with its CRC-32C filled in."""
    return Chunk(offset=offset, data=data, crc32=crc32c(data), last=last, header=header)


def iter_chunks(
    header: DeltaHeader, source: BinaryIO, *, start: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Chunk]:
    """Chunks of the payload in ``source`` from offset ``start``; the first one carries ``header``.

    ``source`` is positioned at payload offset ``start`` by this function, so
    a resumed upload passes the offset the receiver acknowledged.
    """
    if not 0 < chunk_bytes <= DEFAULT_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be 1..{DEFAULT_CHUNK_BYTES}, got {chunk_bytes}")
    total = header.layout.total_bytes
    if not 0 <= start <= total:
        raise ValueError(f"start offset {start} is outside the payload (0..{total})")
    source.seek(start)
    offset = start
    first: DeltaHeader | None = header
    while True:
        data = source.read(min(chunk_bytes, total - offset))
        if offset + len(data) < total and not data:
            raise EOFError(f"payload source ended at offset {offset}; header says {total} bytes")
        last = offset + len(data) >= total
        yield make_chunk(offset, data, last, first)
        first = None
        offset += len(data)
        if last:
            return


class ChunkVerifier:
    """Checks that chunks arrive in order, without gaps or repeats, intact, and within the total.

    A verifier starts at the offset the receiver already holds (0, or the
    committed offset of a resumed upload).
    """

    def __init__(
        self, total_bytes: int, *, start: int = 0, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.total_bytes = total_bytes
        self.offset = start
        self.max_chunk_bytes = max_chunk_bytes
        self.done = False

    def check(self, chunk: Chunk) -> None:
        """Raise the typed error for the first thing wrong with ``chunk``, else advance."""
        if self.done:
            raise ChunkOrderError(
                f"chunk at offset {chunk.offset} arrived after the last chunk", field="offset"
            )
        if len(chunk.data) > self.max_chunk_bytes:
            raise LimitExceeded(
                f"chunk at offset {chunk.offset} carries {len(chunk.data)} bytes; "
                f"the limit is {self.max_chunk_bytes}",
                field="data",
                limit=self.max_chunk_bytes,
            )
        if chunk.offset != self.offset:
            what = "repeats bytes already received" if chunk.offset < self.offset else "leaves a gap"
            raise ChunkOrderError(
                f"chunk offset is {chunk.offset}, expected {self.offset}: it {what}", field="offset"
            )
        if crc32c(chunk.data) != chunk.crc32:
            raise DataLoss(f"chunk at offset {chunk.offset} fails its CRC-32C", field="crc32")
        end = chunk.offset + len(chunk.data)
        if end > self.total_bytes:
            raise InvalidArgument(
                f"chunk at offset {chunk.offset} runs to {end}, past total_bytes {self.total_bytes}",
                field="data",
                limit=self.total_bytes,
            )
        if chunk.last and end != self.total_bytes:
            raise ChunkOrderError(
                f"chunk marked last ends at {end}; total_bytes is {self.total_bytes}", field="last"
            )
        self.offset = end
        self.done = chunk.last
