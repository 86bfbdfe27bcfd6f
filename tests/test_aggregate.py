"""The aggregation rule: WeightedSum against float64 NumPy, server optimizers against the papers' rules."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.buffers import ReusableBuffer
from server.aggregate import _CONVERT_CHUNK, WeightedSum
from server.optimizers import (
    OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    all_finite,
    make_optimizer,
)

SPECS: list[tuple[str, tuple[int, ...]]] = [("layer.a", (3, 5)), ("layer.b", (257,)), ("scale", ())]
MAX_WEIGHT = 2**29


def _deltas(rng: np.random.Generator, k: int, numel: int) -> np.ndarray:
    """k fp32 deltas whose magnitudes span six decades and mixed signs, so sums cancel."""
    mags = 10.0 ** rng.uniform(-4, 2, size=(k, numel))
    return (rng.standard_normal((k, numel)) * mags).astype(np.float32)


def _contributions(seed: int, weights: Sequence[int]) -> list[tuple[int, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    flat = {name: _deltas(rng, len(weights), int(np.prod(shape))) for name, shape in SPECS}
    return [(w, {name: flat[name][i] for name, _ in SPECS}) for i, w in enumerate(weights)]


def _fold_all(
    contributions: Sequence[tuple[int, dict[str, np.ndarray]]],
    order: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, np.ndarray]:
    acc = WeightedSum(SPECS, dtype=dtype)
    for i in order if order is not None else range(len(contributions)):
        weight, tensors = contributions[i]
        for name, values in tensors.items():
            acc.fold(name, 0, torch.from_numpy(values), weight)
        acc.add_weight(weight)
    return {name: t.numpy().reshape(-1) for name, t in acc.mean()}


def _bound(weights: Sequence[int], stacked: np.ndarray) -> np.ndarray:
    """The documented per-element bound δ = K·2^-52·A/W·(1 + 2^-53) on two fp64 means."""
    w = np.asarray(weights, dtype=np.float64)
    k = len(weights)
    a: np.ndarray = (w[:, None] * np.abs(stacked.astype(np.float64))).sum(axis=0)
    return a * (k * 2.0**-52 / float(w.sum()) * (1 + 2.0**-53))


def _assert_within_bound(r1: np.ndarray, r2: np.ndarray, delta: np.ndarray) -> None:
    """|r1 − r2| ≤ δ + ulp32(max(|r1|, |r2|)), with r1 fp32 and r2 fp32 or an fp64 reference."""
    r1_64, r2_64 = r1.astype(np.float64), r2.astype(np.float64)
    ulp = np.spacing(np.maximum(np.abs(r1_64), np.abs(r2_64)).astype(np.float32)).astype(np.float64)
    excess = np.abs(r1_64 - r2_64) - (delta + ulp)
    assert excess.max() <= 0, (
        f"bound exceeded at {int(excess.argmax())}: {r1[excess.argmax()]} vs {r2[excess.argmax()]}"
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


# --- WeightedSum ---------------------------------------------------------------------------------


def test_mean_matches_numpy_weighted_average_within_bound() -> None:
    weights = [3, 1, 2**29, 17, 1000, 5]
    contributions = _contributions(0, weights)
    got = _fold_all(contributions)
    for name, _ in SPECS:
        stacked = np.stack([c[name] for _, c in contributions])
        ref = np.average(stacked.astype(np.float64), axis=0, weights=weights)
        _assert_within_bound(got[name], ref, _bound(weights, stacked))


def test_bound_is_tight_enough_to_catch_fp32_accumulation() -> None:
    weights = [7, 3, 1, 5, 2, 11, 13, 4]
    contributions = _contributions(1, weights)
    got = _fold_all(contributions, dtype=torch.float32)
    stacked = np.stack([c["layer.b"] for _, c in contributions])
    ref = np.average(stacked.astype(np.float64), axis=0, weights=weights)
    with pytest.raises(AssertionError, match="bound exceeded"):
        _assert_within_bound(got["layer.b"], ref, _bound(weights, stacked))


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fold_in_random_pieces_equals_fold_whole(values_dtype: torch.dtype) -> None:
    rng = np.random.default_rng(2)
    weights = [5, 9, 2**20]
    deltas = [torch.from_numpy(_deltas(rng, 1, 1000)[0]).to(values_dtype) for _ in weights]
    whole, pieces = WeightedSum([("t", (10, 100))]), WeightedSum([("t", (10, 100))])
    for w, d in zip(weights, deltas, strict=True):
        whole.fold("t", 0, d, w)
        cuts = [0, *sorted(rng.choice(np.arange(1, 1000), size=7, replace=False).tolist()), 1000]
        for lo, hi in reversed(list(itertools.pairwise(cuts))):  # out of order, too
            pieces.fold("t", lo, d[lo:hi], w)
        whole.add_weight(w)
        pieces.add_weight(w)
    (_, a), (_, b) = next(whole.mean()), next(pieces.mean())
    assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_values_fold_as_their_exact_upcast(values_dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    weights = [4, 1, 250, 33]
    values = [torch.from_numpy(_deltas(rng, 1, 257)[0]).clamp(-6e4, 6e4).to(values_dtype) for _ in weights]
    acc = WeightedSum([("t", (257,))])
    for w, v in zip(weights, values, strict=True):
        acc.fold("t", 0, v, w)
        acc.add_weight(w)
    got = next(acc.mean())[1].numpy()
    stacked = np.stack([v.to(torch.float64).numpy() for v in values])
    ref = np.average(stacked, axis=0, weights=weights)
    _assert_within_bound(got, ref, _bound(weights, stacked))


def test_conversion_in_several_scratch_chunks_is_exact() -> None:
    n = _CONVERT_CHUNK + 12_345
    values = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    converted, direct = WeightedSum([("t", (n,))]), WeightedSum([("t", (n,))])
    for w in (3, 7):
        converted.fold("t", 0, values, w)  # bf16 → fp64 through the scratch buffer, 2 passes
        direct.fold("t", 0, values.to(torch.float64), w)
        converted.add_weight(w)
        direct.add_weight(w)
    assert converted.nbytes == n * 8 + _CONVERT_CHUNK * 8
    assert torch.equal(_bits(next(converted.mean())[1]), _bits(next(direct.mean())[1]))


def test_same_order_twice_is_bit_identical() -> None:
    contributions = _contributions(5, [3, 2**29, 1, 77, 12])
    first, second = _fold_all(contributions), _fold_all(contributions)
    for name, _ in SPECS:
        assert first[name].tobytes() == second[name].tobytes()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    weights=st.lists(st.integers(min_value=1, max_value=MAX_WEIGHT), min_size=2, max_size=9),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_order_is_within_the_documented_bound(data: st.DataObject, weights: list[int], seed: int) -> None:
    contributions = _contributions(seed, weights)
    order = data.draw(st.permutations(range(len(weights))))
    canonical, shuffled = _fold_all(contributions), _fold_all(contributions, order)
    for name, _ in SPECS:
        stacked = np.stack([c[name] for _, c in contributions])
        _assert_within_bound(canonical[name], shuffled[name], _bound(weights, stacked))


@pytest.mark.parametrize(
    ("name", "start", "values", "match"),
    [
        ("nope", 0, torch.ones(3), r"tensor 'nope' is not in this round's manifest"),
        ("layer.b", -1, torch.ones(3), r"tensor 'layer.b': range \[-1, 2\) is outside \[0, 257\)"),
        ("layer.b", 255, torch.ones(3), r"tensor 'layer.b': range \[255, 258\) is outside \[0, 257\)"),
        ("layer.a", 0, torch.ones(3, 5), r"tensor 'layer.a': values must be a 1-D float tensor"),
        ("layer.a", 0, torch.ones(3, dtype=torch.int32), r"tensor 'layer.a': values must be a 1-D float"),
    ],
)
def test_fold_rejects_bad_input_and_leaves_the_sum_untouched(
    name: str, start: int, values: torch.Tensor, match: str
) -> None:
    acc = WeightedSum(SPECS)
    with pytest.raises(ValueError, match=match):
        acc.fold(name, start, values, 1.0)
    with pytest.raises(ValueError, match="weight must be finite"):
        acc.fold("layer.b", 0, torch.ones(3), float("nan"))
    acc.add_weight(1)
    assert all(bool((t == 0).all()) for _, t in acc.mean())


def test_constructor_rejects_duplicates_negative_dims_and_bad_dtypes() -> None:
    with pytest.raises(ValueError, match="'x' appears twice"):
        WeightedSum([("x", (2,)), ("x", (3,))])
    with pytest.raises(ValueError, match="negative dimension"):
        WeightedSum([("x", (2, -1))])
    with pytest.raises(ValueError, match=r"float64 or torch\.float32"):
        WeightedSum([("x", (2,))], dtype=torch.float16)


def test_mean_frees_each_accumulator_as_it_yields_and_is_single_use() -> None:
    acc = WeightedSum(SPECS)
    for name, shape in SPECS:
        acc.fold(name, 0, torch.full((int(np.prod(shape)),), 2.0), 3)
    acc.add_weight(3)
    acc.add_weight(1)
    assert (acc.count, acc.total_weight) == (2, 4.0)
    refs = {name: weakref.ref(acc._acc[name]) for name, _ in SPECS}
    sizes = {name: int(np.prod(shape)) * 8 for name, shape in SPECS}
    assert acc.nbytes == sum(sizes.values()) + 257 * 8  # fp32 values went through the fp64 scratch
    means = acc.mean()
    held = acc.nbytes
    assert held == sum(sizes.values())  # scratch dropped
    results = []
    for name, mean in means:
        held -= sizes[name]
        assert acc.nbytes == held
        assert refs[name]() is None, f"accumulator of {name!r} still alive after it was yielded"
        assert mean.dtype == torch.float32
        assert torch.equal(mean, torch.full(mean.shape, 1.5))
        results.append(name)
    assert results == [name for name, _ in SPECS]
    assert acc.nbytes == 0
    with pytest.raises(RuntimeError, match="mean\\(\\) was already called"):
        acc.mean()
    with pytest.raises(RuntimeError, match="mean\\(\\) was already called"):
        acc.fold("scale", 0, torch.ones(1), 1)


def test_sums_in_reused_memory_equal_fresh_ones_round_after_round() -> None:
    """A daemon's rounds share one block: each round starts from zeros and ends bit-identical to a fresh sum."""
    specs = [("w", (3, 5)), ("b", (5,)), ("s", ())]
    memory = ReusableBuffer()
    gen = torch.Generator().manual_seed(0)
    block = None
    for _ in range(3):
        deltas = [{n: torch.randn(shape, generator=gen) for n, shape in specs} for _ in range(2)]
        reused = WeightedSum(specs, dtype=torch.float32, memory=memory)
        fresh = WeightedSum(specs, dtype=torch.float32)
        for s in (reused, fresh):
            for k, delta in enumerate(deltas):
                for name, value in delta.items():
                    s.fold(name, 0, value.reshape(-1), weight=k + 1)
                s.add_weight(k + 1)
        got = dict(reused.mean())
        for name, want in fresh.mean():
            assert torch.equal(got[name], want)
        pointer = next(iter(got.values())).untyped_storage().data_ptr()
        assert block is None or pointer == block  # the same pages each round
        block = pointer
        reused.release()
    assert memory.nbytes == 4 * (15 + 5 + 1)


