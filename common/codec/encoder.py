"""Encode a dict of tensors into a payload: safetensors shards, shuffled, zstd-framed.

The payload goes to a file-like sink as it is produced (a spool file on a
worker, so an interrupted upload can resume from disk); each shard's spec is
reported as soon as its bytes are in the sink (``on_shard``: a pipelined
sender streams it meanwhile, common.codec.chunks.GrowingPayload), and what
comes back at the end is the whole layout. The tensors may also come a
piece at a time from a :class:`PieceSource` (a worker's difference, computed
as the shards reach it), so no tensor need ever exist whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import BinaryIO, Protocol, runtime_checkable

import numpy as np
import torch

from common.codec.blocks import all_finite, compress_frame, default_executor, thread_scratch, top_plane_finite
from common.codec.digests import digest_of_digests
from common.codec.layout import DEFAULT_SHARD_BYTES, plan_shards, validate_codec, wire_dtypes
from common.codec.shuffle import U8Array, shuffle
from common.codec.stheader import build_header
from common.delta import Codec, PayloadLayout, Piece, ShardSpec, TensorSpec
from common.dtypes import DType, from_torch, itemsize, to_torch
from common.errors import NonFiniteValues


@runtime_checkable
class PieceSource(Protocol):
    """Tensors handed over a piece at a time: what :func:`encode` asks of a source too large to hold whole."""

    def piece(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened tensor ``name``, as a 1-D tensor (any device)."""
        ...


