"""Per-block codec work: the fast finiteness check on shuffled planes, the fused bf16 upcast."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec.blocks import decode_block, top_plane_finite
from common.codec.shuffle import shuffle
from common.dtypes import DType, itemsize

BITS = {DType.F16: np.uint16, DType.BF16: np.uint16, DType.F32: np.uint32, DType.F64: np.uint64}


def _is_finite(bits: np.ndarray, dtype: DType) -> bool:
    if dtype is DType.BF16:
        return bool(np.isfinite((bits.astype(np.uint32) << 16).view(np.float32)).all())
    view = {DType.F16: np.float16, DType.F32: np.float32, DType.F64: np.float64}[dtype]
    return bool(np.isfinite(bits.view(view)).all())


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(sorted(BITS)),
    words=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=64),
)
def test_a_yes_is_never_wrong(dtype: DType, words: list[int]) -> None:
    """Random bit patterns (inf, NaN, subnormals, near-overflow values): yes implies every value is finite."""
    kind = BITS[dtype]
    mask = (1 << (8 * itemsize(dtype))) - 1
    bits = np.array([w & mask for w in words], dtype=np.uint64).astype(kind)
    planes = shuffle(bits.view(np.uint8), itemsize(dtype))
    if top_plane_finite(planes, dtype):
        assert _is_finite(bits, dtype)


@pytest.mark.parametrize("dtype", sorted(BITS))
def test_ordinary_deltas_take_the_fast_path(dtype: DType) -> None:
    """Values of any ordinary magnitude answer yes, so the full check is the rare path."""
    values = np.random.default_rng(0).standard_normal(4096) * np.logspace(-30, 4, 4096)
    if dtype is DType.BF16:
        bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    else:
        view = {DType.F16: np.float16, DType.F32: np.float32, DType.F64: np.float64}[dtype]
        bits = values.astype(view).view(BITS[dtype])
    assert top_plane_finite(shuffle(bits.view(np.uint8), itemsize(dtype)), dtype)


@pytest.mark.parametrize("dtype", sorted(BITS))
def test_a_single_infinity_answers_maybe(dtype: DType) -> None:
    inf = {
        DType.F16: np.float16(np.inf).view(np.uint16),
        DType.BF16: np.uint16(0xFF80),
        DType.F32: np.float32(-np.inf).view(np.uint32),
        DType.F64: np.float64(np.inf).view(np.uint64),
    }[dtype]
    bits = np.zeros(1000, dtype=BITS[dtype])
    bits[777] = inf
    assert not top_plane_finite(shuffle(bits.view(np.uint8), itemsize(dtype)), dtype)


def test_integers_have_no_fast_path() -> None:
    assert not top_plane_finite(np.zeros(64, dtype=np.uint8), DType.I32)


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(st.integers(min_value=0, max_value=2**16 - 1), min_size=0, max_size=300),
    shuffled=st.booleans(),
)
def test_bf16_upcast_paths_agree_bit_for_bit(words: list[int], shuffled: bool) -> None:
    """The fused bf16 → fp32 unshuffle gives the bits of the plain path: bf16 bits << 16, NaNs included."""
    bits = np.array(words, dtype=np.uint16)
    wire = bits.view(np.uint8)
    frame = zstandard.ZstdCompressor(level=1).compress((shuffle(wire, 2) if shuffled else wire).tobytes())
    out = np.full(4 * bits.size, 0xA5, dtype=np.uint8)
    decode_block(frame, out, DType.BF16, DType.F32, shuffled, "frame")
    assert out.view(np.uint32).tolist() == (bits.astype(np.uint32) << 16).tolist()
