"""Lossy compact forms of a dense fp32 weight delta (top-k sparse, int8 per row), with error feedback.

Error feedback (Stich et al., arXiv 1809.07599; Karimireddy et al., arXiv 1901.09847),
per tensor and per round, with C the compressor (top-k or int8):

    e ← e + Δ        ErrorFeedback.compensate(name, Δ)   (e starts at 0)
    c = C(e)         top_k(e, fraction) or quantize_int8(e)
    send c           what the server adds is densify(c) or dequantize(c)
    e ← e − c        ErrorFeedback.update(name, e, sent)

so after T rounds Σ sent = Σ Δ − e_T: what a round leaves out is delayed, not lost.
``compress_delta`` runs this sequence over a whole delta.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.torch
import torch
import zstandard

from common.codec.shuffle import shuffle, unshuffle_into
from common.files import fsync_dir, fsync_file

IndexArray = npt.NDArray[np.int64] | npt.NDArray[np.uint32]

_FILE_FORMAT = "gdfed-error-feedback-v1"
MAX_NUMEL = 1 << 32  # indices and gaps travel as uint32
_MAX_NDIM = 8
_MAGIC = b"GDTK"
_VERSION = 1
# magic, version, value dtype code, ndim, numel, k; then ndim u64 dims; all little-endian.
_HEADER = struct.Struct("<4sBBHQQ")
_VALUE_DTYPES: dict[str, tuple[int, torch.dtype]] = {"bf16": (1, torch.bfloat16), "fp32": (2, torch.float32)}
_ZSTD_LEVEL = 1
# Sampled threshold for top-k: worth it only on large tensors (below, a full partition is as fast).
_SAMPLE = 1 << 16
_SAMPLE_MIN_NUMEL = 1 << 20
_SAMPLE_SEED = 0x70B4


class ErrorFeedback:
    """The per-tensor residual e (fp32, CPU) that error feedback carries from round to round."""

    def __init__(self) -> None:
        self._residual: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """Return e + Δ for tensor ``name`` as a new fp32 tensor (e is 0 for a name not seen yet)."""
        d = delta.detach().to("cpu", torch.float32)
        e = self._residual.get(name)
        if e is None:
            return d.clone()
        if e.shape != d.shape:
            raise ValueError(
                f"delta {name!r} has shape {list(d.shape)}, but its residual has {list(e.shape)}; "
                "a tensor must keep its shape across rounds (clear the feedback state if the model changed)"
            )
        return e + d

    def update(self, name: str, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """Set e ← compensated − sent: what was not sent is carried to the next round."""
        if compensated.shape != sent.shape:
            raise ValueError(
                f"{name!r}: sent has shape {list(sent.shape)}, compensated has {list(compensated.shape)}"
            )
        c = compensated.detach().to("cpu", torch.float32)
        self._residual[name] = torch.sub(c, sent.detach().to("cpu", torch.float32)).contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residuals by name. ``update`` replaces tensors rather than mutating them, so this is a snapshot."""
        return dict(self._residual)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every residual with a fp32 copy of ``state``'s (validated first: floating and finite)."""
        for name, t in state.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"residual {name!r}: must be a finite floating tensor, got {t.dtype}")
        self._residual = {
            n: t.detach().to("cpu", torch.float32).clone().contiguous() for n, t in state.items()
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the residuals as a safetensors file: temporary name, fsync, rename, so a crash leaves old or new."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        safetensors.torch.save_file(self._residual, str(tmp), metadata={"format": _FILE_FORMAT})
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)  # make the rename itself durable

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the residuals with those of a file written by :meth:`save`."""
        with safetensors.safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
            if fmt != _FILE_FORMAT:
                raise ValueError(f"{path}: metadata format is {fmt!r}, expected {_FILE_FORMAT!r}")
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        self.load_state_dict(state)


@dataclass(frozen=True, eq=False)
class Sparse:
    """``numel`` - ``len(indices)`` zeros and ``values`` at ``indices`` (flat, strictly increasing)."""

    numel: int
    shape: tuple[int, ...]
    indices: IndexArray
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.numel != math.prod(self.shape) or self.numel > MAX_NUMEL:
            raise ValueError(f"numel {self.numel} must equal the product of shape {self.shape} and be ≤ 2^32")
        if self.indices.ndim != 1 or self.indices.dtype not in (np.uint32, np.int64):
            raise ValueError(f"indices must be 1-D uint32 or int64, got {self.indices.dtype}")
        if (
            self.values.dtype not in (torch.float32, torch.bfloat16)
            or self.values.shape != self.indices.shape
        ):
            raise ValueError(f"values must be fp32 or bf16 matching indices' length, got {self.values.dtype}")
        _check_indices(self.indices.astype(np.int64, copy=False), self.numel, "indices")
        if not _all_finite(self.values):
            raise ValueError("values: hold NaN or infinity")


def _all_finite(values: torch.Tensor) -> bool:
    """True when no value is NaN or infinity (numpy: torch.isfinite costs ms on small tensors here)."""
    v = values.detach().cpu().contiguous()
    if v.dtype is torch.bfloat16:  # numpy has no bf16: an all-ones exponent is inf or NaN
        return not bool(((v.view(torch.int16).numpy() & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(v.to(torch.float32).numpy()).all())


def _check_indices(idx: npt.NDArray[np.int64], numel: int, field: str) -> None:
    if idx.size == 0:
        return
    if idx[0] < 0:
        raise ValueError(f"{field}: index {idx[0]} at position 0 is negative")
    steps = np.diff(idx)
    if steps.size and steps.min() <= 0:
        i = int(np.argmax(steps <= 0)) + 1
        raise ValueError(f"{field}: index {idx[i]} at position {i} does not exceed the previous {idx[i - 1]}")
    if idx[-1] >= numel:
        raise ValueError(
            f"{field}: index {idx[-1]} is not below numel={numel} (a gap that wraps past 2^32 reads this way)"
        )


def topk_count(numel: int, fraction: float) -> int:
    """k = min(numel, max(1, ⌈fraction·numel⌉)), fraction·numel rounded to 9 decimals first.

    The one definition of k: the worker keeps this many entries and the
    aggregator expects exactly this many (common.codec.compact.wire_manifest).

    Raises:
        ValueError: fraction outside (0, 1] or numel < 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if numel < 1:
        raise ValueError(f"numel must be at least 1, got {numel}")
    return min(numel, max(1, math.ceil(round(fraction * numel, 9))))