def manifest_of(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """The manifest (names, dtypes, shapes) of a dict of tensors, in its order."""
    return tuple(TensorSpec(name, from_torch(t.dtype), tuple(t.shape)) for name, t in tensors.items())


def encode(
    tensors: Mapping[str, torch.Tensor] | PieceSource,
    codec: Codec,
    sink: BinaryIO,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    executor: Executor | None = None,
    manifest: Sequence[TensorSpec] | None = None,
    on_shard: Callable[[ShardSpec], None] | None = None,
) -> PayloadLayout:
    """Write the payload of ``tensors`` to ``sink`` and return its layout.

    Tensors are fetched from the mapping one at a time, as the shards reach
    them, and dropped once written; with ``manifest`` given, a lazy mapping
    (one that loads or computes a tensor on access) is encoded in memory of
    the order of one tensor plus one shard. A :class:`PieceSource` (with
    ``manifest``) is asked for each shard's pieces only: memory of the order
    of one shard, whatever the size of a tensor.

    Args:
        tensors: name -> tensor, any device; the order is kept. Or a
            PieceSource, whose tensors ``manifest`` names.
        codec: cast, shuffle, block size and zstd level.
        sink: where the payload bytes go, in order.
        shard_bytes: upper bound of tensor bytes per shard.
        executor: pool for per-block work; the process-wide codec pool by default.
        manifest: the tensors' specs, when known without touching the mapping.
        on_shard: called with each shard's spec, in order, once its last frame
            has been written to ``sink`` and ``sink.flush()`` returned.

    Raises:
        NonFiniteValues: a float tensor holds NaN/inf (after the cast: fp32 values
            beyond fp16's range become inf and are refused here, not at the receiver).
        ValueError: a dtype the wire cannot carry; a PieceSource without a manifest.
    """
    validate_codec(codec)
    pool = executor or default_executor()
    flats: _FlatCache | _SourcePieces
    if isinstance(tensors, PieceSource):
        if manifest is None:
            raise ValueError("encoding a PieceSource needs its manifest")
        specs = tuple(manifest)
        wire = wire_dtypes(specs, codec)
        flats = _SourcePieces(tensors, specs, wire)
    else:
        specs = tuple(manifest) if manifest is not None else manifest_of(tensors)
        wire = wire_dtypes(specs, codec)
        flats = _FlatCache(tensors, specs, wire)
    shards: list[ShardSpec] = []
    for pieces in plan_shards(specs, codec, shard_bytes):
        header = build_header(pieces, specs, wire)
        first = compress_frame(np.frombuffer(header, dtype=np.uint8), False, codec.zstd_level, codec.digest)
        jobs = list(_blocks(pieces, flats, wire, codec.block_bytes))
        sizes, digests = [], []
        # Each frame goes to the sink as soon as it is next in order, and this shard's values go
        # before the next shard's are asked for: one shard's worth in memory, not two.
        for frame, digest in _chain_first(
            first, pool.map(lambda job: _encode_block(job, codec, specs), jobs)
        ):
            sink.write(frame)
            sizes.append(len(frame))
            digests.append(digest)
        del jobs
        raw = len(header) + sum(p.count * itemsize(wire[p.tensor]) for p in pieces)
        spec = ShardSpec(
            compressed_bytes=sum(sizes),
            raw_bytes=raw,
            digest=digest_of_digests(codec.digest, digests),
            pieces=pieces,
            frame_bytes=tuple(sizes),
        )
        shards.append(spec)
        if on_shard is not None:
            sink.flush()
            on_shard(spec)
    return PayloadLayout(
        codec=codec,
        manifest=specs,
        shards=tuple(shards),
        total_bytes=sum(s.compressed_bytes for s in shards),
        digest=digest_of_digests(codec.digest, [s.digest for s in shards]),
    )


_Job = tuple[int, U8Array, DType]


def _chain_first(
    first: tuple[bytes, bytes], rest: Iterator[tuple[bytes, bytes]]
) -> Iterator[tuple[bytes, bytes]]:
    yield first
    yield from rest


def _encode_block(job: _Job, codec: Codec, manifest: tuple[TensorSpec, ...]) -> tuple[bytes, bytes]:
    tensor, block, dtype = job
    if codec.byte_shuffle:
        data = shuffle(block, itemsize(dtype), thread_scratch("planes", block.size))
    else:
        data = block
    # The shuffled top byte plane (a quarter of an fp32 block, in cache) settles finiteness for
    # real deltas; the full max/min pass over the block runs only when it cannot.
    if not ((codec.byte_shuffle and top_plane_finite(data, dtype)) or all_finite(block, dtype)):
        raise NonFiniteValues(
            f"tensor {manifest[tensor].name!r} holds NaN or infinity as {dtype.name}; "
            "a delta must be finite (with an fp16 cast, values beyond 65504 overflow)",
            field=manifest[tensor].name,
        )
    return compress_frame(data, codec.byte_shuffle, codec.zstd_level, codec.digest)


class _FlatCache:
    """The flattened wire-dtype form of the tensor being encoded; one at a time."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], specs: tuple[TensorSpec, ...], wire: list[DType]
    ) -> None:
        self._tensors = tensors
        self._specs = specs
        self._wire = wire
        self._index = -1
        self._flat = torch.empty(0)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != self._index:
            tensor = self._tensors[self._specs[index].name]
            if tuple(tensor.shape) != self._specs[index].shape:
                raise ValueError(
                    f"tensor {self._specs[index].name!r} has shape {list(tensor.shape)}; "
                    f"the manifest says {list(self._specs[index].shape)}"
                )
            self._flat = _flat_wire(tensor, self._wire[index])
            self._index = index
        return self._flat

    def get(self, piece: Piece) -> torch.Tensor:
        return self[piece.tensor][piece.start : piece.start + piece.count]


class _SourcePieces:
    """Each piece asked of a PieceSource as its shard is encoded, in the wire dtype."""

    def __init__(self, source: PieceSource, specs: tuple[TensorSpec, ...], wire: list[DType]) -> None:
        self._source = source
        self._specs = specs
        self._wire = wire

    def get(self, piece: Piece) -> torch.Tensor:
        spec = self._specs[piece.tensor]
        values = self._source.piece(spec.name, piece.start, piece.count)
        if values.numel() != piece.count:
            raise ValueError(
                f"tensor {spec.name!r}: asked for {piece.count} elements from {piece.start}, "
                f"the source gave {values.numel()}"
            )
        return _flat_wire(values, self._wire[piece.tensor])


def _blocks(
    pieces: tuple[Piece, ...], flats: _FlatCache | _SourcePieces, wire: list[DType], block_bytes: int
) -> Iterator[_Job]:
    for piece in pieces:
        size = itemsize(wire[piece.tensor])
        data = _as_u8_tensor(flats.get(piece))
        for offset in range(0, piece.count * size, block_bytes):
            yield piece.tensor, data[offset : offset + block_bytes], wire[piece.tensor]


def _flat_wire(tensor: torch.Tensor, wire: DType) -> torch.Tensor:
    flat = tensor.detach().to("cpu").reshape(-1)
    if flat.dtype != to_torch(wire):
        flat = flat.to(to_torch(wire))
    flat = flat.contiguous()
    if flat.numel() <= 1:
        # contiguous() keeps any stride on 0 or 1 elements (numpy's empty arrays, a broadcast
        # scalar), and view(torch.uint8) refuses a stride other than 1; with <= 1 element it is moot.
        flat = flat.as_strided(flat.shape, (1,))
    return flat


def _as_u8_tensor(flat: torch.Tensor) -> U8Array:
    array: U8Array = flat.view(torch.uint8).numpy()
    return array
