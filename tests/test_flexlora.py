"""FlexLoRA aggregation and SVD redistribution against direct float64 NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.flexlora import LoraFactors, ModuleSum, full_update, redistribute

ALPHA = 16.0


def _factors(rng: np.random.Generator, r: int, d_out: int, d_in: int) -> LoraFactors:
    a = rng.standard_normal((r, d_in)).astype(np.float32)
    b = rng.standard_normal((d_out, r)).astype(np.float32)
    return LoraFactors(a=torch.from_numpy(a), b=torch.from_numpy(b))


def _reference(clients: list[tuple[LoraFactors, float]], alpha: float) -> np.ndarray:
    """ΔW = Σ p_i (α/r_i) B_i A_i in float64, straight from the paper's formula."""
    total = sum(n for _, n in clients)
    first = clients[0][0]
    out = np.zeros((first.b.shape[0], first.a.shape[1]))
    for f, n in clients:
        b, a = f.b.double().numpy(), f.a.double().numpy()
        out += (n / total) * (alpha / a.shape[0]) * (b @ a)
    return out


def _product(f: LoraFactors, alpha: float) -> np.ndarray:
    """(α/r)·B·A in float64."""
    out: np.ndarray = (alpha / f.rank) * (f.b.double().numpy() @ f.a.double().numpy())
    return out


def _assert_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    """Frobenius-relative closeness: ‖actual − expected‖ ≤ rel·max(‖expected‖, 1e-30)."""
    err = np.linalg.norm(actual - expected)
    assert err <= rel * max(float(np.linalg.norm(expected)), 1e-30), (err, np.linalg.norm(expected))


# ---------------------------------------------------------------------------------------- full_update


def test_full_update_matches_numpy_with_mixed_ranks_and_weights() -> None:
    rng = np.random.default_rng(0)
    clients = [(_factors(rng, r, 12, 9), n) for r, n in [(2, 3.0), (4, 1.0), (8, 6.0)]]
    dw = full_update(clients, ALPHA)
    assert dw.shape == (12, 9)
    assert dw.dtype == torch.float32
    _assert_close(dw.double().numpy(), _reference(clients, ALPHA), 1e-6)


def test_full_update_scales_each_client_by_its_own_alpha_over_r() -> None:
    """Two clients with the *same* B·A at ranks 2 and 8 contribute α/2 and α/8 times it.

    Forgetting α/r_i (or using one r for everybody) rescales one client by r_j/r_i against the other,
    which every alternative below would give.
    """
    rng = np.random.default_rng(1)
    small = _factors(rng, 2, 6, 5)
    extra_a = torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32))
    big = LoraFactors(a=torch.cat([small.a, extra_a]), b=torch.cat([small.b, torch.zeros(6, 6)], dim=1))
    prod = (small.b @ small.a).double().numpy()
    np.testing.assert_allclose((big.b @ big.a).double().numpy(), prod, rtol=1e-6, atol=1e-6)

    dw = full_update([(small, 1.0), (big, 1.0)], ALPHA).double().numpy()
    expected = 0.5 * (ALPHA / 2 + ALPHA / 8) * prod
    _assert_close(dw, expected, 1e-6)
    for wrong in (ALPHA * prod, 0.5 * (ALPHA / 2 + ALPHA / 2) * prod, 0.5 * (ALPHA / 8 + ALPHA / 8) * prod):
        assert np.linalg.norm(dw - wrong) > 0.1 * np.linalg.norm(expected)


def test_weights_are_normalised_over_the_given_clients() -> None:
    rng = np.random.default_rng(2)
    clients = [(_factors(rng, r, 7, 4), n) for r, n in [(1, 5.0), (3, 2.0)]]
    scaled = [(f, 1000.0 * n) for f, n in clients]
    torch.testing.assert_close(full_update(clients, ALPHA), full_update(scaled, ALPHA), rtol=1e-6, atol=1e-6)
    # One client: p = 1 whatever its n, so ΔW is its own (α/r)·B·A.
    _assert_close(full_update(clients[:1], ALPHA).double().numpy(), _product(clients[0][0], ALPHA), 1e-6)


def test_zero_weight_client_contributes_nothing() -> None:
    rng = np.random.default_rng(3)
    f1, f2 = _factors(rng, 2, 5, 5), _factors(rng, 4, 5, 5)
    torch.testing.assert_close(full_update([(f1, 2.0), (f2, 0.0)], ALPHA), full_update([(f1, 2.0)], ALPHA))


