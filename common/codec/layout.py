"""Shard planning (encoder side) and layout validation (decoder side).

The header carries the codec and the manifest (a PayloadSpec), checked by
:func:`validate_spec` before a single payload byte is read; every shard's spec
follows with its last chunk and is checked by :class:`LayoutBuilder` against
the manifest and the shards before it, before any of its bytes is decoded.
Every size the decoder later trusts (frame sizes, decompressed sizes, piece
ranges) is checked here against the manifest and the limits, and every size a
receiver buffers before a spec arrives is bounded here (:meth:`LayoutBuilder.shard_bound`,
:func:`total_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.codec.digests import DIGEST_BYTES, check_algo, digest_of_digests
from common.delta import (
    GIB,
    MAX_BLOCK_BYTES,
    MIB,
    MIN_BLOCK_BYTES,
    Codec,
    Lossy,
    PayloadLayout,
    PayloadSpec,
    Piece,
    ShardSpec,
    TensorSpec,
)
from common.dtypes import DType, itemsize
from common.errors import DataLoss, InvalidArgument, LimitExceeded, MalformedShard, ManifestMismatch


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    """Hard limits a receiver enforces before it allocates or decompresses anything."""

    max_total_bytes: int = 64 * GIB
    max_decoded_bytes: int = 256 * GIB
    max_shard_raw_bytes: int = 256 * MIB
    max_chunk_bytes: int = 1 * MIB
    max_tensors: int = 1_000_000
    max_name_bytes: int = 512
    max_dims: int = 8
    max_tensor_elements: int = 1 << 40


DEFAULT_LIMITS = DecodeLimits()
DEFAULT_SHARD_BYTES = 32 * MIB
# What the aggregator publishes with (global differences, snapshots). A worker applying a download
# holds about one compressed and one decoded shard besides its one copy of the state: at 32 MiB
# that was 0.3x a GPT-2-small state on top (docs/worker.md); 8 MiB keeps it near 0.1x, and 8 MiB
# still gives the decoder's threads whole shards to work on.
BROADCAST_SHARD_BYTES = 8 * MIB


def frame_bound(raw_size: int) -> int:
    """Largest compressed size a zstd frame of ``raw_size`` bytes can have (ZSTD_compressBound, rounded up)."""
    return raw_size + (raw_size >> 8) + 1024


def header_bound(pieces: int, max_name_bytes: int) -> int:
    """Largest safetensors header we accept for a shard of ``pieces`` entries."""
    # JSON may escape a name byte into up to 6 characters; the rest of an entry is < 128.
    return 8 + 64 + pieces * (6 * max_name_bytes + 128)


def wire_dtypes(manifest: Sequence[TensorSpec], codec: Codec) -> list[DType]:
    """The dtype each tensor of the manifest travels in."""
    return [codec.wire_dtype(t.dtype) for t in manifest]


def block_sizes(nbytes: int, block_bytes: int) -> list[int]:
    """Sizes of the blocks (one zstd frame each) a piece of ``nbytes`` bytes is cut into."""
    full, rest = divmod(nbytes, block_bytes)
    return [block_bytes] * full + ([rest] if rest else [])


def plan_shards(
    manifest: Sequence[TensorSpec], codec: Codec, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[tuple[Piece, ...]]:
    """Cut the manifest's tensors into pieces and group them into shards of <= ``shard_bytes`` data.

    Tensors keep their order; a tensor larger than what is left of a shard is
    split, so a shard never exceeds the bound however large one tensor is.
    """
    if shard_bytes < 8:
        raise ValueError(f"shard_bytes must be at least 8, got {shard_bytes}")
    wire = wire_dtypes(manifest, codec)
    shards: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    room = shard_bytes
    for index, spec in enumerate(manifest):
        size = itemsize(wire[index])
        numel = spec.numel
        if numel == 0:
            current.append(Piece(index, 0, 0))
            continue
        start = 0
        while start < numel:
            take = min(numel - start, room // size)
            if take == 0:
                shards.append(tuple(current))
                current, room = [], shard_bytes
                continue
            current.append(Piece(index, start, take))
            start += take
            room -= take * size
    if current:
        shards.append(tuple(current))
    return shards


def validate_codec(codec: Codec) -> None:
    """Raise InvalidArgument for a codec this decoder cannot or will not run."""
    check_algo(codec.digest)
    if not (MIN_BLOCK_BYTES <= codec.block_bytes <= MAX_BLOCK_BYTES) or codec.block_bytes % 8:
        raise InvalidArgument(
            f"codec.block_bytes is {codec.block_bytes}; must be a multiple of 8 between "
            f"{MIN_BLOCK_BYTES} and {MAX_BLOCK_BYTES}",
            field="codec.block_bytes",
            limit=MAX_BLOCK_BYTES,
        )
    fraction = codec.topk_fraction
    if codec.lossy is Lossy.TOPK and not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise InvalidArgument(
            f"codec.topk_fraction is {fraction}; with lossy = topk it must be in (0, 1]",
            field="codec.topk_fraction",
            limit=1.0,
        )
    if codec.lossy is not Lossy.TOPK and fraction != 0.0:
        raise InvalidArgument(
            f"codec.topk_fraction is {fraction}; it must be 0 unless lossy = topk "
            f"(lossy is {codec.lossy.name.lower()})",
            field="codec.topk_fraction",
        )


def validate_manifest(
    manifest: Sequence[TensorSpec], limits: DecodeLimits, expected: Sequence[TensorSpec] | None
) -> None:
    """Raise unless the manifest is sane, within limits, and (if given) exactly ``expected``."""
    if len(manifest) > limits.max_tensors:
        raise LimitExceeded(
            f"manifest has {len(manifest)} tensors; the limit is {limits.max_tensors}",
            field="manifest",
            limit=limits.max_tensors,
        )
    names: set[str] = set()
    decoded = 0
    for i, spec in enumerate(manifest):
        field = f"manifest[{i}]"
        if not spec.name or len(spec.name.encode()) > limits.max_name_bytes:
            raise InvalidArgument(
                f"{field}.name must be 1..{limits.max_name_bytes} bytes of UTF-8",
                field=f"{field}.name",
                limit=limits.max_name_bytes,
            )
        if spec.name == "__metadata__" or spec.name in names:
            raise InvalidArgument(
                f"{field}.name {spec.name!r} is reserved or repeated", field=f"{field}.name"
            )
        names.add(spec.name)
        if len(spec.shape) > limits.max_dims:
            raise LimitExceeded(
                f"{field} ({spec.name!r}) has {len(spec.shape)} dimensions; the limit is {limits.max_dims}",
                field=f"{field}.shape",
                limit=limits.max_dims,
            )
        if any(d < 0 for d in spec.shape) or spec.numel > limits.max_tensor_elements:
            raise LimitExceeded(
                f"{field} ({spec.name!r}) has shape {list(spec.shape)}; at most "
                f"{limits.max_tensor_elements} elements are allowed",
                field=f"{field}.shape",
                limit=limits.max_tensor_elements,
            )
        decoded += spec.nbytes
    if decoded > limits.max_decoded_bytes:
        raise LimitExceeded(
            f"manifest decodes to {decoded} bytes; the limit is {limits.max_decoded_bytes}",
            field="manifest",
            limit=limits.max_decoded_bytes,
        )
    # Order is the sender's business (safetensors files sort their keys); names, dtypes and shapes are not.
    if expected is not None and sorted(manifest, key=_name) != sorted(expected, key=_name):
        raise ManifestMismatch(_describe_mismatch(manifest, expected), field="manifest")


def _name(spec: TensorSpec) -> str:
    return spec.name


def _describe_mismatch(got: Sequence[TensorSpec], want: Sequence[TensorSpec]) -> str:
    have = {t.name: t for t in got}
    need = {t.name: t for t in want}
    missing = [name for name in need if name not in have]
    if missing:
        return f"manifest lacks {len(missing)} tensor(s) the round trains, e.g. {missing[0]!r}"
    extra = [name for name in have if name not in need]
    if extra:
        return f"manifest has {len(extra)} tensor(s) the round does not train, e.g. {extra[0]!r}"
    for name, g in have.items():
        w = need[name]
        if g != w:
            return (
                f"tensor {name!r} is {g.dtype.name} {list(g.shape)} in the manifest; "
                f"the round expects {w.dtype.name} {list(w.shape)}"
            )
    return "manifest differs from the round's"


def validate_spec(
    spec: PayloadSpec,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[TensorSpec] | None = None,
) -> None:
    """Raise a typed error unless the header's codec and manifest are sane, within limits, and as ``expected``."""
    validate_codec(spec.codec)
    validate_manifest(spec.manifest, limits, expected)