def top_k(x: torch.Tensor, fraction: float) -> Sparse:
    """Keep the k = max(1, ⌈fraction·numel⌉) entries of ``x`` of largest magnitude (fp32 values).

    Ties at the k-th magnitude go to the lowest flat indices, whatever the path
    taken, so the result is a pure function of ``x``. fraction·numel is rounded
    to 9 decimals before the ceiling, so 0.07·100 keeps 7 (float arithmetic says
    7.000000000000001). The threshold is the exact k-th largest |x|: on tensors
    of 2^20+ elements it is first bounded from below by a fixed-seed sample of
    2^16 magnitudes (4σ margin), then found exactly among the ~1.2k candidates
    above that bound; a sample that bounds too high falls back to a full
    partition. Measured here (2 cores) at 1%: 8M elements 30–70 ms (torch.topk
    260–380 ms); 124M in one tensor 0.5 s (full partition 1.3 s, torch.topk 5.6 s).
    torch.topk also breaks ties arbitrarily, which real deltas have at the threshold.

    Raises:
        ValueError: fraction outside (0, 1], an empty tensor, or NaN/infinity in ``x``.
    """
    numel = x.numel()
    if not 0 < numel <= MAX_NUMEL:
        raise ValueError(f"x: top_k needs 1 to 2^32 elements, got {numel}")
    k = topk_count(numel, fraction)
    flat = x.detach().to("cpu", torch.float32).reshape(-1).numpy()
    mag = np.abs(flat)
    if not np.isfinite(mag.max()):
        raise ValueError("x: holds NaN or infinity; a delta must be finite")
    idx = _top_indices(mag, k)
    return Sparse(numel=numel, shape=tuple(x.shape), indices=idx, values=torch.from_numpy(flat[idx]))