def test_half_precision_factors_are_upcast_before_the_product() -> None:
    rng = np.random.default_rng(4)
    f = _factors(rng, 4, 8, 6)
    half = LoraFactors(a=f.a.to(torch.bfloat16), b=f.b.to(torch.bfloat16))
    dw = full_update([(half, 1.0)], ALPHA)
    assert dw.dtype == torch.float32
    upcast = LoraFactors(a=half.a.float(), b=half.b.float())
    _assert_close(dw.double().numpy(), _product(upcast, ALPHA), 1e-6)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (LoraFactors(a=torch.zeros(2, 9), b=torch.zeros(11, 2)), r"client 2: .*11×9 but this module is 12×9"),
        (LoraFactors(a=torch.zeros(2, 8), b=torch.zeros(12, 2)), r"client 2: .*12×8 but this module is 12×9"),
        (LoraFactors(a=torch.zeros(4, 9), b=torch.zeros(12, 3)), r"client 2: ranks disagree"),
        (LoraFactors(a=torch.zeros(9), b=torch.zeros(12, 1)), r"client 2: A and B must be 2-D"),
        (LoraFactors(a=torch.zeros(0, 9), b=torch.zeros(12, 0)), r"client 2: rank must be at least 1"),
        (LoraFactors(a=torch.zeros(2, 9, dtype=torch.int64), b=torch.zeros(12, 2)), r"client 2: .*floating"),
    ],
)
def test_full_update_names_the_bad_client(bad: LoraFactors, match: str) -> None:
    rng = np.random.default_rng(5)
    good = [(_factors(rng, r, 12, 9), 1.0) for r in (2, 4)]
    with pytest.raises(ValueError, match=match):
        full_update([*good, (bad, 1.0)], ALPHA)


@pytest.mark.parametrize(("weights", "match"), [((1.0, -1.0), "client 1"), ((1.0, float("nan")), "client 1")])
def test_full_update_rejects_bad_weights(weights: tuple[float, float], match: str) -> None:
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match=match):
        full_update([(_factors(rng, 2, 3, 3), w) for w in weights], ALPHA)