def total_bound(spec: PayloadSpec, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    """The largest payload a (validated) ``spec`` allows: no stream of it may run past this.

    Every accepted shard has ``compressed_bytes <= frame_bound(raw_bytes)`` and a
    header of at most ``header_bound(pieces)``; a sender may cut a shard after
    every element, so the bound counts a shard (and a piece) per element. For
    any real manifest ``limits.max_total_bytes`` is the smaller, and decides.
    """
    wire = wire_dtypes(spec.manifest, spec.codec)
    data = sum(t.numel * itemsize(w) for t, w in zip(spec.manifest, wire, strict=True))
    units = sum(max(t.numel, 1) for t in spec.manifest)
    raw = data + units * header_bound(1, limits.max_name_bytes)
    return min(limits.max_total_bytes, raw + (raw >> 8) + 1024 * units)


class LayoutBuilder:
    """Accepts a payload's shard specs one at a time, in order, each checked before any of its bytes is used.

    Each shard is checked on its own (digest length, raw size against the
    limit and its header, frame count and sizes, compressed size) and against
    the shards before it: the pieces of all shards, in order, must continue
    each other through the manifest in its order, every element once.
    :meth:`finish` checks that the manifest is covered and returns the
    layout. Field names in errors are those of the whole layout
    (``shards[3].frame_bytes``).

    ``shards``: specs accepted before (a resumed upload's), checked again here.
    """

    def __init__(
        self, spec: PayloadSpec, limits: DecodeLimits = DEFAULT_LIMITS, shards: Sequence[ShardSpec] = ()
    ) -> None:
        self.spec = spec
        self.limits = limits
        self._wire = wire_dtypes(spec.manifest, spec.codec)
        self._left = sum(t.numel * itemsize(w) for t, w in zip(spec.manifest, self._wire, strict=True))
        self._shards: list[ShardSpec] = []
        # The next piece must be element ``_covered`` of tensor ``_tensor`` (every tensor has a piece,
        # one of 0 elements for an empty one).
        self._tensor = 0
        self._covered = 0
        self.end = 0
        for shard in shards:
            self.add(shard)

    @property
    def shards(self) -> tuple[ShardSpec, ...]:
        """The specs accepted so far, in order."""
        return tuple(self._shards)

    def shard_bound(self) -> int:
        """Most compressed bytes the next shard may have: its raw size is bounded by the limit and by
        what is left of the manifest (its data, and a header of one entry per tensor left)."""
        raw = self._left + header_bound(len(self.spec.manifest) - self._tensor, self.limits.max_name_bytes)
        return frame_bound(min(raw, self.limits.max_shard_raw_bytes))

    def add(self, shard: ShardSpec) -> int:
        """Check the next shard's spec; return its index. Nothing changes when it is refused."""
        s = len(self._shards)
        field = f"shards[{s}]"
        if len(shard.digest) != DIGEST_BYTES:
            raise InvalidArgument(
                f"{field}.digest is {len(shard.digest)} bytes; must be {DIGEST_BYTES}",
                field=f"{field}.digest",
            )
        if not shard.pieces:
            raise MalformedShard(f"{field} has no pieces", field=f"{field}.pieces")
        limits = self.limits
        if shard.raw_bytes > limits.max_shard_raw_bytes:
            raise LimitExceeded(
                f"{field}.raw_bytes is {shard.raw_bytes}; the limit is {limits.max_shard_raw_bytes}",
                field=f"{field}.raw_bytes",
                limit=limits.max_shard_raw_bytes,
            )
        manifest = self.spec.manifest
        tensor, covered = self._tensor, self._covered
        data = 0
        frames_expected = [0]  # frame 0, the header; its size is checked below
        names: set[int] = set()
        for p, piece in enumerate(shard.pieces):
            pf = f"{field}.pieces[{p}]"
            if not 0 <= piece.tensor < len(manifest):
                raise MalformedShard(
                    f"{pf}.tensor is {piece.tensor}; the manifest has {len(manifest)}", field=pf
                )
            spec = manifest[piece.tensor]
            if piece.tensor in names:
                raise MalformedShard(f"{pf}: tensor {spec.name!r} appears twice in one shard", field=pf)
            names.add(piece.tensor)
            if piece.tensor != tensor:
                want = (
                    f"element {covered} of tensor {tensor} ({manifest[tensor].name!r})"
                    if tensor < len(manifest)
                    else "nothing: every tensor is covered"
                )
                raise MalformedShard(
                    f"{pf} is of tensor {piece.tensor} ({spec.name!r}); pieces continue the manifest "
                    f"in its order, and what comes next is {want}",
                    field=pf,
                )
            if piece.start != covered or piece.count < 0:
                raise MalformedShard(
                    f"{pf} starts at element {piece.start} of {spec.name!r}; the next uncovered one is "
                    f"{covered} (pieces must be contiguous, in order, without overlap)",
                    field=pf,
                )
            if piece.start + piece.count > spec.numel or (piece.count == 0 and spec.numel != 0):
                raise MalformedShard(
                    f"{pf} covers elements {piece.start}..{piece.start + piece.count} of {spec.name!r}, "
                    f"which has {spec.numel}",
                    field=pf,
                )
            covered += piece.count
            if covered == spec.numel:
                tensor, covered = tensor + 1, 0
            nbytes = piece.count * itemsize(self._wire[piece.tensor])
            data += nbytes
            if data >= shard.raw_bytes:
                # Checked before listing this piece's frames: a lying spec must not cost memory.
                raise MalformedShard(
                    f"{field}: its pieces hold {data} bytes or more, but raw_bytes is {shard.raw_bytes} "
                    "(which must also hold the safetensors header)",
                    field=f"{field}.raw_bytes",
                )
            frames_expected += block_sizes(nbytes, self.spec.codec.block_bytes)
        header_size = shard.raw_bytes - data
        hbound = header_bound(len(shard.pieces), limits.max_name_bytes)
        if not 8 < header_size <= hbound:
            raise MalformedShard(
                f"{field}.raw_bytes is {shard.raw_bytes} with {data} bytes of tensor data, leaving "
                f"{header_size} bytes of safetensors header; must be 9..{hbound}",
                field=f"{field}.raw_bytes",
                limit=hbound,
            )
        frames_expected[0] = header_size
        if len(shard.frame_bytes) != len(frames_expected):
            raise MalformedShard(
                f"{field} lists {len(shard.frame_bytes)} frames; its pieces need {len(frames_expected)}",
                field=f"{field}.frame_bytes",
            )
        for f, (size, raw) in enumerate(zip(shard.frame_bytes, frames_expected, strict=True)):
            if not 0 < size <= frame_bound(raw):
                raise MalformedShard(
                    f"{field}.frame_bytes[{f}] is {size} for {raw} decoded bytes; must be 1..{frame_bound(raw)}",
                    field=f"{field}.frame_bytes[{f}]",
                    limit=frame_bound(raw),
                )
        if sum(shard.frame_bytes) != shard.compressed_bytes:
            raise MalformedShard(
                f"{field}.compressed_bytes is {shard.compressed_bytes} but its frames add up to "
                f"{sum(shard.frame_bytes)}",
                field=f"{field}.compressed_bytes",
            )
        if shard.compressed_bytes > frame_bound(shard.raw_bytes):
            # What a receiver buffered for the shard before this spec came was bounded so (shard_bound).
            raise MalformedShard(
                f"{field}.compressed_bytes is {shard.compressed_bytes} for {shard.raw_bytes} decoded bytes; "
                f"must be at most {frame_bound(shard.raw_bytes)}",
                field=f"{field}.compressed_bytes",
                limit=frame_bound(shard.raw_bytes),
            )
        self._tensor, self._covered = tensor, covered
        self._left -= data
        self._shards.append(shard)
        self.end += shard.compressed_bytes
        return s

    @property
    def complete(self) -> bool:
        """Whether the accepted shards cover the whole manifest."""
        return self._tensor == len(self.spec.manifest)

    def finish(self) -> PayloadLayout:
        """The layout of the accepted shards, which must cover every element of the manifest."""
        if not self.complete:
            spec = self.spec.manifest[self._tensor]
            raise MalformedShard(
                f"pieces cover {self._covered} of {spec.numel} elements of {spec.name!r} "
                f"(manifest[{self._tensor}])",
                field=f"manifest[{self._tensor}]",
            )
        return PayloadLayout(
            codec=self.spec.codec,
            manifest=self.spec.manifest,
            shards=tuple(self._shards),
            total_bytes=self.end,
            digest=digest_of_digests(self.spec.codec.digest, [s.digest for s in self._shards]),
        )


def validate_layout(
    layout: PayloadLayout,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[TensorSpec] | None = None,
) -> None:
    """Raise a typed error unless every size, range and digest of a complete (stored) ``layout`` is consistent
    and within limits: :func:`validate_spec`, then each shard through a :class:`LayoutBuilder`."""
    validate_spec(layout.spec, limits, expected)
    if len(layout.digest) != DIGEST_BYTES:
        raise InvalidArgument(f"digest is {len(layout.digest)} bytes; must be {DIGEST_BYTES}", field="digest")
    if layout.total_bytes > limits.max_total_bytes:
        raise LimitExceeded(
            f"total_bytes is {layout.total_bytes}; the limit is {limits.max_total_bytes}",
            field="total_bytes",
            limit=limits.max_total_bytes,
        )
    built = LayoutBuilder(layout.spec, limits, layout.shards).finish()
    if built.digest != layout.digest:
        raise DataLoss("digest does not match the shards' digests", field="digest")
    if built.total_bytes != layout.total_bytes:
        raise InvalidArgument(
            f"total_bytes is {layout.total_bytes} but the shards add up to {built.total_bytes}",
            field="total_bytes",
        )


def expected_frame_sizes(shard: ShardSpec, spec: PayloadSpec | PayloadLayout) -> list[int]:
    """Decoded size of each frame of a (validated) shard: the header, then each block."""
    wire = wire_dtypes(spec.manifest, spec.codec)
    sizes: list[int] = []
    data = 0
    for piece in shard.pieces:
        nbytes = piece.count * itemsize(wire[piece.tensor])
        data += nbytes
        sizes += block_sizes(nbytes, spec.codec.block_bytes)
    return [shard.raw_bytes - data, *sizes]
