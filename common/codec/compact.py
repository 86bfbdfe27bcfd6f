"""Lossy uploads on the wire: the compact tensors a dense fp32 delta travels as, and back.

A lossy upload is an ordinary payload of the delta codec (shards, shuffle,
zstd, hash tree, chunks); only its manifest differs. Each tensor ``NAME`` of
the round's fp32 manifest travels as compact tensors (``Codec.lossy``):

    top-k   NAME:gaps    U32 [k]          the flat indices of the k entries sent,
                                          gap-coded: first index, then differences
            NAME:values  F32 [k]          their values (on the wire per the codec's
                                          cast: BF16 halves them)
    int8    NAME:q       I8  [rows, cols] codes; rows = dim 0 (1 for 0-d and 1-D), cols = numel / rows
            NAME:scale   F32 [rows]       NAME = q · scale, row by row

with k = ``common.lossy.topk_count(numel, topk_fraction)``. Tensors with no
elements travel as they are (nothing to compress). Because k is a function of
(numel, fraction), :func:`wire_manifest` derives the exact manifest a lossy
upload must carry from the round's fp32 manifest and the header's codec, and
``validate_layout(..., expected=wire_manifest(...))`` checks names, shapes and
dtypes as it does for exact uploads: a wrong k or a scale of the wrong shape
is refused before a payload byte is read. Gap-coded indices are small
numbers whose high byte planes are all zero: after the byte shuffle, zstd
shrinks them to about one byte each.

The worker side is :func:`compact_tensor` (one compensated tensor to its wire
tensors plus the dense fp32 tensor the aggregator will add, so error feedback
accounts for exactly what is received, cast rounding included).

The receiving side is :class:`CompactAssembler`, one per upload. Why an
assembler rather than folding the whole upload at acceptance: the fold path
decodes shards as they complete and folds them into the round's sum; the
compact tensors of one source may span shards (int8 codes of a large
embedding exceed a 32 MiB shard), so the assembler copies each decoded piece
into its compact tensor and hands back a source only when all of its parts
have arrived. The dedup (upload, shard) of ``server.accumulation`` stays
valid: a shard is given to the assembler exactly once per upload, and a
source is folded exactly once, when its last part arrives. The assembler
lives in the round's accumulation, so a stream cut and resumed against the
same process keeps the parts received; after a daemon restart the
accumulation is new and the resumed session replays the upload from its
spool shard 0 onwards, filling a fresh assembler. Memory is the compact
parts of the sources in progress (at most the ones a shard boundary cuts,
plus one shard's) and a dense range of at most ``DENSE_CHUNK`` elements at
a time: a source is never densified whole (:meth:`Expansion.ranges`).

Before a source is handed over, its compact data is checked: indices
strictly increasing (no gap of 0 after the first) and below numel; values
and scales finite. A failure raises InvalidArgument naming the tensor, and
nothing of that source reaches the sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import torch

from common.codec.decoder import DecodedPiece, ShardDecoder
from common.codec.layout import DEFAULT_LIMITS, DecodeLimits, validate_layout
from common.delta import Codec, Lossy, PayloadLayout, PayloadSpec, TensorSpec
from common.dtypes import DType, is_float, itemsize, to_torch
from common.errors import InvalidArgument, ManifestMismatch
from common.lossy import MAX_NUMEL, Quantized, dequantize, quantize_int8, top_k, topk_count

GAPS, VALUES, Q, SCALE = ":gaps", ":values", ":q", ":scale"
# Elements of dense fp32 produced at a time when a compact tensor is expanded (16 MiB).
DENSE_CHUNK = 1 << 22


def is_lossy(codec: Codec) -> bool:
    """Whether tensors travel in a compact form under ``codec``."""
    return codec.lossy is not Lossy.NONE


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) an int8 tensor of ``shape`` is quantized as: dim 0 against the rest."""
    numel = math.prod(shape)
    if len(shape) >= 2:
        return int(shape[0]), (numel // shape[0] if shape[0] else math.prod(shape[1:]))
    return 1, numel


@dataclass(frozen=True, slots=True)
class Source:
    """One tensor of the round's manifest and the wire tensors it travels as."""

    name: str
    shape: tuple[int, ...]
    form: Lossy  # NONE: travels as itself
    parts: tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan(manifest: Sequence[TensorSpec], codec: Codec) -> tuple[Source, ...]:
    """How each tensor of ``manifest`` travels under ``codec``, in manifest order.

    Raises:
        InvalidArgument: a tensor over 2^32 elements under top-k (indices are u32).
        ValueError: ``codec.topk_fraction`` outside (0, 1] under top-k (validate the codec first).
    """
    sources = []
    for spec in manifest:
        numel = spec.numel
        if codec.lossy is Lossy.NONE or numel == 0 or not is_float(spec.dtype):
            sources.append(Source(spec.name, spec.shape, Lossy.NONE, (spec,)))
        elif codec.lossy is Lossy.TOPK:
            if numel > MAX_NUMEL:
                raise InvalidArgument(
                    f"tensor {spec.name!r} has {numel} elements; top-k indices travel as u32 "
                    f"(at most {MAX_NUMEL})",
                    field=spec.name,
                    limit=MAX_NUMEL,
                )
            k = topk_count(numel, codec.topk_fraction)
            parts = (
                TensorSpec(spec.name + GAPS, DType.U32, (k,)),
                TensorSpec(spec.name + VALUES, DType.F32, (k,)),
            )
            sources.append(Source(spec.name, spec.shape, Lossy.TOPK, parts))
        else:
            rows, cols = rows_cols(spec.shape)
            parts = (
                TensorSpec(spec.name + Q, DType.I8, (rows, cols)),
                TensorSpec(spec.name + SCALE, DType.F32, (rows,)),
            )
            sources.append(Source(spec.name, spec.shape, Lossy.INT8, parts))
    return tuple(sources)


def wire_manifest(manifest: Sequence[TensorSpec], codec: Codec) -> tuple[TensorSpec, ...]:
    """The manifest an upload of the fp32 ``manifest`` carries under ``codec`` (itself when not lossy).

    Raises:
        InvalidArgument: two wire names collide (a tensor already named ``x:gaps`` next to ``x``),
            or a tensor too large for top-k.
    """
    if not is_lossy(codec):
        return tuple(manifest)
    out = tuple(part for source in plan(manifest, codec) for part in source.parts)
    names: set[str] = set()
    for spec in out:
        if spec.name in names:
            raise InvalidArgument(
                f"the compact name {spec.name!r} collides with another tensor's; "
                "this model cannot use a lossy codec",
                field="manifest",
            )
        names.add(spec.name)
    return out


# ---------------------------------------------------------------- worker side


def compact_tensor(name: str, x: torch.Tensor, codec: Codec) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The wire tensors of ``x`` (fp32, the compensated e + Δ) and the dense fp32 tensor they decode to.

    Float parts are rounded through their wire dtype here (the encoder's cast
    is then exact), so the second result is bit for bit what the aggregator
    adds. Under int8 with a cast, each row's scale is rounded *up* to the wire
    dtype before quantizing, so codes stay within ±127 and the scale travels
    exactly.

    Raises:
        ValueError: NaN or infinity in ``x``; a codec that is not lossy.
    """
    x = x.detach().to("cpu", torch.float32)
    if not is_lossy(codec):
        raise ValueError(f"codec {codec.name} is not lossy")
    if x.numel() == 0:
        return {name: x}, x
    wire = to_torch(codec.wire_dtype(DType.F32))
    if codec.lossy is Lossy.TOPK:
        s = top_k(x, codec.topk_fraction)
        values = s.values.to(wire).to(torch.float32)
        sent = torch.zeros(s.numel, dtype=torch.float32)
        index = torch.from_numpy(s.indices.astype(np.int64, copy=False))
        sent[index] = values
        gaps = np.diff(s.indices.astype(np.int64, copy=False), prepend=0).astype(np.uint32)
        return {name + GAPS: torch.from_numpy(gaps), name + VALUES: values}, sent.reshape(x.shape)
    qz = quantize_int8(x)
    q, scale = qz.q, qz.scale
    if wire != torch.float32:
        scale = _round_up(scale, wire)
        rows = x.reshape(q.shape)
        q = torch.round(rows / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    sent = dequantize(Quantized(q=q, scale=scale, shape=tuple(x.shape)))
    return {name + Q: q, name + SCALE: scale}, sent


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each (non-negative) scale as the smallest value of ``dtype`` not below it, in fp32."""
    low = scale.to(dtype)
    below = low.to(torch.float32) < scale
    if bool(below.any()):
        # For non-negative floats the next representable value up is the next bit pattern.
        bits = low.view(torch.int16).clone()
        bits[below] += 1
        low = bits.view(dtype)
    return low.to(torch.float32)


# ---------------------------------------------------------------- receiving side


@dataclass(eq=False)
class Expansion:
    """A source tensor whose compact parts are complete and checked; :meth:`ranges` expands it."""

    source: Source
    parts: list[npt.NDArray[np.generic]]
    offset: int = 0  # a tensor that travels as itself comes piece by piece: where this one starts
    dense: torch.Tensor | None = None  # ...and this piece's values (valid until the decoder reuses them)

    @property
    def name(self) -> str:
        return self.source.name

    def ranges(self, chunk: int = DENSE_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, dense fp32 values) of the flattened tensor, at most ``chunk`` elements at a time."""
        src = self.source
        if src.form is Lossy.NONE:
            assert self.dense is not None
            yield self.offset, self.dense
        elif src.form is Lossy.TOPK:
            indices, values = self.parts[0], torch.from_numpy(self.parts[1])
            for begin in range(0, src.numel, chunk):
                end = min(src.numel, begin + chunk)
                lo, hi = (int(i) for i in np.searchsorted(indices, [begin, end]))
                out = torch.zeros(end - begin, dtype=torch.float32)
                if hi > lo:
                    out[torch.from_numpy(indices[lo:hi] - begin)] = values[lo:hi]
                yield begin, out
        else:
            q, scale = torch.from_numpy(self.parts[0]), torch.from_numpy(self.parts[1])
            rows, cols = src.parts[0].shape
            step = max(1, chunk // max(1, cols))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                # The same product as common.lossy.dequantize, so the sum matches the worker's account.
                yield r0 * cols, (q[r0:r1].to(torch.float32) * scale[r0:r1, None]).reshape(-1)


@dataclass(eq=False)
class _Partial:
    source: Source
    buffers: list[npt.NDArray[np.uint8]]
    missing: int  # elements of the parts not yet received


class CompactAssembler:
    """Gathers one upload's decoded pieces into compact tensors; returns each source once complete.

    ``layout`` (the header's spec, or a stored layout) should already be
    validated against ``wire_manifest(manifest, codec)`` (so k, rows and cols
    are right); ``manifest`` is the round's fp32
    manifest, of which the upload may carry a subset of whole tensors. Pieces
    of tensors that travel as themselves pass through as ranges without a
    copy (fold them before the decoder reuses its buffers); compact parts are
    copied, since they wait for the rest of their tensor.
    """

    def __init__(self, layout: PayloadSpec | PayloadLayout, manifest: Sequence[TensorSpec]) -> None:
        self.layout = layout
        self._where: dict[int, tuple[Source, int]] = {}  # wire tensor index -> (source, part)
        index = {spec.name: i for i, spec in enumerate(layout.manifest)}
        self._left = 0
        # The round's manifest may hold more tensors than this upload (a FedCyBGD site sends its
        # block): a source is expected when any of its parts is in the layout, and then all are.
        for source in plan(manifest, layout.codec):
            present = [part.name in index for part in source.parts]
            if not any(present):
                continue
            if not all(present) or any(layout.manifest[index[p.name]] != p for p in source.parts):
                raise ManifestMismatch(
                    f"the manifest does not carry {source.name!r} as {layout.codec.name} requires "
                    f"({', '.join(p.name for p in source.parts)})",
                    field="manifest",
                )
            for p, part in enumerate(source.parts):
                self._where[index[part.name]] = (source, p)
            self._left += 1
        if len(self._where) != len(layout.manifest):
            stray = next(s.name for i, s in enumerate(layout.manifest) if i not in self._where)
            raise ManifestMismatch(
                f"the manifest names {stray!r}, which the round does not train", field="manifest"
            )
        self._partial: dict[str, _Partial] = {}
        self._dense: dict[str, int] = {}  # elements received of tensors that travel as themselves

    @property
    def finished(self) -> bool:
        """Whether every source has been handed over."""
        return self._left == 0

    def add(self, pieces: Iterable[DecodedPiece]) -> list[Expansion]:
        """Take one shard's pieces; return the sources they complete, checked, in completion order.

        Raises:
            InvalidArgument: a completed source's compact data is invalid (naming the tensor).
        """
        done: list[Expansion] = []
        for piece in pieces:
            source, p = self._where[piece.tensor]
            if source.form is Lossy.NONE:
                # A tensor that travels as itself: each piece is a range of it, folded as it comes.
                done.append(Expansion(source, [], offset=piece.start, dense=piece.values))
                seen = self._dense.get(source.name, 0) + piece.values.numel()
                self._dense[source.name] = seen
                if seen == source.numel:
                    self._left -= 1
                continue
            partial = self._partial.get(source.name)
            if partial is None:
                partial = self._partial[source.name] = _Partial(
                    source,
                    [np.empty(part.nbytes, dtype=np.uint8) for part in source.parts],
                    sum(part.numel for part in source.parts),
                )
            size = itemsize(source.parts[p].dtype)
            raw = piece.values.contiguous().view(torch.uint8).numpy()
            partial.buffers[p][piece.start * size : piece.start * size + raw.size] = raw
            partial.missing -= piece.values.numel()
            if partial.missing == 0:
                del self._partial[source.name]
                self._left -= 1
                done.append(_checked(source, partial.buffers))
        return done


def _checked(source: Source, buffers: list[npt.NDArray[np.uint8]]) -> Expansion:
    name = source.name
    if source.form is Lossy.TOPK:
        gaps = buffers[0].view(np.uint32)
        values = buffers[1].view(np.float32)
        indices = np.cumsum(gaps, dtype=np.int64)
        if gaps.size > 1 and int(gaps[1:].min()) == 0:
            i = int(np.argmin(gaps[1:])) + 1
            raise InvalidArgument(
                f"tensor {name!r}: index {indices[i]} at position {i} repeats (gap 0); indices must increase",
                field=name + GAPS,
            )
        if indices.size and indices[-1] >= source.numel:
            raise InvalidArgument(
                f"tensor {name!r}: index {indices[-1]} is not below numel={source.numel}",
                field=name + GAPS,
                limit=source.numel,
            )
        if not bool(np.isfinite(values).all()):
            raise InvalidArgument(f"tensor {name!r}: values hold NaN or infinity", field=name + VALUES)
        return Expansion(source, [indices, values])
    q = buffers[0].view(np.int8).reshape(source.parts[0].shape)
    scale = buffers[1].view(np.float32)
    if not bool(np.isfinite(scale).all()):
        raise InvalidArgument(f"tensor {name!r}: scale holds NaN or infinity", field=name + SCALE)
    return Expansion(source, [q, scale])


def decode_dense(
    layout: PayloadLayout,
    source: BinaryIO,
    manifest: Sequence[TensorSpec],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    wanted: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The dense fp32 tensors of a (lossy or exact) payload in a file, shaped as the round's ``manifest``.

    For readers that need whole tensors (a FlexLoRA module, a test): the
    payload is validated against ``wire_manifest(manifest, layout.codec)``
    and decoded shard by shard; only ``wanted`` sources (default: all) are
    kept.
    """
    validate_layout(layout, limits, wire_manifest(manifest, layout.codec))
    keep = None if wanted is None else set(wanted)
    specs = {spec.name: spec for spec in manifest}
    out: dict[str, torch.Tensor] = {}
    assembler = CompactAssembler(layout, manifest)
    decoder = ShardDecoder(layout.spec)
    source.seek(0)
    for index, shard in enumerate(layout.shards):
        data = source.read(shard.compressed_bytes)
        for exp in assembler.add(decoder.decode(index, shard, data)):
            if keep is not None and exp.name not in keep:
                continue
            spec = specs[exp.name]
            if exp.name not in out:
                out[exp.name] = torch.empty(spec.shape, dtype=to_torch(spec.dtype))
            flat = out[exp.name].view(-1)
            for start, values in exp.ranges():
                flat[start : start + values.numel()] = values
    return out
