"""Byte-plane shuffle: byte 0 of every element, then byte 1, ... (lossless).

Float deltas have near-random low mantissa bytes but very regular sign and
exponent bytes; grouping bytes of equal significance lets zstd find the
regular ones (fp32 Gaussian delta: ratio 1.24 -> 1.48 at level 1).

The transposes are numba kernels. numpy can only express them as strided
byte copies or as chains of shifts, ORs and casts, each a full pass over
the block; one compiled loop per direction, which LLVM turns into vector
shuffles, moves the bytes once (fp32, per MiB on the machine we measure
on: unshuffle 0.36 -> 0.08 ms, shuffle 0.24 -> 0.09 ms, memcpy 0.07 ms).
The kernels release the GIL, so the codec pool's threads run them side by
side. Compiled code is cached next to this file (``cache=True``): the
first process after an install compiles it (a few seconds), later ones
load it when they import this module (0.3 s).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

U8Array = npt.NDArray[np.uint8]


@njit(nogil=True, cache=True, boundscheck=False)
def _split(block: U8Array, planes: U8Array, k: int) -> None:  # pragma: no cover - compiled
    n = block.size // k
    # The common sizes get their own loops with constant strides: those LLVM vectorizes.
    if k == 4:
        for i in range(n):
            planes[i] = block[4 * i]
            planes[n + i] = block[4 * i + 1]
            planes[2 * n + i] = block[4 * i + 2]
            planes[3 * n + i] = block[4 * i + 3]
    elif k == 2:
        for i in range(n):
            planes[i] = block[2 * i]
            planes[n + i] = block[2 * i + 1]
    elif k == 8:
        for j in range(8):
            for i in range(n):
                planes[j * n + i] = block[8 * i + j]
    else:
        for i in range(n):
            for j in range(k):
                planes[j * n + i] = block[k * i + j]


@njit(nogil=True, cache=True, boundscheck=False)
def _join(planes: U8Array, out: U8Array, k: int) -> None:  # pragma: no cover - compiled
    n = out.size // k
    if k == 4:
        for i in range(n):
            out[4 * i] = planes[i]
            out[4 * i + 1] = planes[n + i]
            out[4 * i + 2] = planes[2 * n + i]
            out[4 * i + 3] = planes[3 * n + i]
    elif k == 2:
        for i in range(n):
            out[2 * i] = planes[i]
            out[2 * i + 1] = planes[n + i]
    elif k == 8:
        for j in range(8):
            for i in range(n):
                out[8 * i + j] = planes[j * n + i]
    else:
        for i in range(n):
            for j in range(k):
                out[k * i + j] = planes[j * n + i]


@njit(nogil=True, cache=True, boundscheck=False)
def _join_bf16_as_f32(planes: U8Array, out: npt.NDArray[np.uint32]) -> None:  # pragma: no cover
    n = out.size
    for i in range(n):
        # bf16 is the top half of an fp32: its low plane lands in bits 16-23, its high one in 24-31.
        out[i] = (np.uint32(planes[i]) << 16) | (np.uint32(planes[n + i]) << 24)


def _check(what: str, got: int, want: int) -> None:
    # The kernels skip bounds checks for speed, so sizes are checked here, once per block.
    if got != want:
        raise ValueError(f"{what} holds {got} bytes; {want} expected")


def shuffle(block: U8Array, itemsize: int, out: U8Array | None = None) -> U8Array:
    """The byte planes of ``block`` (a whole number of ``itemsize`` elements), concatenated.

    Written into ``out`` when given (same size as ``block``; lets a caller
    reuse one buffer block after block), else into a new array.
    """
    if block.size % itemsize:
        raise ValueError(f"block of {block.size} bytes is not a whole number of {itemsize}-byte items")
    if itemsize == 1:
        if out is None:
            return block
        out[:] = block
        return out
    planes = np.empty(block.size, dtype=np.uint8) if out is None else out
    _check("out", planes.size, block.size)
    _split(block, planes, itemsize)
    return planes


def unshuffle_into(planes: U8Array, out: U8Array, itemsize: int) -> None:
    """Inverse of :func:`shuffle`, writing straight into ``out`` (same size)."""
    _check("out", out.size, planes.size)
    if planes.size % itemsize:
        raise ValueError(f"{planes.size} bytes of planes are not a whole number of {itemsize}-byte items")
    if itemsize == 1:
        out[:] = planes
        return
    _join(planes, out, itemsize)


def unshuffle_bf16_into_f32(planes: U8Array, out: U8Array) -> None:
    """The two byte planes of bf16 values, widened into fp32 values in ``out`` in one pass.

    Exact: a bf16 is the top half of the fp32 with the same value.
    """
    _check("out", out.size, 2 * planes.size)
    _join_bf16_as_f32(planes, out.view(np.uint32))


def _warm_up() -> None:
    """Load (or compile) the kernels for the array types the codec passes, at import.

    Otherwise the first block of every process would pay it (0.3 s with the
    cache, about 1 s without): inside a daemon's first round, or a benchmark's
    timed decode.
    """
    writable = np.zeros(8, dtype=np.uint8)
    readonly = np.frombuffer(bytes(8), dtype=np.uint8)
    for source in (writable, readonly):
        _split(source, np.empty(8, dtype=np.uint8), 4)
        _join(source, np.empty(8, dtype=np.uint8), 4)
        _join_bf16_as_f32(source, np.empty(8, dtype=np.uint32))


_warm_up()
