"""Lossy delta compression: error feedback, top-k with gap coding, int8 per row.

Hand-computed error-feedback rounds, the Σ sent = Σ Δ − e identity with e
bounded, hypothesis round trips of the gap-coded frame, one golden frame, every
decoder refusal by field, int8 error and unbiasedness bounds, feedback state
surviving a restart, and one measurement of the top-1% ratio on a GPT-2-like delta.
"""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.workload import gpt2_small_shapes, realistic_delta
from common import lossy
from common.codec.shuffle import shuffle
from common.lossy import (
    ErrorFeedback,
    Quantized,
    Sparse,
    compress_delta,
    decode_sparse,
    densify,
    dequantize,
    encode_sparse,
    quantize_int8,
    top_k,
)

# --- error feedback ---------------------------------------------------------------------------


def test_topk_error_feedback_three_rounds_by_hand() -> None:
    # k = ceil(0.5 · 4) = 2; every value is exact in bf16, so the default value dtype changes nothing.
    deltas = [[1.0, -2.0, 0.5, 0.25], [0.5, 0.5, 0.0, 0.25], [0.25, -0.5, -0.25, 0.5]]
    # Round 1: e+Δ = [1, -2, .5, .25]; keep |−2|, |1|.
    # Round 2: e+Δ = [.5, .5, .5, .5]; a four-way tie goes to the lowest indices 0, 1.
    # Round 3: e+Δ = [.25, −.5, .25, 1]; keep |1|, |−.5|.
    sent = [[1.0, -2.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, -0.5, 0.0, 1.0]]
    residual = [[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.25, 0.0]]
    indices = [[0, 1], [0, 1], [1, 3]]
    fb = ErrorFeedback()
    for r in range(3):
        compact, dense = compress_delta({"w": torch.tensor(deltas[r])}, fb, method="topk", fraction=0.5)
        form = compact["w"]
        assert isinstance(form, Sparse)
        assert form.indices.tolist() == indices[r], f"round {r + 1}"
        assert dense["w"].tolist() == sent[r], f"round {r + 1}"
        assert fb.state_dict()["w"].tolist() == residual[r], f"round {r + 1}"


def test_compensate_starts_at_zero_and_update_carries_the_rest() -> None:
    fb = ErrorFeedback()
    d = torch.tensor([1.0, 2.0])
    c = fb.compensate("x", d)
    assert c.tolist() == [1.0, 2.0]
    assert c.data_ptr() != d.data_ptr()
    fb.update("x", c, torch.tensor([1.0, 0.0]))
    assert fb.compensate("x", torch.tensor([0.5, 0.5])).tolist() == [0.5, 2.5]
    with pytest.raises(ValueError, match="shape"):
        fb.compensate("x", torch.zeros(3))


def test_cumulative_sent_tracks_cumulative_delta_with_bounded_residual() -> None:
    # Top-k keeps a δ = k/n share of the energy: ‖x − C(x)‖² ≤ (1 − δ)‖x‖², plus bf16 rounding of the
    # kept values (relative 2^-9 each, 2^-16 in energy). So ‖e_{t+1}‖ ≤ q(‖e_t‖ + ‖Δ‖) with
    # q = sqrt(1 − δ + 2^-16), and by induction from e_0 = 0, ‖e_t‖ ≤ q/(1 − q)·‖Δ‖ for every t.
    n, fraction, rounds = 200, 0.05, 800
    delta = torch.randn(n, generator=torch.Generator().manual_seed(3))
    q = math.sqrt(1 - fraction + 2**-16)
    bound = q / (1 - q) * float(delta.norm())
    fb = ErrorFeedback()
    total_sent = torch.zeros(n, dtype=torch.float64)
    worst = 0.0
    for _ in range(rounds):
        _, dense = compress_delta({"w": delta}, fb, method="topk", fraction=fraction)
        total_sent += dense["w"].double()
        worst = max(worst, float(fb.state_dict()["w"].norm()))
    e = fb.state_dict()["w"].double()
    total_delta = rounds * delta.double()
    # Σ sent = Σ Δ − e: only fp32 rounding of e + Δ separates the two sides (a random walk; 2e-4 seen).
    assert torch.allclose(total_sent + e, total_delta, rtol=0, atol=1e-3)
    assert worst <= bound
    # So the average sent converges to Δ like ‖e‖/T: 1.1% here; dropping the residual leaves it 84% off.
    assert float((total_sent - total_delta).norm()) <= 0.05 * float(total_delta.norm())


