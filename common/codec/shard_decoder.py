"""Decode one complete, compressed shard into tensor pieces, with every check before every allocation.

:class:`ShardDecoder` takes the shard's spec (validated by
common.codec.layout.LayoutBuilder) with its bytes; it checks the shard's
digest (taken frame by frame on the codec pool, with the codec's algorithm),
then its frame sizes against the spec, then decompresses,
unshuffles and checks finiteness block by block, several blocks at once on the
pool; :class:`PendingShard` is a shard in flight there. Gathering the shards of
a chunk stream, and decoding a whole payload, live in common.codec.assembler
and common.codec.decoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
import torch

from common.codec.blocks import decode_block, decompress_exact, default_executor
from common.codec.digests import digest_of_digests, frame_digest
from common.codec.layout import expected_frame_sizes, wire_dtypes
from common.codec.shuffle import U8Array
from common.codec.stheader import check_header
from common.delta import PayloadLayout, PayloadSpec, ShardSpec
from common.dtypes import itemsize, to_torch
from common.errors import DataLoss, GdfedError, LimitExceeded, MalformedShard, NonFiniteValues


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
        shard: ShardSpec,
        frames: list[memoryview],
        outputs: list[U8Array],
        futures: list[tuple[int, Future[tuple[bool, bytes]]]],
        header_digest: bytes,
        buffer: memoryview,
    ) -> None:
        self.index = index
        self.shard = shard
        self.buffer = buffer
        self._decoder = decoder
        self._frames = frames
        self._outputs = outputs
        self._futures = futures
        self._header_digest = header_digest

    def done(self) -> bool:
        return all(future.done() for _, future in self._futures)

    def result(self) -> list[DecodedPiece]:
        """The shard's pieces, once every frame decoded and the shard's digest matched.

        Raises DataLoss when the bytes were damaged (even if the damage first
        showed up as a corrupt frame), else the frame's own error.
        """
        layout = self._decoder.spec
        spec = self.shard
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
            self._decoder.check_digest(self.index, spec, self._decoder.frame_digests(self._frames))
            raise failure
        self._decoder.check_digest(self.index, spec, digests)
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
    """Decodes the shards of one payload, given its validated spec (codec, manifest) and each shard's.

    Each frame's digest (the codec's algorithm) is taken by the pool task that
    decompresses it, so hashing runs on every core; a shard's digest (over its
    frame digests) is compared before any of its pieces is returned.
    """

    def __init__(self, spec: PayloadSpec | PayloadLayout, *, executor: Executor | None = None) -> None:
        self.spec = spec if isinstance(spec, PayloadSpec) else spec.spec
        self._wire = wire_dtypes(self.spec.manifest, self.spec.codec)
        self._pool = executor or default_executor()

    def decode(
        self,
        index: int,
        shard: ShardSpec,
        data: bytes | bytearray | memoryview,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> list[DecodedPiece]:
        """Decode shard ``index`` from its compressed bytes (see :meth:`start`)."""
        return self.start(index, shard, data, into).result()

    def start(
        self,
        index: int,
        shard: ShardSpec,
        data: bytes | bytearray | memoryview,
        into: Mapping[str, torch.Tensor] | None = None,
        *,
        scratch: U8Array | None = None,
    ) -> PendingShard:
        """Check shard ``index``'s header frame, then queue its blocks on the pool.

        Args:
            index: which shard of the payload (it names the shard in errors).
            shard: its spec, accepted by a LayoutBuilder (or validate_layout).
            data: exactly that shard's compressed bytes; must stay unchanged until
                the result is taken.
            scratch: optional reusable byte buffer of at least ``scratch_bytes(shard)``;
                pieces are decoded into it back to back (saves page faults on every
                shard) and stay valid until it is reused.
            into: optional destination tensors (contiguous, CPU, manifest shapes and
                dtypes); pieces are written straight into them, so decoding a whole
                payload needs no second copy. On error they may hold partial data.
        """
        spec = shard
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
        sizes = expected_frame_sizes(spec, self.spec)
        try:
            header = decompress_exact(frames[0], sizes[0], f"{where}.frame[0]")
            check_header(header, spec.pieces, self.spec.manifest, self._wire)
        except (MalformedShard, LimitExceeded):
            self.check_digest(index, spec, self.frame_digests(frames))
            raise
        outputs: list[U8Array] = []
        futures: list[tuple[int, Future[tuple[bool, bytes]]]] = []
        block = self.spec.codec.block_bytes
        shuffled = self.spec.codec.byte_shuffle
        algo = self.spec.codec.digest
        used = 0
        for p, piece in enumerate(spec.pieces):
            if scratch is not None and into is None:
                size = piece.count * itemsize(self.spec.manifest[piece.tensor].dtype)
                dest = scratch[used : used + size]
                used += size
            else:
                dest = self._destination(piece.tensor, piece.start, piece.count, into)
            outputs.append(dest)
            wire = self._wire[piece.tensor]
            target = self.spec.manifest[piece.tensor].dtype
            # A block holds block_bytes of wire data; in the destination it spans more after an upcast.
            span = block * itemsize(target) // itemsize(wire)
            for start in range(0, dest.size, span):
                f = len(futures) + 1
                out = dest[start : start + span]
                name = f"{where}.frame[{f}]"
                future = self._pool.submit(decode_block, frames[f], out, wire, target, shuffled, name, algo)
                futures.append((p, future))
        head = frame_digest(algo, frames[0])
        return PendingShard(self, index, spec, frames, outputs, futures, head, view)

    def scratch_bytes(self, shard: ShardSpec) -> int:
        """Bytes a scratch buffer needs for ``shard``'s decoded pieces."""
        return sum(p.count * itemsize(self.spec.manifest[p.tensor].dtype) for p in shard.pieces)

    def frame_digests(self, frames: list[memoryview]) -> list[bytes]:
        """The codec's digest of each frame (on this thread: the path of a shard already found bad)."""
        return [frame_digest(self.spec.codec.digest, f) for f in frames]

    def check_digest(self, index: int, shard: ShardSpec, frame_digests: list[bytes]) -> None:
        """Raise DataLoss unless the frame digests add up to ``shard``'s digest."""
        if digest_of_digests(self.spec.codec.digest, frame_digests) != shard.digest:
            raise DataLoss(
                f"shards[{index}] fails its digest ({self.spec.codec.digest.name.lower()})",
                field=f"shards[{index}].digest",
            )

    def _destination(
        self, tensor: int, start: int, count: int, into: Mapping[str, torch.Tensor] | None
    ) -> U8Array:
        spec = self.spec.manifest[tensor]
        if into is not None:
            flat = into[spec.name].view(-1)[start : start + count]
            array: U8Array = flat.view(torch.uint8).numpy()
            return array
        return np.empty(count * itemsize(spec.dtype), dtype=np.uint8)

    def piece(self, tensor: int, start: int, buf: U8Array) -> DecodedPiece:
        """Wrap decoded bytes (already in the manifest dtype) as a piece."""
        spec = self.spec.manifest[tensor]
        if buf.size == 0:
            return DecodedPiece(tensor, spec.name, start, torch.empty(0, dtype=to_torch(spec.dtype)))
        return DecodedPiece(tensor, spec.name, start, torch.from_numpy(buf).view(to_torch(spec.dtype)))
