"""Gather a chunk stream into whole compressed shards, checking every chunk on the way.

:class:`ShardAssembler` checks each chunk's order, crc and bounds and copies
it into a buffer from the shared pool (common.codec.shard_buffers); a shard is
handed on as soon as its last byte arrives, and its buffer given back once it
is decoded, so a stream never holds more than the shards in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.codec.chunks import ChunkVerifier
from common.codec.layout import DEFAULT_LIMITS
from common.codec.shard_buffers import SHARD_BUFFERS
from common.delta import Chunk, PayloadLayout


@dataclass(frozen=True, slots=True)
class CompleteShard:
    """A shard whose compressed bytes have all arrived."""

    index: int
    data: memoryview


class ShardAssembler:
    """Checks chunks (order, crc, bounds) and gathers them into whole shards.

    Args:
        layout: the validated layout of the payload.
        start: payload bytes the receiver already holds (a resumed upload).
        partial: the bytes of the shard in progress before ``start``, so a
            resume in the middle of a shard completes it.
        max_chunk_bytes: the largest chunk accepted.
    """

    def __init__(
        self,
        layout: PayloadLayout,
        *,
        start: int = 0,
        partial: bytes = b"",
        max_chunk_bytes: int = DEFAULT_LIMITS.max_chunk_bytes,
    ) -> None:
        self.layout = layout
        self.verifier = ChunkVerifier(layout.total_bytes, start=start, max_chunk_bytes=max_chunk_bytes)
        offsets = layout.shard_offsets()
        self._begins, self._ends = offsets[:-1], offsets[1:]
        self._shard = next((i for i, end in enumerate(self._ends) if end > start), len(self._ends))
        self._capacity = max((shard.compressed_bytes for shard in layout.shards), default=0)
        self._buffer: memoryview | None = None
        self._filled = 0
        if self._shard < len(self._ends):
            if len(partial) != start - self._begins[self._shard]:
                raise ValueError(
                    f"resuming at {start} needs the {start - self._begins[self._shard]} bytes of "
                    f"shard {self._shard} already received; got {len(partial)}"
                )
            if partial:
                self._open()
                self._take(memoryview(partial))

    @property
    def offset(self) -> int:
        return self.verifier.offset

    @property
    def done(self) -> bool:
        return self.verifier.done

    def add(self, chunk: Chunk) -> list[CompleteShard]:
        """Check ``chunk`` and return the shards it completes."""
        self.verifier.check(chunk)
        complete = []
        data = memoryview(chunk.data)
        while data:
            if self._buffer is None:
                self._open()
            assert self._buffer is not None
            data = data[self._take(data) :]
            if self._filled == len(self._buffer):
                complete.append(CompleteShard(self._shard, self._buffer))
                self._buffer = None
                self._shard += 1
        return complete

    def release(self, buffer: memoryview) -> None:
        """Hand a shard's buffer back once it is decoded, so the next shard (of this stream or a later one)
        reuses its pages; the caller must not touch it after this."""
        base = buffer.obj
        if isinstance(base, np.ndarray):
            SHARD_BUFFERS.give(base)

    def _open(self) -> None:
        # np.empty (in the pool), not bytearray: the bytes are overwritten by the chunks, and
        # bytearray(n) would first zero all n of them.
        backing = SHARD_BUFFERS.take(self._capacity)
        self._buffer = backing.data[: self.layout.shards[self._shard].compressed_bytes]
        self._filled = 0

    def _take(self, data: memoryview) -> int:
        assert self._buffer is not None
        take = data[: len(self._buffer) - self._filled]
        self._buffer[self._filled : self._filled + len(take)] = take
        self._filled += len(take)
        return len(take)