def _top_indices(mag: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """Sorted flat indices of the k largest entries of ``mag``; ties to the lowest indices."""
    n = mag.size
    if k == n:
        return np.arange(n, dtype=np.int64)
    where: npt.NDArray[np.int64] | None = None  # candidate positions in mag; None: all of them
    cand = mag
    if n >= _SAMPLE_MIN_NUMEL:
        floor = _sampled_floor(mag, k)
        if floor is not None:
            above_floor = np.flatnonzero(mag >= floor)
            if above_floor.size >= k:  # else the sample misled us: use everything
                where, cand = above_floor.astype(np.int64, copy=False), mag[above_floor]
    # Every entry ≥ the floor is a candidate, so the k-th largest and its ties are the same as over all of mag.
    kth = cand[np.argpartition(cand, cand.size - k)[cand.size - k]]
    keep = cand > kth
    ties = np.flatnonzero(cand == kth)[: k - int(np.count_nonzero(keep))]
    keep[ties] = True
    pos = np.flatnonzero(keep).astype(np.int64, copy=False)
    return pos if where is None else where[pos]


def _sampled_floor(mag: npt.NDArray[np.float32], k: int) -> float | None:
    """A magnitude that ≥ k entries reach with high probability (estimated from a sample), or None."""
    expected = _SAMPLE * k / mag.size
    j = math.ceil(expected + 4.0 * math.sqrt(expected) + 4.0)  # sample entries kept: 4σ above the mean
    if j >= _SAMPLE // 2:
        return None  # a large fraction: the candidates would be most of the tensor anyway
    sample = mag[np.random.default_rng(_SAMPLE_SEED).integers(0, mag.size, size=_SAMPLE)]
    return float(np.partition(sample, _SAMPLE - j)[_SAMPLE - j])


def densify(s: Sparse) -> torch.Tensor:
    """The dense fp32 tensor of shape ``s.shape`` that ``s`` stands for."""
    out = torch.zeros(s.numel, dtype=torch.float32)
    out[torch.from_numpy(s.indices.astype(np.int64, copy=False))] = s.values.to(torch.float32)
    return out.reshape(s.shape)


def encode_sparse(s: Sparse, *, value_dtype: str = "bf16") -> bytes:
    """One zstd frame (level 1, content size declared) of the gap-coded sparse tensor.

    Decoded layout, little-endian: ``b"GDTK"``, version u8 (1), value dtype u8
    (1 bf16, 2 fp32), ndim u16, numel u64, k u64, ndim × u64 dims; then k uint32
    gaps (the first index, then differences), byte-plane shuffled; then k values,
    byte-plane shuffled. 24 + 8·ndim + k·(4 + 2 or 4) bytes before zstd.

    Raises:
        ValueError: an unknown ``value_dtype``, more than 8 dims, or a value that overflows bf16.
    """
    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {value_dtype!r}")
    if len(s.shape) > _MAX_NDIM:
        raise ValueError(f"shape: {len(s.shape)} dims, at most {_MAX_NDIM} are encoded")
    code, dtype = _VALUE_DTYPES[value_dtype]
    values = s.values.detach().to("cpu", dtype).contiguous()
    if not _all_finite(values):
        raise ValueError(
            f"values: overflow {value_dtype} (|v| > {torch.finfo(dtype).max:.4g}); send them as fp32"
        )
    k = s.indices.size
    gaps = np.diff(s.indices.astype(np.int64, copy=False), prepend=0).astype("<u4")
    parts = [
        _HEADER.pack(_MAGIC, _VERSION, code, len(s.shape), s.numel, k),
        struct.pack(f"<{len(s.shape)}Q", *s.shape),
        shuffle(gaps.view(np.uint8), 4).tobytes(),
        shuffle(_value_bytes(values), values.element_size()).tobytes(),
    ]
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True).compress(b"".join(parts))