def test_a_second_sum_while_the_first_holds_the_memory_gets_its_own() -> None:
    memory = ReusableBuffer()
    first = WeightedSum([("w", (4,))], dtype=torch.float32, memory=memory)
    first.fold("w", 0, torch.ones(4), weight=1.0)
    first.add_weight(1.0)
    first_mean = dict(first.mean())["w"]
    second = WeightedSum([("w", (4,))], dtype=torch.float32, memory=memory)
    second.fold("w", 0, torch.full((4,), 2.0), weight=1.0)
    second.release()  # its memory was not the kept block: nothing is handed out twice
    third = WeightedSum([("w", (4,))], dtype=torch.float32, memory=memory)
    third.fold("w", 0, torch.full((4,), 5.0), weight=1.0)
    assert first_mean.tolist() == [1.0] * 4  # untouched by the sums that came after it
    first.release()
    with pytest.raises(RuntimeError):
        first.fold("w", 0, torch.ones(4), weight=1.0)
    fourth = WeightedSum([("w", (4,))], dtype=torch.float32, memory=memory)
    fourth.add_weight(1.0)
    fourth_mean = dict(fourth.mean())["w"]
    assert fourth_mean.untyped_storage().data_ptr() == first_mean.untyped_storage().data_ptr()
    assert fourth_mean.tolist() == [0.0] * 4  # zeroed when leased


