"""Byte-plane shuffle: byte 0 of every element, then byte 1, ... (lossless).

Float deltas have near-random low mantissa bytes but very regular sign and
exponent bytes; grouping bytes of equal significance lets zstd find the
regular ones (fp32 Gaussian delta: ratio 1.24 -> 1.48 at level 1).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U8Array = npt.NDArray[np.uint8]


def shuffle(block: U8Array, itemsize: int) -> U8Array:
    """Return the byte planes of ``block`` (a whole number of ``itemsize`` elements), concatenated."""
    if itemsize == 1:
        return block
    n = block.size // itemsize
    return np.ascontiguousarray(block.reshape(n, itemsize).T).reshape(-1)


def unshuffle_into(planes: U8Array, out: U8Array, itemsize: int) -> None:
    """Inverse of :func:`shuffle`, writing straight into ``out`` (same size).

    One strided copy per plane into the preallocated destination measured
    1.4 GB/s here, 5x a transposed copy of the whole block.
    """
    if itemsize == 1:
        out[:] = planes
        return
    n = planes.size // itemsize
    src = planes.reshape(itemsize, n)
    dst = out.reshape(n, itemsize)
    for j in range(itemsize):
        dst[:, j] = src[j]