def _value_bytes(values: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Raw little-endian bytes of fp32/bf16 values (via a same-width integer view: an empty
    tensor from numpy has stride 0, which torch refuses to view as bytes)."""
    as_int = values.view(torch.int16 if values.element_size() == 2 else torch.int32).numpy()
    return np.ascontiguousarray(as_int).view(np.uint8)


def decode_sparse(data: bytes | memoryview, *, max_numel: int) -> Sparse:
    """Decode and validate one frame of :func:`encode_sparse`.

    The frame must declare its decoded size, and that size must fit the bound
    implied by ``max_numel`` (24 + 8·8 + 8·max_numel) before anything is
    decompressed, so a zstd bomb costs nothing. Values come back in the dtype
    they travelled in; indices as int64.

    Raises:
        ValueError: naming the field (content_size, magic, version, dtype, ndim,
            shape, numel, k, indices, values) and the limit it broke.
    """
    if not 0 <= max_numel <= MAX_NUMEL:
        raise ValueError(f"max_numel must be in [0, 2^32], got {max_numel}")
    bound = _HEADER.size + 8 * _MAX_NDIM + 8 * max_numel
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"frame: not a zstd frame header (truncated or corrupt: {exc})") from None
    if declared < 0:
        raise ValueError("content_size: the frame does not declare its decoded size; refused without a bound")
    if declared > bound:
        raise ValueError(
            f"content_size: {declared} bytes, over the limit {bound} implied by max_numel={max_numel}"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ValueError(f"frame: truncated or corrupt zstd data ({exc})") from None
    if len(raw) != declared:
        raise ValueError(f"content_size: frame declares {declared} bytes but decodes to {len(raw)}")
    return _parse(raw, max_numel)


def _parse(raw: bytes, max_numel: int) -> Sparse:
    if len(raw) < _HEADER.size:
        raise ValueError(f"header: {len(raw)} bytes, need {_HEADER.size}")
    magic, version, code, ndim, numel, k = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise ValueError(f"magic: {magic!r}, expected {_MAGIC!r}")
    if version != _VERSION:
        raise ValueError(f"version: {version}, this decoder reads {_VERSION}")
    dtype = next((dt for c, dt in _VALUE_DTYPES.values() if c == code), None)
    if dtype is None:
        raise ValueError(f"dtype: code {code}, known codes are 1 (bf16) and 2 (fp32)")
    if ndim > _MAX_NDIM:
        raise ValueError(f"ndim: {ndim}, limit {_MAX_NDIM}")
    body = _HEADER.size + 8 * ndim
    if len(raw) < body:
        raise ValueError(f"shape: the frame ends inside the {ndim} dims")
    shape = struct.unpack_from(f"<{ndim}Q", raw, _HEADER.size)
    if numel != math.prod(shape):
        raise ValueError(f"numel: header says {numel}, the shape {list(shape)} holds {math.prod(shape)}")
    if numel > max_numel:
        raise ValueError(f"numel: {numel}, over the limit max_numel={max_numel}")
    if k > numel:
        raise ValueError(f"k: header says {k} entries, more than numel={numel}")
    width = 2 if dtype is torch.bfloat16 else 4
    if len(raw) - body != k * (4 + width):
        raise ValueError(
            f"k: header says {k} entries ({k * (4 + width)} bytes of indices and values); "
            f"the frame holds {len(raw) - body}"
        )
    gaps = np.empty(k, dtype="<u4")
    unshuffle_into(np.frombuffer(raw, np.uint8, 4 * k, body), gaps.view(np.uint8), 4)
    indices = np.cumsum(gaps, dtype=np.int64)
    if k > 1 and int(gaps[1:].min()) == 0:
        i = int(np.argmin(gaps[1:])) + 1
        raise ValueError(f"indices: index {indices[i]} at position {i} repeats (gap 0); they must increase")
    _check_indices(indices, numel, "indices")
    bits = np.empty(k, dtype="<u2" if width == 2 else "<u4")
    unshuffle_into(np.frombuffer(raw, np.uint8, width * k, body + 4 * k), bits.view(np.uint8), width)
    values = torch.from_numpy(bits.view(np.int16 if width == 2 else np.int32)).view(dtype)
    if not _all_finite(values):
        raise ValueError("values: hold NaN or infinity; a delta must be finite")
    return Sparse(numel=numel, shape=tuple(shape), indices=indices, values=values)


@dataclass(frozen=True, eq=False)
class Quantized:
    """int8 codes ``q`` of x viewed as rows (rows, cols), one fp32 ``scale`` per row; x ≈ q · scale."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(rows, cols) fp32 view of x: dim 0 against the rest; 1-D and 0-d tensors are one row."""
    x = x.detach().to("cpu", torch.float32)
    if x.dim() >= 2:
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return x.reshape(1, x.numel())


def quantize_int8(
    x: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None
) -> Quantized:
    """Symmetric int8 per row: scale = max|row| / 127, q = round(x / scale) in [-127, 127].

    Round to nearest (ties to even) bounds the error by scale/2 per element.
    ``stochastic`` rounds x/scale up with probability equal to its fractional
    part (floor(x/scale + U[0,1))), so E[q·scale] = x: unbiased, error < scale.
    This is QSGD (Alistarh et al.) with s = 127 levels and the row's max-norm in
    place of its 2-norm; with error feedback the biased nearest rounding is fine too.

    Raises:
        ValueError: NaN or infinity in ``x``.
    """
    rows = _as_rows(x)  # (rows, cols)
    if rows.numel() == 0:
        scale = torch.zeros(rows.shape[0], dtype=torch.float32)
        return Quantized(q=torch.zeros(rows.shape, dtype=torch.int8), scale=scale, shape=tuple(x.shape))
    scale = rows.abs().amax(dim=1) / 127.0  # (rows,); NaN propagates through amax
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("x: holds NaN or infinity; a delta must be finite")
    y = rows / torch.where(scale > 0, scale, 1.0)[:, None]
    if stochastic:
        y = torch.floor(y + torch.rand(y.shape, generator=generator, dtype=torch.float32))
    else:
        y = torch.round(y)
    return Quantized(q=y.clamp_(-127, 127).to(torch.int8), scale=scale, shape=tuple(x.shape))


def dequantize(q: Quantized) -> torch.Tensor:
    """The fp32 tensor of shape ``q.shape`` that ``q`` stands for: q · scale, row by row."""
    return (q.q.to(torch.float32) * q.scale[:, None]).reshape(q.shape)


def compress_delta(
    deltas: Mapping[str, torch.Tensor],
    feedback: ErrorFeedback,
    *,
    method: str,
    fraction: float = 0.01,
    value_dtype: str = "bf16",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Sparse | Quantized], dict[str, torch.Tensor]]:
    """Compress each tensor of ``deltas`` with error feedback; return compact forms and what they decode to.

    method "topk": top_k(e + Δ, fraction) with values rounded to ``value_dtype``
    (what encode_sparse will send, so the rounding is fed back too). method
    "int8": quantize_int8(e + Δ, stochastic=, generator=). The second dict is the
    dense fp32 reconstruction the server will add; ``feedback`` keeps the rest.

    Raises:
        ValueError: unknown method or value_dtype, fraction outside (0, 1], or a
            non-finite delta; checked before any residual changes.
    """
    if method not in ("topk", "int8"):
        raise ValueError(f"method must be 'topk' or 'int8', got {method!r}")
    if method == "topk" and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {value_dtype!r}")
    for name, delta in deltas.items():
        if delta.numel() == 0:
            if method == "topk":
                raise ValueError(f"delta {name!r}: top-k needs at least one element; nothing was compressed")
            continue
        lo, hi = torch.aminmax(delta.detach().to(torch.float32).reshape(-1))  # NaN propagates
        if not math.isfinite(float(lo)) or not math.isfinite(float(hi)):
            raise ValueError(f"delta {name!r}: holds NaN or infinity; nothing was compressed")
    compact: dict[str, Sparse | Quantized] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        compensated = feedback.compensate(name, delta)
        form: Sparse | Quantized
        if method == "topk":
            s = top_k(compensated, fraction)
            form = replace(s, values=s.values.to(_VALUE_DTYPES[value_dtype][1]))
            sent = densify(form)
        else:
            form = quantize_int8(compensated, stochastic=stochastic, generator=generator)
            sent = dequantize(form)
        feedback.update(name, compensated, sent)
        compact[name], dense[name] = form, sent
    return compact, dense