def test_full_update_rejects_empty_rounds_zero_total_and_bad_alpha() -> None:
    f = _factors(np.random.default_rng(7), 2, 3, 3)
    with pytest.raises(ValueError, match="at least one client"):
        full_update([], ALPHA)
    with pytest.raises(ValueError, match="no weight"):
        full_update([(f, 0.0), (f, 0.0)], ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        full_update([(f, 1.0)], 0.0)


# --------------------------------------------------------------------------------------- redistribute


def _check_eckart_young(dw: torch.Tensor, ranks: list[int], method: str = "full") -> dict[int, LoraFactors]:
    """(α/r)·B·A is the best rank-r approximation: error² = Σ_{i>r} σ_i²; A has orthonormal rows."""
    m = dw.double().numpy()
    sigma = np.linalg.svd(m, compute_uv=False)
    k = sigma.size
    scale2 = float(np.sum(sigma**2))
    out = redistribute(dw, ranks, ALPHA, method=method)
    assert sorted(out) == sorted(set(ranks))
    for r, f in out.items():
        d_out, d_in = m.shape
        assert f.a.shape == (r, d_in) and f.b.shape == (d_out, r)
        assert f.a.dtype == f.b.dtype == torch.float32
        err2 = float(np.sum((m - _product(f, ALPHA)) ** 2))
        expected = float(np.sum(sigma[r:] ** 2))
        assert abs(err2 - expected) <= 1e-4 * expected + 1e-9 * scale2, (r, err2, expected)
        kept = min(r, k)
        a = f.a.double().numpy()
        np.testing.assert_allclose(a[:kept] @ a[:kept].T, np.eye(kept), atol=1e-5)
    return out


def test_redistribute_is_eckart_young_optimal_for_every_rank() -> None:
    rng = np.random.default_rng(10)
    for shape in [(12, 9), (9, 12), (10, 10)]:
        dw = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        _check_eckart_young(dw, list(range(1, min(shape) + 1)))


def test_redistribute_product_equals_numpy_truncated_svd() -> None:
    rng = np.random.default_rng(11)
    dw = torch.from_numpy(rng.standard_normal((12, 9)).astype(np.float32))
    u, s, vt = np.linalg.svd(dw.double().numpy(), full_matrices=False)
    for r, f in redistribute(dw, [1, 3, 6], ALPHA).items():
        _assert_close(_product(f, ALPHA), (u[:, :r] * s[:r]) @ vt[:r], 1e-5)


def test_all_singular_values_go_into_b() -> None:
    """(α/r)·‖B[:, i]‖ = σ_i: the faithful split, not a √Σ split."""
    rng = np.random.default_rng(12)
    dw = torch.from_numpy(rng.standard_normal((10, 7)).astype(np.float32))
    sigma = np.linalg.svd(dw.double().numpy(), compute_uv=False)
    for r, f in redistribute(dw, [2, 5], ALPHA).items():
        col_norms = (ALPHA / r) * np.linalg.norm(f.b.double().numpy(), axis=0)
        np.testing.assert_allclose(col_norms, sigma[:r], rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(f.a.double().numpy(), axis=1), 1.0, rtol=1e-5)


def test_round_trip_keeps_the_update_at_any_rank_at_least_its_own() -> None:
    """A rank-4 update sent back at ranks 4, 8, 30 is the same (α/r)·B·A: no r_j/r_i rescaling."""
    rng = np.random.default_rng(13)
    f = _factors(rng, 4, 20, 16)
    dw = full_update([(f, 7.0)], ALPHA)
    out = redistribute(dw, [4, 8, 16, 30], ALPHA)
    assert sorted(out) == [4, 8, 16, 30]
    for back in out.values():
        _assert_close(_product(back, ALPHA), _product(f, ALPHA), 1e-5)


def test_ranks_above_min_dim_are_zero_padded() -> None:
    rng = np.random.default_rng(14)
    dw = torch.from_numpy(rng.standard_normal((5, 3)).astype(np.float32))
    f = _check_eckart_young(dw, [3, 4, 8])[8]
    assert f.a.shape == (8, 3) and f.b.shape == (5, 8)
    assert torch.count_nonzero(f.a[3:]) == 0 and torch.count_nonzero(f.b[:, 3:]) == 0
    _assert_close(_product(f, ALPHA), dw.double().numpy(), 1e-5)


def test_factors_own_their_memory_and_sit_on_delta_w_device() -> None:
    dw = torch.from_numpy(np.random.default_rng(15).standard_normal((6, 6)).astype(np.float32))
    out = redistribute(dw.to(torch.bfloat16), [2, 3], ALPHA)
    out[2].a.zero_()
    assert torch.count_nonzero(out[3].a) > 0
    assert out[2].a.device == dw.device


def test_redistribute_with_no_ranks_is_empty() -> None:
    assert redistribute(torch.ones(3, 3), [], ALPHA) == {}


@pytest.mark.parametrize(
    ("dw", "kwargs", "match"),
    [
        (torch.ones(3, 3), {"ranks": [0]}, "ranks must be integers"),
        (torch.ones(3, 3), {"ranks": [True]}, "ranks must be integers"),
        (torch.ones(3, 3), {"method": "svd"}, "method must be one of"),
        (torch.ones(3, 3), {"alpha": -1.0}, "alpha"),
        (torch.ones(3, 3), {"oversample": -1}, "oversample"),
        (torch.ones(3, 3, 3), {}, "must be 2-D"),
        (torch.tensor([[1.0, float("nan")]]), {}, "NaN or Inf"),
    ],
)
def test_redistribute_rejects_bad_arguments(dw: torch.Tensor, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"ranks": [1], "alpha": ALPHA} | kwargs
    with pytest.raises(ValueError, match=match):
        redistribute(dw, **args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- randomized SVD


def _gapped(d_out: int, d_in: int, top: list[float], tail: float, seed: int) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with the given distinct top singular values and a tail of at most ``tail``."""
    rng = np.random.default_rng(seed)
    k = min(d_out, d_in)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, k)))
    s = np.concatenate([top, tail * rng.uniform(0.1, 1.0, k - len(top))])
    return torch.from_numpy(((u * s) @ v.T).astype(np.float32))


def test_randomized_svd_matches_full_svd_when_the_spectrum_has_a_gap() -> None:
    """Tolerance: top-r product and left subspace within 1e-4 (relative Frobenius) of the full SVD's.

    The top 8 singular values are 20..6 (distinct, so every top-r subspace is defined) and the tail is
    ≤ 1e-3: the range finder's error scales like (σ_{q+1}/σ_r)^(2·niter+1), far below fp32 rounding.
    """
    dw = _gapped(96, 80, [20.0, 18.0, 16.0, 14.0, 12.0, 10.0, 8.0, 6.0], 1e-3, seed=20)
    full = redistribute(dw, [2, 4, 8], ALPHA, method="full")
    fast = redistribute(dw, [2, 4, 8], ALPHA, method="randomized")
    for r in (2, 4, 8):
        _assert_close(_product(fast[r], ALPHA), _product(full[r], ALPHA), 1e-4)
        uf = np.linalg.qr(full[r].b.double().numpy())[0]
        ur = np.linalg.qr(fast[r].b.double().numpy())[0]
        assert np.linalg.norm(uf @ uf.T - ur @ ur.T) <= 1e-4
        a = fast[r].a.double().numpy()
        np.testing.assert_allclose(a @ a.T, np.eye(r), atol=1e-5)


def test_randomized_svd_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    dw = _gapped(64, 40, [5.0, 4.0, 3.0], 1e-2, seed=21)
    state = torch.random.get_rng_state()
    one = redistribute(dw, [3], ALPHA, method="randomized", seed=7)[3]
    two = redistribute(dw, [3], ALPHA, method="randomized", seed=7)[3]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(one.a, two.a) and torch.equal(one.b, two.b)


def test_randomized_falls_back_to_the_full_svd_for_small_matrices() -> None:
    dw = torch.from_numpy(np.random.default_rng(22).standard_normal((12, 9)).astype(np.float32))
    full = redistribute(dw, [2, 4], ALPHA)
    fast = redistribute(dw, [2, 4], ALPHA, method="randomized")  # 4 + 10 oversampling ≥ 9
    for r in (2, 4):
        assert torch.equal(full[r].a, fast[r].a) and torch.equal(full[r].b, fast[r].b)


# ------------------------------------------------------------------------------------------ ModuleSum


def test_module_sum_streaming_equals_full_update_then_redistribute() -> None:
    rng = np.random.default_rng(30)
    clients = [(_factors(rng, r, 16, 11), n) for r, n in [(2, 10.0), (8, 3.0), (4, 1.0), (2, 5.0)]]
    acc = ModuleSum(16, 11, ALPHA)
    for f, n in clients:
        acc.add(f, n)
    assert acc.count == 4 and acc.total_weight == 19.0
    streamed = acc.finish([2, 4, 8])
    batch = redistribute(full_update(clients, ALPHA), [2, 4, 8], ALPHA)
    for r in (2, 4, 8):
        torch.testing.assert_close(streamed[r].a, batch[r].a)
        torch.testing.assert_close(streamed[r].b, batch[r].b)
    _assert_close(acc.delta_w().double().numpy(), _reference(clients, ALPHA), 1e-6)


def test_module_sum_finish_is_repeatable_and_closes_the_sum() -> None:
    f = _factors(np.random.default_rng(31), 3, 5, 4)
    acc = ModuleSum(5, 4, ALPHA)
    acc.add(f, 2.0)
    first = acc.finish([3])[3]
    again = acc.finish([3])[3]
    assert torch.equal(first.a, again.a) and torch.equal(first.b, again.b)
    with pytest.raises(RuntimeError, match="finished"):
        acc.add(f, 1.0)


def test_module_sum_validates_before_folding() -> None:
    acc = ModuleSum(5, 4, ALPHA)
    with pytest.raises(ValueError, match="no weight"):
        acc.finish([2])
    with pytest.raises(ValueError, match="3×4 but this module is 5×4"):
        acc.add(LoraFactors(a=torch.ones(2, 4), b=torch.ones(3, 2)), 1.0)
    with pytest.raises(ValueError, match="weight"):
        acc.add(LoraFactors(a=torch.ones(2, 4), b=torch.ones(5, 2)), -1.0)
    good = LoraFactors(a=torch.ones(2, 4), b=torch.ones(5, 2))
    acc.add(good, 3.0)  # the rejected uploads left nothing behind
    assert acc.count == 1 and acc.total_weight == 3.0
    _assert_close(acc.delta_w().double().numpy(), _product(good, ALPHA), 1e-7)
    with pytest.raises(ValueError, match="shape must be positive"):
        ModuleSum(0, 4, ALPHA)


# ----------------------------------------------------------------------------------------- properties

_client = st.tuples(st.integers(1, 6), st.floats(0.0, 100.0, allow_nan=False))


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(1, 10),
    d_in=st.integers(1, 10),
    clients=st.lists(_client, min_size=1, max_size=4).filter(lambda cs: sum(n for _, n in cs) > 0.5),
    alpha=st.floats(1.0, 64.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_full_update_and_redistribution(
    d_out: int, d_in: int, clients: list[tuple[int, float]], alpha: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    factors = [(_factors(rng, r, d_out, d_in), n) for r, n in clients]
    dw = full_update(factors, alpha)
    expected = _reference(factors, alpha)
    assert np.linalg.norm(dw.double().numpy() - expected) <= 1e-5 * (1.0 + np.linalg.norm(expected))
    ranks = sorted({r for r, _ in clients})
    sigma = np.linalg.svd(dw.double().numpy(), compute_uv=False)
    scale2 = float(np.sum(sigma**2))
    for r, f in redistribute(dw, ranks, alpha).items():
        approx = (alpha / r) * (f.b.double().numpy() @ f.a.double().numpy())
        err2 = float(np.sum((dw.double().numpy() - approx) ** 2))
        assert abs(err2 - float(np.sum(sigma[r:] ** 2))) <= 1e-4 * scale2 + 1e-12
