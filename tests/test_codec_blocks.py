"""Per-block codec work: zstd parameters for byte planes, the fast finiteness check, the bf16 upcast."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec.blocks import PLANE_HASH_LOG, compress_frame, decode_block, new_compressor, top_plane_finite
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
    """The bf16 → fp32 decode, shuffled or not, gives bf16 bits << 16, NaNs included."""
    bits = np.array(words, dtype=np.uint16)
    wire = bits.view(np.uint8)
    frame = zstandard.ZstdCompressor(level=1).compress((shuffle(wire, 2) if shuffled else wire).tobytes())
    out = np.full(4 * bits.size, 0xA5, dtype=np.uint8)
    decode_block(frame, out, DType.BF16, DType.F32, shuffled, "frame")
    assert out.view(np.uint32).tolist() == (bits.astype(np.uint32) << 16).tolist()


def _weight_difference(count: int, seed: int) -> np.ndarray:
    """``(w + step) - w`` in fp32, the shape of a real fine-tuning difference (zeroed low bits)."""
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal(count) * 0.02).astype(np.float32)
    return ((weights + (rng.standard_normal(count) * 1e-4).astype(np.float32)) - weights).astype(np.float32)


@pytest.mark.parametrize("dtype", [DType.F32, DType.BF16])
def test_byte_planes_compress_at_least_as_well_as_plain_level_one(dtype: DType) -> None:
    """The small hash table the encoder uses for planes costs no ratio on a weight difference.

    (It is there for speed: bench/codec.py measures that.) The frame must also
    declare its content size, which the decoder's bound check requires.
    """
    values = _weight_difference(1 << 18, seed=3)
    wire = (
        values.view(np.uint8)
        if dtype is DType.F32
        else (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    )
    frame, digest = compress_frame(shuffle(wire, itemsize(dtype)), True, 1)
    plain = zstandard.ZstdCompressor(level=1).compress(shuffle(wire, itemsize(dtype)).tobytes())
    assert len(frame) <= len(plain)
    assert zstandard.frame_content_size(frame) == wire.size
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == wire.size
    out = np.empty(wire.size if dtype is DType.F32 else 2 * wire.size, dtype=np.uint8)
    finite, got = decode_block(frame, out, dtype, DType.F32, True, "frame")
    assert finite and got == digest
    expected = values.view(np.uint32) if dtype is DType.F32 else (values.view(np.uint32) >> 16) << 16
    assert out.view(np.uint32).tolist() == expected.tolist()


def test_only_fast_levels_of_shuffled_blocks_get_the_small_table() -> None:
    data = shuffle(_weight_difference(1 << 16, seed=4).view(np.uint8), 4).tobytes()
    tuned = zstandard.ZstdCompressionParameters.from_level(
        1, hash_log=PLANE_HASH_LOG, write_content_size=True
    )
    assert new_compressor(1, True).compress(data) == zstandard.ZstdCompressor(
        compression_params=tuned
    ).compress(data)
    assert new_compressor(1, False).compress(data) == zstandard.ZstdCompressor(
        level=1, write_content_size=True
    ).compress(data)
    assert new_compressor(3, True).compress(data) == zstandard.ZstdCompressor(
        level=3, write_content_size=True
    ).compress(data)
