"""Byte-plane shuffle: byte 0 of every element, then byte 1, ... (lossless).

Float deltas have near-random low mantissa bytes but very regular sign and
exponent bytes; grouping bytes of equal significance lets zstd find the
regular ones (fp32 Gaussian delta: ratio 1.24 -> 1.48 at level 1).
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

U8Array = npt.NDArray[np.uint8]


def shuffle(block: U8Array, itemsize: int) -> U8Array:
    """Return the byte planes of ``block`` (a whole number of ``itemsize`` elements), concatenated.

    2- and 4-byte items are split with shifts and narrowing casts (a cast to
    u8 keeps the low byte), which numpy vectorizes: 2.4x faster for fp32
    blocks than the transposed copy the other sizes take.
    """
    if itemsize == 1:
        return block
    n = block.size // itemsize
    if itemsize in (2, 4):
        planes = np.empty(block.size, dtype=np.uint8).reshape(itemsize, n)
        if itemsize == 2:
            _split_bytes(block.view(np.uint16), planes[0], planes[1])
        else:
            words = block.view(np.uint32)
            lo, hi = _halves(n)
            np.copyto(lo, words, casting="unsafe")
            np.right_shift(words, 16, out=hi, casting="unsafe")
            _split_bytes(lo, planes[0], planes[1])
            _split_bytes(hi, planes[2], planes[3])
        return planes.reshape(-1)
    return np.ascontiguousarray(block.reshape(n, itemsize).T).reshape(-1)


def _split_bytes(words: npt.NDArray[np.uint16], low: U8Array, high: U8Array) -> None:
    np.copyto(low, words, casting="unsafe")
    np.right_shift(words, 8, out=high, casting="unsafe")


def unshuffle_into(planes: U8Array, out: U8Array, itemsize: int) -> None:
    """Inverse of :func:`shuffle`, writing straight into ``out`` (same size).

    Why arithmetic rather than copies: numpy's strided byte copies (one per
    plane into its column of ``out``) move one byte per step. Building 16-bit
    words from two planes with a shift and an OR, and then 32-bit words from
    two halves, runs on whole vector registers: 1.46x faster for fp32 blocks
    on the machine we measure on (0.20 against 0.29 ms per MiB); 8-byte
    items keep the copies.
    """
    if itemsize == 1:
        out[:] = planes
        return
    n = planes.size // itemsize
    src = planes.reshape(itemsize, n)
    if itemsize == 2:
        words = out.view(np.uint16)
        _join_bytes(src[0], src[1], words)
        return
    if itemsize == 4:
        lo, hi = _halves(n)
        _join_bytes(src[0], src[1], lo)
        _join_bytes(src[2], src[3], hi)
        quads = out.view(np.uint32)
        np.left_shift(hi, 16, out=quads, dtype=np.uint32)
        np.bitwise_or(quads, lo, out=quads, dtype=np.uint32)
        return
    dst = out.reshape(n, itemsize)
    for j in range(itemsize):
        dst[:, j] = src[j]


def _join_bytes(low: U8Array, high: U8Array, words: npt.NDArray[np.uint16]) -> None:
    np.left_shift(high, 8, out=words, dtype=np.uint16)
    np.bitwise_or(words, low, out=words, dtype=np.uint16)


_scratch = threading.local()


def _halves(n: int) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]:
    """Two n-element u16 scratch arrays of the calling thread (the codec pool reuses them block after block)."""
    buf: npt.NDArray[np.uint16] | None = getattr(_scratch, "halves", None)
    if buf is None or buf.size < 2 * n:
        buf = np.empty(2 * n, dtype=np.uint16)
        _scratch.halves = buf
    return buf[:n], buf[n : 2 * n]