def test_int8_error_feedback_keeps_the_rounding_error() -> None:
    fb = ErrorFeedback()
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(4))
    compact, dense = compress_delta({"w": x}, fb, method="int8")
    form = compact["w"]
    assert isinstance(form, Quantized)
    assert torch.equal(dense["w"], dequantize(form))
    assert torch.equal(fb.state_dict()["w"], x - dense["w"])


def test_compress_delta_refuses_before_touching_the_residuals() -> None:
    fb = ErrorFeedback()
    good = {"a": torch.ones(4)}
    compress_delta(good, fb, method="topk", fraction=0.25)
    before = fb.state_dict()
    bad = {"a": torch.ones(4), "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match=r"'b'.*NaN"):
        compress_delta(bad, fb, method="topk")
    with pytest.raises(ValueError, match="method"):
        compress_delta(good, fb, method="topk8")
    with pytest.raises(ValueError, match="fraction"):
        compress_delta(good, fb, method="topk", fraction=0.0)
    with pytest.raises(ValueError, match="value_dtype"):
        compress_delta(good, fb, method="topk", value_dtype="fp16")
    assert fb.state_dict().keys() == before.keys()
    assert torch.equal(fb.state_dict()["a"], before["a"])


def test_feedback_save_load_continues_identically(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    rounds = [
        {"a": torch.randn(50, generator=gen), "b.weight": torch.randn(8, 16, generator=gen)} for _ in range(5)
    ]
    live = ErrorFeedback()
    for deltas in rounds[:2]:
        compress_delta(deltas, live, method="topk", fraction=0.1)
    path = tmp_path / "feedback.safetensors"
    live.save(path)
    live.save(path)  # overwriting goes through the same temp + rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feedback.safetensors"]
    restarted = ErrorFeedback()
    restarted.load(path)
    for deltas in rounds[2:]:
        _, sent_live = compress_delta(deltas, live, method="topk", fraction=0.1)
        _, sent_restarted = compress_delta(deltas, restarted, method="topk", fraction=0.1)
        for name in deltas:
            assert torch.equal(sent_live[name], sent_restarted[name])
    for name, e in live.state_dict().items():
        assert torch.equal(e, restarted.state_dict()[name])
        assert e.dtype is torch.float32


def test_feedback_load_refuses_a_foreign_file(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="format"):
        ErrorFeedback().load(path)
    with pytest.raises(ValueError, match="finite"):
        ErrorFeedback().load_state_dict({"w": torch.tensor([float("inf")])})


# --- top-k selection ----------------------------------------------------------------------------


def _reference_top(x: torch.Tensor, k: int) -> np.ndarray:
    """Sorted indices of the k largest |x|, ties to the lowest index (a stable full sort)."""
    return np.sort(np.argsort(-np.abs(x.reshape(-1).numpy()), kind="stable")[:k])


@pytest.mark.parametrize(
    ("numel", "fraction", "k"),
    [(300, 0.01, 3), (100, 0.07, 7), (50, 0.01, 1), (7, 1.0, 7), (1, 0.5, 1), (1000, 0.0015, 2)],
)
def test_top_k_keeps_ceil_fraction_entries(numel: int, fraction: float, k: int) -> None:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    s = top_k(x, fraction)
    assert s.indices.size == k
    assert np.array_equal(s.indices, _reference_top(x, k))
    assert torch.equal(s.values, x[torch.from_numpy(s.indices)])


def test_top_k_zero_dim_and_shapes() -> None:
    s = top_k(torch.tensor(-3.0), 0.01)
    assert (s.numel, s.shape, s.indices.tolist(), s.values.tolist()) == (1, (), [0], [-3.0])
    assert densify(s).shape == ()
    x = torch.arange(24.0).reshape(2, 3, 4) - 12
    s = top_k(x, 0.1)  # k = 3: |−12|, |11|, |−11|
    assert s.indices.tolist() == [0, 1, 23]
    assert torch.equal(densify(s), torch.where(x.abs() >= 11, x, 0.0))


def test_top_k_ties_go_to_lowest_indices_small() -> None:
    x = torch.tensor([1.0, -2.0, 2.0, 0.0, -2.0, 2.0])
    assert top_k(x, 0.5).indices.tolist() == [1, 2, 4]  # k = 3 of four |2|s: the first three


def test_top_k_large_uses_the_sample_and_stays_exact(monkeypatch) -> None:
    floors: list[float | None] = []
    real = lossy._sampled_floor

    def spy(mag, k):
        floors.append(real(mag, k))
        return floors[-1]

    monkeypatch.setattr(lossy, "_sampled_floor", spy)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1 << 21, generator=gen)
    s = top_k(x, 0.01)
    assert floors and floors[-1] is not None
    assert np.array_equal(s.indices, _reference_top(x, s.indices.size))
    # Heavy ties: every |3| ties at the threshold; the lowest indices must win on the sampled path too.
    ties = torch.randint(-3, 4, (1 << 21,), generator=gen).float()
    s = top_k(ties, 0.01)
    assert floors[-1] == 3.0
    assert np.array_equal(s.indices, _reference_top(ties, s.indices.size))


@pytest.mark.parametrize("floor", ["max", "zero", "none"])
def test_top_k_exact_whatever_the_sample_says(monkeypatch, floor: str) -> None:
    # A floor too high (fewer than k candidates) must fall back to the full partition; too low costs time only.
    choose = {"max": lambda mag, k: float(mag.max()), "zero": lambda mag, k: 0.0, "none": lambda mag, k: None}
    monkeypatch.setattr(lossy, "_sampled_floor", choose[floor])
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(7))
    s = top_k(x, 0.003)
    assert np.array_equal(s.indices, _reference_top(x, math.ceil(0.003 * (1 << 20))))


