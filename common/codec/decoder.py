"""Decode a payload back into tensors, shard by shard, with every check before every allocation.

Three levels, one module each:
- common.codec.shard_decoder: :class:`ShardDecoder` turns one complete,
  compressed shard into tensor pieces (digest first, then frame sizes against
  its spec, then zstd, unshuffle and a finiteness check per block, several
  blocks at once on the codec pool);
- common.codec.assembler: :class:`ShardAssembler` checks chunks (order, crc,
  bounds, the shard specs they carry) and gathers them into whole shards, in
  buffers from the pool of common.codec.shard_buffers;
- this module: :class:`DeltaStreamDecoder` takes chunks as they arrive and
  hands each shard to a ShardDecoder as soon as it is complete. It never holds
  more than one shard's compressed bytes and never a decompressed shard: blocks
  decompress straight into their tensors. :func:`decode_chunks` and
  :func:`decode_file` decode a whole stream or file into full tensors.

The names of the other two levels are re-exported here, so callers keep one
import path for the decoder.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO

import torch

from common.codec.assembler import CompleteShard, ShardAssembler
from common.codec.layout import DEFAULT_LIMITS, DecodeLimits, validate_layout, validate_spec
from common.codec.shard_buffers import SHARD_BUFFERS, BufferPool
from common.codec.shard_decoder import DecodedPiece, PendingShard, ShardDecoder
from common.delta import Chunk, DeltaHeader, PayloadLayout, TensorSpec
from common.dtypes import to_torch
from common.errors import ChunkOrderError, TruncatedStream

__all__ = [
    "SHARD_BUFFERS",
    "BufferPool",
    "CompleteShard",
    "DecodedPiece",
    "DeltaStreamDecoder",
    "PendingShard",
    "ShardAssembler",
    "ShardDecoder",
    "allocate",
    "decode_chunks",
    "decode_file",
    "place_piece",
]


class DeltaStreamDecoder:
    """Decodes a chunk stream as it arrives.

    Each completed shard's blocks go to the codec pool at once, and the next
    shard keeps arriving meanwhile; up to ``MAX_PENDING`` shards decode at a
    time, so the pool never idles at a shard boundary. Feed every chunk to
    :meth:`feed`, which returns the pieces finished so far; then :meth:`finish`
    returns the rest, or raises :class:`TruncatedStream` if the stream stopped
    before its last chunk.

    ``max_pending``: how many shards may decode at once. 0 decodes each shard
    as soon as it is complete, before taking the next chunk: no overlap, and a
    receiver's memory of one compressed and one decoded shard (a worker
    applying a delta to the one copy of its state it keeps, docs/worker.md).
    """

    MAX_PENDING = 2

    def __init__(
        self,
        *,
        limits: DecodeLimits = DEFAULT_LIMITS,
        expected: Sequence[TensorSpec] | None = None,
        executor: Executor | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending is {max_pending}; must be >= 0")
        self._max_pending = max_pending
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

    @property
    def layout(self) -> PayloadLayout | None:
        """The payload's whole layout, once its last chunk has been received."""
        return self._assembler.layout if self._assembler else None

    def feed(self, chunk: Chunk) -> list[DecodedPiece]:
        """Check one chunk; return the pieces of the shards finished since the last call."""
        if self.header is None:
            if chunk.header is None:
                raise ChunkOrderError("the first chunk of a stream must carry the header", field="header")
            validate_spec(chunk.header.spec, self._limits, self._expected)
            self.header = chunk.header
            self._assembler = ShardAssembler(chunk.header.spec, limits=self._limits)
            self._shards = ShardDecoder(chunk.header.spec, executor=self._executor)
        elif chunk.header is not None and chunk.header != self.header:
            raise ChunkOrderError(
                f"chunk at offset {chunk.offset} carries a header different from the stream's",
                field="header",
            )
        assert self._assembler is not None and self._shards is not None
        ready: list[DecodedPiece] = []
        for shard in self._assembler.add(chunk):
            while self._pending and len(self._pending) >= self._max_pending:
                ready += self._take_oldest()
            try:
                self._pending.append(self._shards.start(shard.index, shard.spec, shard.data, self._into))
            except BaseException:
                self._assembler.release(shard.data)
                raise
        while self._pending and (self._pending[0].done() or len(self._pending) > self._max_pending):
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
                f"the stream ended at offset {self._assembler.offset}, before its last chunk; "
                "resume from there",
                field="offset",
            )
        return pieces

    def close(self) -> None:
        """Wait for shards still decoding (their buffers must outlive the pool's work)."""
        while self._pending:
            pending = self._pending.popleft()
            with contextlib.suppress(Exception):
                pending.result()
        if self._assembler is not None:
            self._assembler.close()

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
    validate_spec(first.header.spec, limits, expected)
    manifest = first.header.spec.manifest
    tensors: Mapping[str, torch.Tensor]
    if into is not None:
        missing = [t.name for t in manifest if t.name not in into]
        if missing:
            raise ValueError(f"no destination tensor for {missing[0]!r} (and {len(missing) - 1} more)")
        tensors = {t.name: into[t.name] for t in manifest}
    else:
        tensors = _OnFirstUse(manifest)
    with DeltaStreamDecoder(limits=limits, expected=expected, executor=executor, into=tensors) as decoder:
        for chunk in _chain(first, it):
            for piece in decoder.feed(chunk):
                place_piece(tensors[piece.name], piece)
        for piece in decoder.finish():
            place_piece(tensors[piece.name], piece)
    return first.header, {t.name: tensors[t.name] for t in manifest}


class _OnFirstUse(Mapping[str, torch.Tensor]):
    """The manifest's tensors, each allocated when a shard that holds a piece of it is accepted.

    The header's manifest is bounded by the limits, but it is only a claim: a
    tensor is allocated once a shard spec covering it passed its checks, not
    on the header's word alone.
    """

    def __init__(self, manifest: Sequence[TensorSpec]) -> None:
        self._specs = {t.name: t for t in manifest}
        self._made: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._made.get(name)
        if tensor is None:
            spec = self._specs[name]
            tensor = self._made[name] = torch.empty(spec.shape, dtype=to_torch(spec.dtype))
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def _chain(first: Chunk, rest: Iterable[Chunk]) -> Iterable[Chunk]:
    yield first
    yield from rest


def decode_file(
    source: str | Path | BinaryIO,
    layout: PayloadLayout,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[TensorSpec] | None = None,
    executor: Executor | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a payload stored in a file (a spool or a stored global difference), given its stored layout,
    into full tensors."""
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            return decode_file(f, layout, limits=limits, expected=expected, executor=executor)
    validate_layout(layout, limits, expected)
    tensors = allocate(layout.manifest)
    decoder = ShardDecoder(layout.spec, executor=executor)
    source.seek(0)
    for index, shard in enumerate(layout.shards):
        data = source.read(shard.compressed_bytes)
        for piece in decoder.decode(index, shard, data, tensors):
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