def test_mean_with_zero_total_weight_raises_and_stays_usable() -> None:
    acc = WeightedSum(SPECS)
    with pytest.raises(ValueError, match="total weight is 0"):
        acc.mean()
    acc.fold("scale", 0, torch.ones(1), 2)
    acc.add_weight(2)
    assert dict(acc.mean())["scale"].item() == 1.0
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightedSum(SPECS).add_weight(-1)


# --- server optimizers ---------------------------------------------------------------------------

Rule = Callable[[list[np.ndarray]], list[np.ndarray]]


def _ref_fedavg(lr: float) -> Rule:
    return lambda deltas: [lr * d for d in deltas]


def _ref_fedavgm(lr: float, beta: float) -> Rule:
    def run(deltas: list[np.ndarray]) -> list[np.ndarray]:
        v, out = np.zeros_like(deltas[0]), []
        for d in deltas:
            v = beta * v + d
            out.append(lr * v)
        return out

    return run


def _ref_fedopt(
    method: str, lr: float, b1: float, b2: float, tau: float, signs: list[np.ndarray] | None = None
) -> Rule:
    """Reddi et al. Algorithm 2, m = v = 0 at the start, no bias correction; Yogi's signs recorded."""

    def run(deltas: list[np.ndarray]) -> list[np.ndarray]:
        m, v, out = np.zeros_like(deltas[0]), np.zeros_like(deltas[0]), []
        for d in deltas:
            m = b1 * m + (1 - b1) * d
            if method == "adam":
                v = b2 * v + (1 - b2) * d**2
            elif method == "yogi":
                if signs is not None:
                    signs.append(np.sign(v - d**2))
                v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            else:
                v = v + d**2
            out.append(lr * m / (np.sqrt(v) + tau))
        return out

    return run


