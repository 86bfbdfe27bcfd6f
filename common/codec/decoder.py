"""Decode a payload back into tensors, shard by shard, with every check before every allocation.

Two levels:
- :class:`ShardDecoder` turns one complete, compressed shard into tensor pieces
  (sha256 first, then frame sizes against the layout, then zstd, unshuffle and
  a finiteness check per block, several blocks at once on the codec pool);
- :class:`DeltaStreamDecoder` takes chunks as they arrive, checks their order
  and checksums, and hands each shard to a ShardDecoder as soon as it is
  complete. It never holds more than one shard's compressed bytes and never
  a decompressed shard: blocks decompress straight into their tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from common.codec.blocks import decode_block, decompress_exact, default_executor
from common.codec.chunks import ChunkVerifier
from common.codec.layout import (
    DEFAULT_LIMITS,
    DecodeLimits,
    digest_of_digests,
    expected_frame_sizes,
    validate_layout,
    wire_dtypes,
)
from common.codec.shuffle import U8Array
from common.codec.stheader import check_header
from common.delta import Chunk, DeltaHeader, PayloadLayout, TensorSpec
from common.dtypes import itemsize, to_torch
from common.errors import (
    ChunkOrderError,
    DataLoss,
    GdfedError,
    LimitExceeded,
    MalformedShard,
    NonFiniteValues,
    TruncatedStream,
)


@dataclass(frozen=True, slots=True)
class DecodedPiece:
    """Elements ``[start, start + len(values))`` of the flattened tensor ``name``, in its manifest dtype."""

    tensor: int
    name: str
    start: int
    values: torch.Tensor


class PendingShard:
    """A shard whose blocks are being decoded on the pool; :meth:`result` waits and checks."""

    def __init__(
        self,
        decoder: ShardDecoder,
        index: int,
        frames: list[memoryview],
        outputs: list[U8Array],
        futures: list[tuple[int, Future[tuple[bool, bytes]]]],
        header_digest: bytes,
        buffer: memoryview,
    ) -> None:
        self.index = index
        self.buffer = buffer
        self._decoder = decoder
        self._frames = frames
        self._outputs = outputs
        self._futures = futures
        self._header_digest = header_digest

    def done(self) -> bool:
        return all(future.done() for _, future in self._futures)

    def result(self) -> list[DecodedPiece]:
        """The shard's pieces, once every frame decoded and the shard's sha256 matched.

        Raises DataLoss when the bytes were damaged (even if the damage first
        showed up as a corrupt frame), else the frame's own error.
        """
        layout = self._decoder.layout
        spec = layout.shards[self.index]
        digests = [self._header_digest]
        finite = [True] * len(spec.pieces)
        failure: GdfedError | None = None
        for p, future in self._futures:
            try:
                ok, digest = future.result()
            except (MalformedShard, LimitExceeded) as exc:
                failure = failure or exc
                continue
            digests.append(digest)
            finite[p] = finite[p] and ok
        if failure is not None:
            self._decoder.check_digest(self.index, [hashlib.sha256(f).digest() for f in self._frames])
            raise failure
        self._decoder.check_digest(self.index, digests)
        for piece, ok in zip(spec.pieces, finite, strict=True):
            if not ok:
                name = layout.manifest[piece.tensor].name
                raise NonFiniteValues(
                    f"tensor {name!r} holds NaN or infinity (or, for a bool tensor, a byte other than 0 or 1)",
                    field=name,
                )
        return [
            self._decoder.piece(piece.tensor, piece.start, buf)
            for piece, buf in zip(spec.pieces, self._outputs, strict=True)
        ]


class ShardDecoder:
    """Decodes the shards of one payload whose layout has been validated.

    Each frame's SHA-256 is taken by the pool task that decompresses it, so
    hashing runs on every core; a shard's digest (over its frame digests) is
    compared before any of its pieces is returned.
    """

    def __init__(self, layout: PayloadLayout, *, executor: Executor | None = None) -> None:
        self.layout = layout
        self._wire = wire_dtypes(layout.manifest, layout.codec)
        self._pool = executor or default_executor()

    def decode(
        self,
        index: int,
        data: bytes | bytearray | memoryview,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> list[DecodedPiece]:
        """Decode shard ``index`` from its compressed bytes (see :meth:`start`)."""
        return self.start(index, data, into).result()

    def start(
        self,
        index: int,
        data: bytes | bytearray | memoryview,
        into: Mapping[str, torch.Tensor] | None = None,
        *,
        scratch: U8Array | None = None,
    ) -> PendingShard:
        """Check shard ``index``'s header frame, then queue its blocks on the pool.

        Args:
            index: which shard of the layout.
            data: exactly that shard's compressed bytes; must stay unchanged until
                the result is taken.
            scratch: optional reusable byte buffer of at least ``scratch_bytes(index)``;
                pieces are decoded into it back to back (saves page faults on every
                shard) and stay valid until it is reused.
            into: optional destination tensors (contiguous, CPU, manifest shapes and
                dtypes); pieces are written straight into them, so decoding a whole
                payload needs no second copy. On error they may hold partial data.
        """
        spec = self.layout.shards[index]
        where = f"shards[{index}]"
        view = memoryview(data)
        if len(view) != spec.compressed_bytes:
            raise MalformedShard(
                f"{where} holds {len(view)} bytes; its spec says {spec.compressed_bytes}", field=where
            )
        frames = []
        offset = 0
        for size in spec.frame_bytes:
            frames.append(view[offset : offset + size])
            offset += size
        sizes = expected_frame_sizes(spec, self.layout)
        try:
            header = decompress_exact(frames[0], sizes[0], f"{where}.frame[0]")
            check_header(header, spec.pieces, self.layout.manifest, self._wire)
        except (MalformedShard, LimitExceeded):
            self.check_digest(index, [hashlib.sha256(f).digest() for f in frames])
            raise
        outputs: list[U8Array] = []
        futures: list[tuple[int, Future[tuple[bool, bytes]]]] = []
        block = self.layout.codec.block_bytes
        shuffled = self.layout.codec.byte_shuffle
        used = 0
        for p, piece in enumerate(spec.pieces):
            if scratch is not None and into is None:
                size = piece.count * itemsize(self.layout.manifest[piece.tensor].dtype)
                dest = scratch[used : used + size]
                used += size
            else:
                dest = self._destination(piece.tensor, piece.start, piece.count, into)
            outputs.append(dest)
            wire = self._wire[piece.tensor]
            target = self.layout.manifest[piece.tensor].dtype
            # A block holds block_bytes of wire data; in the destination it spans more after an upcast.
            span = block * itemsize(target) // itemsize(wire)
            for start in range(0, dest.size, span):
                f = len(futures) + 1
                out = dest[start : start + span]
                name = f"{where}.frame[{f}]"
                future = self._pool.submit(decode_block, frames[f], out, wire, target, shuffled, name)
                futures.append((p, future))
        return PendingShard(self, index, frames, outputs, futures, hashlib.sha256(frames[0]).digest(), view)

    def scratch_bytes(self, index: int | None = None) -> int:
        """Bytes a scratch buffer needs for shard ``index`` (for every shard when None)."""
        indices = range(len(self.layout.shards)) if index is None else [index]
        return max(
            (
                sum(
                    p.count * itemsize(self.layout.manifest[p.tensor].dtype)
                    for p in self.layout.shards[i].pieces
                )
                for i in indices
            ),
            default=0,
        )

    def check_digest(self, index: int, frame_digests: list[bytes]) -> None:
        """Raise DataLoss unless the frame digests add up to shard ``index``'s sha256."""
        if digest_of_digests(frame_digests) != self.layout.shards[index].sha256:
            raise DataLoss(f"shards[{index}] fails its sha256", field=f"shards[{index}].sha256")

    def _destination(
        self, tensor: int, start: int, count: int, into: Mapping[str, torch.Tensor] | None
    ) -> U8Array:
        spec = self.layout.manifest[tensor]
        if into is not None:
            flat = into[spec.name].view(-1)[start : start + count]
            array: U8Array = flat.view(torch.uint8).numpy()
            return array
        return np.empty(count * itemsize(spec.dtype), dtype=np.uint8)

    def piece(self, tensor: int, start: int, buf: U8Array) -> DecodedPiece:
        """Wrap decoded bytes (already in the manifest dtype) as a piece."""
        spec = self.layout.manifest[tensor]
        if buf.size == 0:
            return DecodedPiece(tensor, spec.name, start, torch.empty(0, dtype=to_torch(spec.dtype)))
        return DecodedPiece(tensor, spec.name, start, torch.from_numpy(buf).view(to_torch(spec.dtype)))


