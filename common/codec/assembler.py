"""Gather a chunk stream into whole compressed shards, checking every chunk on the way.

:class:`ShardAssembler` checks each chunk (common.codec.chunks.ChunkVerifier:
order, crc, bounds, the shard spec it carries) and copies it into a buffer
from the shared pool (common.codec.shard_buffers); a shard is handed on,
with its spec, as soon as the chunk that ends it arrives, and its buffer given
back once it is decoded, so a stream never holds more than the shards in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.codec.chunks import ChunkVerifier
from common.codec.layout import DEFAULT_LIMITS, DecodeLimits
from common.codec.shard_buffers import SHARD_BUFFERS
from common.codec.shuffle import U8Array
from common.delta import MIB, Chunk, PayloadLayout, PayloadSpec, ShardSpec

# The first buffer of a stream, before any shard's size is known; a chunk's worth at least.
_FIRST_CAPACITY = 4 * MIB


@dataclass(frozen=True, slots=True)
class CompleteShard:
    """A shard whose compressed bytes have all arrived, with its (accepted) spec."""

    index: int
    spec: ShardSpec
    data: memoryview


class ShardAssembler:
    """Checks chunks and gathers them into whole shards.

    A shard's size is unknown until its spec arrives with its last chunk, so
    its bytes go into a buffer that grows: it starts at the size of the
    stream's previous shard (shards of one payload are alike, so usually no
    growth at all), and when full it is replaced by one twice as large (capped
    by the verifier's bound on a shard), the bytes copied over and the old
    buffer given back to the pool. Memory: a shard of n compressed bytes is
    held in a buffer of less than 2n, 3n for a moment while it grows; every
    byte is copied at most about twice in all (doubling), never quadratically.
    The bytes never exceed ``ChunkVerifier.shard_bound``, whatever the sender claims.

    Args:
        spec: the validated spec of the payload (the header's).
        limits: the receiver's limits.
        start: payload bytes the receiver already holds (a resumed stream).
        shards: the specs of the shards ending at or before ``start``.
        partial: the bytes of the shard in progress before ``start``, so a
            resume in the middle of a shard completes it.
    """

    def __init__(
        self,
        spec: PayloadSpec,
        *,
        limits: DecodeLimits = DEFAULT_LIMITS,
        start: int = 0,
        shards: Sequence[ShardSpec] = (),
        partial: bytes = b"",
    ) -> None:
        self.spec = spec
        self.verifier = ChunkVerifier(spec, limits=limits, start=start, shards=shards)
        self._backing: U8Array | None = None
        self._filled = 0
        self._hint = max((s.compressed_bytes for s in shards), default=_FIRST_CAPACITY)
        held = start - self.verifier.shard_begin(len(self.verifier.shards))
        if len(partial) != held:
            raise ValueError(
                f"resuming at {start} needs the {held} bytes of shard {len(self.verifier.shards)} "
                f"already received; got {len(partial)}"
            )
        if partial:
            self._append(memoryview(partial))

    @property
    def offset(self) -> int:
        return self.verifier.offset

    @property
    def done(self) -> bool:
        return self.verifier.done

    @property
    def layout(self) -> PayloadLayout | None:
        """The whole layout, once the last chunk has been accepted."""
        return self.verifier.layout

    def add(self, chunk: Chunk) -> list[CompleteShard]:
        """Check ``chunk`` and return the shard it completes (none or one)."""
        index = self.verifier.check(chunk)
        if len(chunk.data):
            self._append(memoryview(chunk.data))
        if index is None:
            return []
        spec = self.verifier.shards[index]
        assert self._backing is not None and self._filled == spec.compressed_bytes
        data = self._backing.data[: self._filled]
        self._hint = spec.compressed_bytes
        self._backing, self._filled = None, 0
        return [CompleteShard(index, spec, data)]

    def release(self, buffer: memoryview) -> None:
        """Hand a shard's buffer back once it is decoded, so the next shard (of this stream or a later one)
        reuses its pages; the caller must not touch it after this."""
        base = buffer.obj
        if isinstance(base, np.ndarray):
            SHARD_BUFFERS.give(base)

    def close(self) -> None:
        """Give back the buffer of a shard left unfinished (a stream that broke off)."""
        if self._backing is not None:
            SHARD_BUFFERS.give(self._backing)
            self._backing, self._filled = None, 0

    def _append(self, data: memoryview) -> None:
        need = self._filled + len(data)
        if self._backing is None:
            # np.empty (in the pool), not bytearray: the bytes are overwritten by the chunks, and
            # bytearray(n) would first zero all n of them.
            self._backing = SHARD_BUFFERS.take(max(need, min(self._hint, self.verifier.shard_bound)))
        elif need > self._backing.size:
            grown = SHARD_BUFFERS.take(max(need, min(2 * self._backing.size, self.verifier.shard_bound)))
            grown[: self._filled] = self._backing[: self._filled]
            SHARD_BUFFERS.give(self._backing)
            self._backing = grown
        self._backing[self._filled : need] = np.frombuffer(data, dtype=np.uint8)
        self._filled = need