def _round_deltas(seed: int, numel: int) -> list[np.ndarray]:
    """Four rounds; round 2 is tiny on one half and huge on the other, so Yogi's sign flips."""
    rng = np.random.default_rng(seed)
    scale2 = np.where(np.arange(numel) < numel // 2, 0.01, 10.0)
    scales = [np.ones(numel), scale2, np.full(numel, 0.5), np.full(numel, 3.0)]
    return [(rng.standard_normal(numel) * s).astype(np.float32) for s in scales]


CASES: list[tuple[Callable[[], ServerOptimizer], Rule]] = [
    (lambda: FedAvg(), _ref_fedavg(1.0)),
    (lambda: FedAvg(lr=0.7), _ref_fedavg(0.7)),
    (lambda: FedAvgM(lr=0.5, momentum=0.9), _ref_fedavgm(0.5, 0.9)),
    (lambda: FedAdam(lr=0.02, beta1=0.9, beta2=0.99, tau=1e-3), _ref_fedopt("adam", 0.02, 0.9, 0.99, 1e-3)),
    (lambda: FedYogi(lr=0.03, beta1=0.8, beta2=0.9, tau=1e-2), _ref_fedopt("yogi", 0.03, 0.8, 0.9, 1e-2)),
    (lambda: FedAdagrad(lr=0.1, tau=1e-3), _ref_fedopt("adagrad", 0.1, 0.0, 0.0, 1e-3)),
    (lambda: FedAdagrad(lr=0.1, beta1=0.9, tau=1e-3), _ref_fedopt("adagrad", 0.1, 0.9, 0.0, 1e-3)),
]
IDS = ["fedavg", "fedavg-lr", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedadagrad-momentum"]


@pytest.mark.parametrize(("make", "rule"), CASES, ids=IDS)
def test_optimizer_follows_the_papers_rule_over_rounds(
    make: Callable[[], ServerOptimizer], rule: Rule
) -> None:
    opt = make()
    per_tensor = {"w": _round_deltas(10, 64), "b": _round_deltas(11, 8)}
    expected = {name: rule([d.astype(np.float64) for d in ds]) for name, ds in per_tensor.items()}
    for t in range(4):
        for name in ("w", "b"):  # interleaved: state must stay per tensor
            got = opt.step(name, torch.from_numpy(per_tensor[name][t]))
            assert got.dtype == torch.float32
            want = expected[name][t]  # fp32 state vs fp64 reference: cancellation costs absolute error
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_yogi_case_exercises_both_signs() -> None:
    """The Yogi case above (same rule, seed and size) meets v > Δ̄² and v < Δ̄² after round one."""
    signs: list[np.ndarray] = []
    _ref_fedopt("yogi", 0.03, 0.8, 0.9, 1e-2, signs)([d.astype(np.float64) for d in _round_deltas(10, 64)])
    later = np.concatenate(signs[1:])
    assert (later > 0).any() and (later < 0).any()
    yogi, adam = FedYogi(beta1=0.0, beta2=0.9), FedAdam(beta1=0.0, beta2=0.9)
    first, second = (torch.from_numpy(d) for d in _round_deltas(10, 64)[:2])
    assert torch.allclose(yogi.step("w", first), adam.step("w", first), rtol=1e-6)  # from v = 0 they agree
    assert not torch.allclose(yogi.step("w", second), adam.step("w", second))  # then the sign term differs


def test_fedadam_first_rounds_by_hand() -> None:
    opt = FedAdam(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    # m = 0.1·2 = 0.2, v = 0.01·4 = 0.04, D = 0.01·0.2/(0.2 + 0.001)
    assert opt.step("x", torch.tensor([2.0])).item() == pytest.approx(0.01 * 0.2 / 0.201, rel=1e-6)
    # m = 0.18 − 0.1 = 0.08, v = 0.0396 + 0.01 = 0.0496, D = 0.01·0.08/(√0.0496 + 0.001)
    assert opt.step("x", torch.tensor([-1.0])).item() == pytest.approx(
        0.01 * 0.08 / (0.0496**0.5 + 0.001), rel=1e-6
    )


@pytest.mark.parametrize("make", [make for make, _ in CASES], ids=IDS)
def test_state_round_trip_continues_like_an_uninterrupted_run(make: Callable[[], ServerOptimizer]) -> None:
    rounds = [
        {n: torch.from_numpy(d) for n, d in zip("wb", ds, strict=True)}
        for ds in zip(_round_deltas(20, 33), _round_deltas(21, 33), strict=True)
    ]
    straight, first = make(), make()
    for r in rounds[:2]:
        for name, d in r.items():
            straight.step(name, d)
            first.step(name, d)
    saved = safetensors.torch.save(first.state_dict()) if first.state_dict() else b""
    resumed = make()
    resumed.load_state_dict(safetensors.torch.load(saved) if saved else {})
    for r in rounds[2:]:
        for name, d in r.items():
            assert torch.equal(_bits(straight.step(name, d)), _bits(resumed.step(name, d)))
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key])


def test_fedavg_lr_one_is_the_identity_bit_for_bit() -> None:
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    delta = torch.tensor([-0.0, 0.0, tiny, -tiny, 3.4e38, 1.0 + 2**-23, -7.25e-30], dtype=torch.float32)
    out = FedAvg().step("t", delta)
    assert out.data_ptr() == delta.data_ptr()  # returned as is: no multiply, no copy
    assert torch.equal(_bits(out), _bits(delta.clone()))
    halved = FedAvg(lr=0.5).step("t", delta)
    assert halved.data_ptr() != delta.data_ptr()
    assert torch.equal(halved, delta * 0.5)


def test_step_validates_before_touching_state() -> None:
    opt = FedAdam()
    opt.step("x", torch.ones(4))
    before = {k: v.clone() for k, v in opt.state_dict().items()}
    with pytest.raises(ValueError, match="must be float32"):
        opt.step("x", torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step("x", torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"shape \(5,\) but the fedadam state has \(4,\)"):
        opt.step("x", torch.ones(5))
    assert all(torch.equal(v, before[k]) for k, v in opt.state_dict().items())


def test_load_state_dict_rejects_foreign_state() -> None:
    adam_state = FedAdam().state_dict() | {"m/x": torch.zeros(2), "v/x": torch.zeros(2)}
    with pytest.raises(ValueError, match="unexpected state key 'm/x'; valid keys: 'v/<tensor>'"):
        FedAdagrad().load_state_dict(adam_state)
    with pytest.raises(ValueError, match="valid keys: none"):
        FedAvg().load_state_dict({"v/x": torch.zeros(2)})
    with pytest.raises(ValueError, match="cover different tensors"):
        FedAdam().load_state_dict({"m/x": torch.zeros(2)})
    with pytest.raises(ValueError, match="mismatched shapes"):
        FedAdam().load_state_dict({"m/x": torch.zeros(2), "v/x": torch.zeros(3)})
    with pytest.raises(ValueError, match="must be float32"):
        FedAvgM().load_state_dict({"v/x": torch.zeros(2, dtype=torch.float64)})


def test_make_optimizer_by_name() -> None:
    assert list(OPTIMIZERS) == ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
    for name, cls in OPTIMIZERS.items():
        opt = make_optimizer(name)
        assert type(opt) is cls and opt.name == name
    yogi = make_optimizer("fedyogi", lr=0.5, tau=0.1)
    assert isinstance(yogi, FedYogi) and (yogi.lr, yogi.tau, yogi.beta1) == (0.5, 0.1, 0.9)
    with pytest.raises(ValueError, match="valid choices: fedavg, fedavgm, fedadam, fedyogi, fedadagrad"):
        make_optimizer("fedsgd")
    with pytest.raises(ValueError, match="fedadagrad does not take beta2; it accepts: lr, beta1, tau"):
        make_optimizer("fedadagrad", beta2=0.9)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        make_optimizer("fedadam", beta1=1.0)
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        make_optimizer("fedadagrad", tau=0.0)


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=300),
    where=st.integers(min_value=0, max_value=299),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
)
def test_all_finite_finds_any_nan_or_infinity(size: int, where: int, bad: float | None) -> None:
    values = torch.randn(size) * 1e30
    if bad is not None:
        values[where % size] = bad
    assert all_finite(values) == (bad is None)
    assert all_finite(values.reshape(1, -1)) == (bad is None)


def test_all_finite_of_an_empty_tensor() -> None:
    assert all_finite(torch.empty(0))