@pytest.mark.parametrize(
    ("x", "fraction", "field"),
    [
        (torch.ones(3), 0.0, "fraction"),
        (torch.ones(3), 1.5, "fraction"),
        (torch.ones(0), 0.5, "x"),
        (torch.tensor([1.0, float("nan")]), 0.5, "NaN"),
        (torch.tensor([1.0, float("-inf")]), 0.5, "NaN or infinity"),
    ],
)
def test_top_k_refuses(x: torch.Tensor, fraction: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        top_k(x, fraction)


def test_sparse_refuses_unsorted_or_out_of_range_indices() -> None:
    v = torch.ones(2)
    with pytest.raises(ValueError, match="indices"):
        Sparse(numel=5, shape=(5,), indices=np.array([3, 1]), values=v)
    with pytest.raises(ValueError, match="indices"):
        Sparse(numel=5, shape=(5,), indices=np.array([1, 5]), values=v)
    with pytest.raises(ValueError, match="numel"):
        Sparse(numel=6, shape=(5,), indices=np.array([1, 2]), values=v)


# --- gap-coded frame ----------------------------------------------------------------------------


@st.composite
def sparse_vectors(draw: st.DrawFn) -> Sparse:
    if draw(st.booleans()):
        shape: tuple[int, ...] = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
    else:  # long vectors: gaps of several bytes, spread over all four planes
        shape = (draw(st.integers(1, 100_000)),)
    numel = math.prod(shape)
    mode = draw(st.sampled_from(["random", "all", "one", "ends"]))
    if mode == "all" and numel > 1000:
        mode = "ends"
    if numel == 0:
        idx: list[int] = []
    elif mode == "all":
        idx = list(range(numel))
    elif mode == "one":
        idx = [draw(st.sampled_from([0, numel - 1, draw(st.integers(0, numel - 1))]))]
    else:
        chosen = draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=60))
        idx = sorted(chosen | ({0, numel - 1} if mode == "ends" else set()))
    finite = st.floats(-(2.0**99), 2.0**99, width=32)  # bf16 overflows near 3.4e38
    # Up to 64 drawn values, repeated to length k: edge values (−0.0, subnormals, 2^99) without slow draws.
    drawn = draw(st.lists(finite, min_size=min(len(idx), 64), max_size=min(len(idx), 64)))
    values = (drawn * (len(idx) // 64 + 1))[: len(idx)]
    dtype = draw(st.sampled_from([np.int64, np.uint32]))
    return Sparse(
        numel=numel,
        shape=shape,
        indices=np.array(idx, dtype=dtype),
        values=torch.tensor(values, dtype=torch.float32).reshape(-1),
    )


@settings(max_examples=200, deadline=None)
@given(sparse_vectors(), st.sampled_from(["bf16", "fp32"]))
def test_gap_coding_round_trip(s: Sparse, value_dtype: str) -> None:
    out = decode_sparse(encode_sparse(s, value_dtype=value_dtype), max_numel=s.numel)
    want = s.values.to(torch.bfloat16 if value_dtype == "bf16" else torch.float32)
    assert (out.numel, out.shape) == (s.numel, s.shape)
    assert np.array_equal(out.indices, s.indices.astype(np.int64))
    assert out.values.dtype == want.dtype
    assert torch.equal(out.values.float().view(torch.int32), want.float().view(torch.int32))  # −0.0 too
    assert torch.equal(densify(out), densify(Sparse(s.numel, s.shape, s.indices, want)))
    if s.numel:
        with pytest.raises(ValueError, match=r"numel|content_size"):
            decode_sparse(encode_sparse(s, value_dtype=value_dtype), max_numel=s.numel - 1)


def test_gap_coding_at_the_uint32_limit() -> None:
    # numel = 2^32: the largest index and its gap fill all four byte planes.
    s = Sparse(
        numel=2**32, shape=(2**16, 2**16), indices=np.array([0, 2**32 - 1]), values=torch.tensor([1.0, -1.0])
    )
    out = decode_sparse(encode_sparse(s), max_numel=2**32)
    assert out.indices.tolist() == [0, 2**32 - 1] and out.shape == (2**16, 2**16)
    with pytest.raises(ValueError, match="numel"):
        Sparse(numel=2**32 + 1, shape=(2**32 + 1,), indices=np.array([0]), values=torch.ones(1))


def test_gap_coding_golden_frame() -> None:
    s = Sparse(numel=10, shape=(2, 5), indices=np.array([0, 3, 9]), values=torch.tensor([1.0, -2.0, 0.5]))
    frame = encode_sparse(s)
    expected = (
        b"GDTK\x01\x01\x02\x00"  # magic, version 1, bf16, ndim 2
        b"\x0a\x00\x00\x00\x00\x00\x00\x00"  # numel 10
        b"\x03\x00\x00\x00\x00\x00\x00\x00"  # k 3
        b"\x02\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00"  # shape (2, 5)
        b"\x00\x03\x06"
        + b"\x00" * 9  # gaps 0, 3, 6 as u32: byte plane 0, then planes 1-3
        + b"\x80\x00\x00\x3f\xc0\x3f"  # bf16 3F80 C000 3F00: low bytes, then high bytes
    )
    assert zstandard.frame_content_size(frame) == len(expected) == 58
    assert zstandard.ZstdDecompressor().decompress(frame) == expected


def _payload(
    *,
    numel: int = 10,
    shape: tuple[int, ...] = (10,),
    gaps: tuple[int, ...] = (1, 2, 3),
    bits: tuple[int, ...] = (0x3F80, 0x3F80, 0xBF80),
    code: int = 1,
    k: int | None = None,
    magic: bytes = b"GDTK",
    version: int = 1,
    ndim: int | None = None,
) -> bytes:
    """A decoded frame body written independently of the encoder (defaults: a valid one)."""
    width = 2 if code == 1 else 4
    head = struct.pack(
        "<4sBBHQQ",
        magic,
        version,
        code,
        len(shape) if ndim is None else ndim,
        numel,
        len(gaps) if k is None else k,
    )
    g = np.array(gaps, dtype="<u4").view(np.uint8)
    v = np.array(bits, dtype="<u2" if width == 2 else "<u4").view(np.uint8)
    return (
        head + struct.pack(f"<{len(shape)}Q", *shape) + shuffle(g, 4).tobytes() + shuffle(v, width).tobytes()
    )


def _frame(raw: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(raw)


def test_independent_payload_decodes() -> None:
    s = decode_sparse(_frame(_payload()), max_numel=10)
    assert s.indices.tolist() == [1, 3, 6]
    assert s.values.tolist() == [1.0, 1.0, -1.0]
    s = decode_sparse(_frame(_payload(code=2, bits=(0x3F800000,) * 3)), max_numel=10)
    assert s.values.dtype is torch.float32


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_payload(gaps=(1, 0, 3)), "indices"),  # duplicate
        (_payload(gaps=(5, 2**32 - 2, 1)), "indices"),  # decreasing: the gap wraps past 2^32
        (_payload(gaps=(1, 2, 7)), "indices"),  # last index 10 = numel
        (_payload(gaps=(10,), bits=(0x3F80,)), "indices"),
        (_payload(bits=(0x3F80, 0x7FC0, 0x3F80)), "values"),  # bf16 NaN
        (_payload(bits=(0x7F80, 0x3F80, 0x3F80)), "values"),  # bf16 +inf
        (_payload(code=2, bits=(0x3F800000, 0xFF800000, 0x3F800000)), "values"),  # fp32 −inf
        (_payload(k=4), "k"),  # header claims more entries than the body holds
        (_payload(k=2), "k"),  # ... or fewer
        (_payload(numel=2, shape=(2,), k=3), "k"),  # more entries than elements
        (_payload(magic=b"GDTX"), "magic"),
        (_payload(version=2), "version"),
        (_payload(code=3), "dtype"),
        (_payload(ndim=9), "ndim"),
        (_payload(shape=(2, 4)), "numel"),  # numel 10 ≠ 2·4
        (_payload(numel=12, shape=(12,)), "numel"),  # over max_numel = 10
        (_payload()[:20], "header"),
        (_payload(shape=(2, 5))[:32], "shape"),
    ],
)
def test_decode_refuses_a_bad_body(raw: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        decode_sparse(_frame(raw), max_numel=10)


def test_decode_refuses_truncated_or_padded_frames() -> None:
    frame = encode_sparse(top_k(torch.randn(1000, generator=torch.Generator().manual_seed(8)), 0.1))
    for cut in (0, 3, len(frame) // 2, len(frame) - 1):
        with pytest.raises(ValueError, match=r"^frame"):
            decode_sparse(frame[:cut], max_numel=1000)
    with pytest.raises(ValueError, match=r"^frame"):
        decode_sparse(frame + b"\x00", max_numel=1000)


def test_decode_refuses_a_frame_without_content_size() -> None:
    with pytest.raises(ValueError, match=r"^content_size.*does not declare"):
        decode_sparse(_frame(_payload(), content_size=False), max_numel=10)


def test_decode_refuses_a_bomb_before_decompressing(monkeypatch) -> None:
    bomb = _frame(b"\x00" * 10_000_000)  # ~300 bytes that would inflate to 10 MB
    assert len(bomb) < 2000

    def no_decompressor() -> None:
        raise AssertionError("decompressed a frame over the bound")

    monkeypatch.setattr(zstandard, "ZstdDecompressor", no_decompressor)
    with pytest.raises(ValueError, match=r"^content_size: 10000000 bytes, over the limit 168 .*max_numel=10"):
        decode_sparse(bomb, max_numel=10)


def test_encode_refuses_bf16_overflow_and_unknown_dtypes() -> None:
    s = Sparse(numel=2, shape=(2,), indices=np.array([1]), values=torch.tensor([3.4e38]))
    with pytest.raises(ValueError, match="values: overflow bf16"):
        encode_sparse(s)
    assert decode_sparse(encode_sparse(s, value_dtype="fp32"), max_numel=2).values.tolist() == [
        pytest.approx(3.4e38)
    ]
    with pytest.raises(ValueError, match="value_dtype"):
        encode_sparse(s, value_dtype="fp16")


def test_server_reconstruction_equals_what_feedback_accounted() -> None:
    fb = ErrorFeedback()
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(9))
    compact, dense = compress_delta({"w": x}, fb, method="topk", fraction=0.05)
    form = compact["w"]
    assert isinstance(form, Sparse)
    received = densify(decode_sparse(encode_sparse(form), max_numel=x.numel()))
    assert torch.equal(received, dense["w"])
    assert torch.equal(fb.state_dict()["w"], x - received)


# --- int8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 300), (1000,), (), (4, 3, 5), (7, 1)])
def test_int8_round_to_nearest_error_within_half_a_step(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(shape, generator=gen)
    if x.dim() >= 2:  # rows of very different magnitudes
        x = x * 10 ** torch.empty(shape[0], *([1] * (x.dim() - 1))).uniform_(-6, 1, generator=gen)
    qz = quantize_int8(x)
    rows = 1 if x.dim() < 2 else shape[0]
    assert qz.q.dtype is torch.int8 and qz.q.shape == (rows, x.numel() // rows)
    assert qz.scale.dtype is torch.float32 and qz.scale.shape == (rows,)
    assert int(qz.q.abs().amax(dim=1).min()) == 127  # each row's largest maps to ±127
    err = (x.reshape(rows, -1) - dequantize(qz).reshape(rows, -1)).abs()
    # Exact arithmetic gives ≤ scale/2; fp32 division and product add ~127·2^-24 of a step.
    assert bool((err <= qz.scale[:, None] * 0.5 * (1 + 1e-4)).all())
    assert dequantize(qz).shape == x.shape


def test_int8_zero_rows_and_empty() -> None:
    x = torch.zeros(3, 4)
    x[1] = torch.tensor([0.5, -1.0, 0.0, 0.25])
    qz = quantize_int8(x)
    assert qz.scale[0] == 0 and qz.scale[2] == 0
    assert torch.equal(dequantize(qz)[0], torch.zeros(4))
    assert dequantize(quantize_int8(torch.zeros(0, 5))).shape == (0, 5)
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(torch.tensor([1.0, float("nan")]))


def test_int8_stochastic_rounding_is_unbiased() -> None:
    # Scale is 127/127 = 1, so q is x rounded. Each draw is floor or ceil, variance p(1−p) ≤ 1/4, so the
    # mean of N draws has std ≤ 0.5/√N = 0.0079 for N = 4000; 5σ = 0.04. Nearest rounding is off by
    # 0.25–0.5 on every fractional entry here (0.01 aside), far outside that.
    row = torch.tensor([127.0, 0.3, -0.3, 10.7, -5.5, 0.01, 126.5, -0.75, 0.0])
    draws = 4000
    x = row.repeat(draws, 1)
    qz = quantize_int8(x, stochastic=True, generator=torch.Generator().manual_seed(11))
    assert torch.equal(qz.scale, torch.ones(draws))
    q = qz.q.float()
    assert bool(((q == row.floor()) | (q == row.ceil())).all())
    tolerance = 5 * 0.5 / math.sqrt(draws)
    assert float((q.mean(dim=0) - row).abs().max()) <= tolerance
    nearest = quantize_int8(x).q.float().mean(dim=0)
    assert float((nearest - row).abs().max()) > 10 * tolerance  # the test can tell a biased rounding
    again = quantize_int8(x, stochastic=True, generator=torch.Generator().manual_seed(11))
    assert torch.equal(again.q, qz.q)


# --- measurement ------------------------------------------------------------------------------


def test_top1_percent_gap_coded_ratio_on_realistic_delta() -> None:
    """Not timed: top-1% per tensor, gap-coded u32 + bf16 + shuffle + zstd 1 against raw fp32 bytes."""
    shapes = {
        n: s for n, s in gpt2_small_shapes().items() if n.startswith("transformer.h.0.") or "wpe" in n
    }  # 7.87M values
    delta = realistic_delta(shapes, seed=1)
    raw = sum(t.numel() * 4 for t in delta.values())
    start = time.perf_counter()
    forms = {n: top_k(t, 0.01) for n, t in delta.items()}
    select = time.perf_counter() - start
    sent = sum(len(encode_sparse(s)) for s in forms.values())
    ratio = raw / sent
    print(f"top-1% gap-coded: {raw} fp32 bytes -> {sent} bytes, ratio 1/{ratio:.0f}; top_k {select:.3f} s")
    assert ratio >= 150