class BufferPool:
    """Byte buffers kept from one stream to the next, at most ``keep`` of them.

    A fresh buffer costs a page fault (and the kernel zeroing a page) for
    every page written into it; a worker fetches a payload every round, so its
    streams' shard buffers are taken from here and given back when decoded.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._free: list[U8Array] = []
        self._lock = threading.Lock()  # streams decode on several threads at once

    def take(self, nbytes: int) -> U8Array:
        """A buffer of at least ``nbytes`` (the smallest kept one that fits, else a new one)."""
        with self._lock:
            fitting = [i for i, buf in enumerate(self._free) if buf.size >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=lambda i: self._free[i].size))
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buffer: U8Array) -> None:
        """Keep ``buffer`` for a later stream, or let it go when ``keep`` larger ones are kept already."""
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda buf: buf.size, reverse=True)
            del self._free[self.keep :]

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(buf.size for buf in self._free)


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


# A stream holds MAX_PENDING (2) shards decoding and one arriving: what one stream after another
# needs (a worker's fetches). 32 MiB shards of the exact codec are ~22 MB compressed: ~66 MB kept.
SHARD_BUFFERS = BufferPool(keep=3)


class DeltaStreamDecoder:
    """Decodes a chunk stream as it arrives.

    Each completed shard's blocks go to the codec pool at once, and the next
    shard keeps arriving meanwhile; up to ``MAX_PENDING`` shards decode at a
    time, so the pool never idles at a shard boundary. Feed every chunk to
    :meth:`feed`, which returns the pieces finished so far; then :meth:`finish`
    returns the rest, or raises :class:`TruncatedStream` if the stream stopped
    before its last chunk.
    """

    MAX_PENDING = 2

    def __init__(
        self,
        *,
        limits: DecodeLimits = DEFAULT_LIMITS,
        expected: Sequence[TensorSpec] | None = None,
        executor: Executor | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._limits = limits
        self._expected = expected
        self._executor = executor
        self._into = into
        self.header: DeltaHeader | None = None
        self._assembler: ShardAssembler | None = None
        self._shards: ShardDecoder | None = None
        self._pending: deque[PendingShard] = deque()

    def __enter__(self) -> DeltaStreamDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def offset(self) -> int:
        """Payload bytes received so far."""
        return self._assembler.offset if self._assembler else 0

    def feed(self, chunk: Chunk) -> list[DecodedPiece]:
        """Check one chunk; return the pieces of the shards finished since the last call."""
        if self.header is None:
            if chunk.header is None:
                raise ChunkOrderError("the first chunk of a stream must carry the header", field="header")
            validate_layout(chunk.header.layout, self._limits, self._expected)
            self.header = chunk.header
            self._assembler = ShardAssembler(
                chunk.header.layout, max_chunk_bytes=self._limits.max_chunk_bytes
            )
            self._shards = ShardDecoder(chunk.header.layout, executor=self._executor)
        elif chunk.header is not None and chunk.header != self.header:
            raise ChunkOrderError(
                f"chunk at offset {chunk.offset} carries a header different from the stream's",
                field="header",
            )
        assert self._assembler is not None and self._shards is not None
        ready: list[DecodedPiece] = []
        for shard in self._assembler.add(chunk):
            while len(self._pending) >= self.MAX_PENDING:
                ready += self._take_oldest()
            self._pending.append(self._shards.start(shard.index, shard.data, self._into))
        while self._pending and self._pending[0].done():
            ready += self._take_oldest()
        return ready

    def finish(self) -> list[DecodedPiece]:
        """The remaining pieces, once the whole stream has been received and decoded."""
        if self.header is None or self._assembler is None:
            raise TruncatedStream("the stream ended before its first chunk", field="header")
        pieces: list[DecodedPiece] = []
        while self._pending:
            pieces += self._take_oldest()
        if not self._assembler.done:
            raise TruncatedStream(
                f"the stream ended at offset {self._assembler.offset} of "
                f"{self.header.layout.total_bytes}; resume from there",
                field="offset",
            )
        return pieces

    def close(self) -> None:
        """Wait for shards still decoding (their buffers must outlive the pool's work)."""
        while self._pending:
            pending = self._pending.popleft()
            with contextlib.suppress(Exception):
                pending.result()

    def _take_oldest(self) -> list[DecodedPiece]:
        pending = self._pending.popleft()
        pieces = pending.result()
        assert self._assembler is not None
        self._assembler.release(pending.buffer)
        return pieces


def decode_chunks(
    chunks: Iterable[Chunk],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[TensorSpec] | None = None,
    executor: Executor | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> tuple[DeltaHeader, dict[str, torch.Tensor]]:
    """Decode a whole chunk stream into full tensors, filled in place.

    With ``into`` (contiguous CPU tensors of the manifest's shapes and dtypes)
    the stream is decoded straight into them; otherwise they are allocated.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise TruncatedStream("the stream ended before its first chunk", field="header")
    if first.header is None:
        raise ChunkOrderError("the first chunk of a stream must carry the header", field="header")
    validate_layout(first.header.layout, limits, expected)
    if into is not None:
        missing = [t.name for t in first.header.layout.manifest if t.name not in into]
        if missing:
            raise ValueError(f"no destination tensor for {missing[0]!r} (and {len(missing) - 1} more)")
        tensors = {t.name: into[t.name] for t in first.header.layout.manifest}
    else:
        tensors = allocate(first.header.layout.manifest)
    with DeltaStreamDecoder(limits=limits, expected=expected, executor=executor, into=tensors) as decoder:
        for chunk in _chain(first, it):
            for piece in decoder.feed(chunk):
                place_piece(tensors[piece.name], piece)
        for piece in decoder.finish():
            place_piece(tensors[piece.name], piece)
    return first.header, tensors


def _chain(first: Chunk, rest: Iterable[Chunk]) -> Iterable[Chunk]:
    yield first
    yield from rest


def decode_file(
    layout: PayloadLayout,
    source: BinaryIO,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[TensorSpec] | None = None,
    executor: Executor | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a payload stored in a file (a spool or a stored global difference) into full tensors."""
    validate_layout(layout, limits, expected)
    tensors = allocate(layout.manifest)
    decoder = ShardDecoder(layout, executor=executor)
    source.seek(0)
    for index, shard in enumerate(layout.shards):
        data = source.read(shard.compressed_bytes)
        for piece in decoder.decode(index, data, tensors):
            place_piece(tensors[piece.name], piece)
    return tensors


def allocate(
    manifest: Sequence[TensorSpec], reuse: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors for a manifest, to decode into (contents undefined).

    ``reuse``: spare tensors of the caller's (it must not read or hold them
    elsewhere while the decode owns them); each one whose name, shape and
    dtype match the manifest's entry is taken as it is, the others are
    allocated. Memory a process touched before costs no page faults.
    """
    reuse = reuse or {}
    out = {}
    taken: set[int] = set()  # two spares over one storage (tied weights) must not both be decoded into
    for t in manifest:
        dtype = to_torch(t.dtype)
        spare = reuse.get(t.name)
        if (
            spare is not None
            and spare.dtype == dtype
            and tuple(spare.shape) == tuple(t.shape)
            and spare.device.type == "cpu"
            and spare.is_contiguous()
            and spare.untyped_storage().data_ptr() not in taken
        ):
            taken.add(spare.untyped_storage().data_ptr())
            out[t.name] = spare
        else:
            out[t.name] = torch.empty(t.shape, dtype=dtype)
    return out


def place_piece(target: torch.Tensor, piece: DecodedPiece) -> None:
    """Copy a decoded piece into its place in the full tensor (a no-op when decoded there already)."""
    flat = target.view(-1)
    dest = flat[piece.start : piece.start + piece.values.numel()]
    # Pieces decoded in place already live in ``target``; copying onto itself is skipped.
    if dest.data_ptr() != piece.values.data_ptr() or piece.values.numel() == 0:
        dest.copy_(piece.values)
