"""Bounded influence of a site: norm refusal, clipping and outlier flags, on a real aggregator.

The issue's case first: a site sending a finite but huge delta (3e38 with
sample_count 2) used to overflow the sum and fail the round for everyone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import torch

from common.codec.shard_decoder import DecodedPiece
from common.delta import TensorSpec
from common.dtypes import DType
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from server.accumulation import Accumulation
from server.config import ConfigError, InfluenceConfig, RoundPolicy
from server.influence import RoundBounds
from server.records import UploadRecord, UploadState
from tests.scripted import (
    Harness,
    MakeHarness,
    State,
    add,
    assert_same_bits,
    harnesses,
    random_delta,
    rpc_code,
    small_state,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def norm(delta: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))


def huge(like: Mapping[str, torch.Tensor], value: float = 3e38) -> State:
    return {k: torch.full(v.shape, value) for k, v in like.items()}


def uploads(h: Harness, round_number: int) -> dict[str, UploadRecord]:
    store = h.agg.coordinator.state.store
    rows = store.select(UploadRecord, "round = ? AND state = ?", (round_number, int(UploadState.ACCEPTED)))
    return {u.site_id: u for u in rows}


def clipped_mean(contributions: list[tuple[State, int]], bound: float) -> State:
    """Σ n_i·min(1, bound/‖Δ_i‖)·Δ_i / Σ n_i, computed directly in fp64."""
    total = sum(n for _, n in contributions)
    out: State = {}
    for name in contributions[0][0]:
        acc = torch.zeros(contributions[0][0][name].shape, dtype=torch.float64)
        for delta, n in contributions:
            acc += delta[name].double() * (n * min(1.0, bound / norm(delta)))
        out[name] = acc / total
    return out


def assert_close_state(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in want.items():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name].double(), tensor.double(), rtol=1e-5, atol=1e-7)


def test_a_huge_delta_is_refused_and_the_round_publishes_with_the_honest_site(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 2}, round=RoundPolicy(min_sites=1))
    h.join_all()
    bad_head, bad_payload = h["b"].header(huge(h.init), round=1, base=0)
    code = rpc_code(lambda: h["b"].push(bad_head, bad_payload))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    da = random_delta(1, h.init)
    head, payload = h["a"].header(da, round=1, base=0)
    assert h["a"].push(head, payload).accepted

    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED, status.failure_reason  # PUBLISHED
    _, state = h["a"].snapshot()
    assert_same_bits(state, add(h.init, h.mean([(da, 10)])))
    assert all(torch.isfinite(t).all() for t in state.values())
    store = h.agg.coordinator.state.store
    refused = store.get(UploadRecord, bad_head.upload_id)
    assert refused is not None and refused.state is UploadState.REJECTED
    assert "influence.max_norm" in refused.reason and "norm" in refused.reason
    assert uploads(h, 1)["a"].norm == pytest.approx(norm(da), rel=1e-9)


def test_clipping_bounds_each_upload_and_keeps_the_honest_ones(harness: MakeHarness) -> None:
    honest = random_delta(1, small_state())
    bound = 2.0 * norm(honest)
    h = harness({"a": 10, "b": 20, "c": 2}, influence=InfluenceConfig(clip_norm=bound))
    h.join_all()
    db = {k: v * 100 for k, v in random_delta(2, h.init).items()}  # the delta x100
    for site, delta in (("a", honest), ("b", db)):
        head, payload = h[site].header(delta, round=1, base=0)
        assert h[site].push(head, payload).accepted
    bad_head, bad_payload = h["c"].header(huge(h.init), round=1, base=0)
    assert rpc_code(lambda: h["c"].push(bad_head, bad_payload)) is grpc.StatusCode.INVALID_ARGUMENT
    h.admin.stub.CloseRound(admin_pb2.ControlRequest(reason="test"), metadata=h.admin.metadata, timeout=10)
    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED, status.failure_reason
    _, state = h["a"].snapshot()
    mean = clipped_mean([(honest, 10), (db, 20)], bound)
    assert_close_state({k: state[k] - h.init[k] for k in state}, mean)
    # b moved the model by its clipped share only: its weighted share of the mean is within the bound.
    moved = norm({k: state[k].double() - h.init[k].double() for k in state})
    assert moved <= bound * (1 + 1e-5)
    records = uploads(h, 1)
    assert records["a"].clip_scale == 1.0
    assert records["b"].clip_scale == pytest.approx(bound / norm(db), rel=1e-9)
    assert records["b"].norm == pytest.approx(norm(db), rel=1e-9)


def test_adaptive_clipping_and_outliers_follow_the_median_of_recent_norms(harness: MakeHarness) -> None:
    h = harness(
        {"a": 10, "b": 10},
        influence=InfluenceConfig(adaptive=2.0, outlier_factor=3.0),
    )
    h.join_all()
    r1 = [random_delta(1, h.init), random_delta(2, h.init)]
    for site, delta in zip("ab", r1, strict=True):
        head, payload = h[site].header(delta, round=1, base=0)
        assert h[site].push(head, payload).accepted
    assert h.admin.wait_round(1).state == PUBLISHED
    _, base = h["a"].snapshot()
    # Round 2: b sends 100x its honest size: an outlier, clipped at 2 x the median of round 1's norms.
    da, db = random_delta(3, h.init), {k: v * 100 for k, v in random_delta(4, h.init).items()}
    for site, delta in (("a", da), ("b", db)):
        head, payload = h[site].header(delta, round=2, base=1)
        assert h[site].push(head, payload).accepted
    assert h.admin.wait_round(2).state == PUBLISHED
    _, state = h["a"].snapshot()
    median = sorted(norm(d) for d in r1)
    bound = 2.0 * (median[0] + median[1]) / 2
    assert_close_state({k: state[k] - base[k] for k in state}, clipped_mean([(da, 10), (db, 10)], bound))
    records = uploads(h, 2)
    assert records["b"].outlier and not records["a"].outlier
    assert records["b"].clip_scale == pytest.approx(bound / norm(db), rel=1e-9)
    # The operator sees it in the round's detail.
    shown = {p.site_id: p for p in h.admin.round(2).participants}
    assert shown["b"].outlier and shown["b"].clip_scale == pytest.approx(bound / norm(db), rel=1e-9)
    assert not shown["a"].outlier and shown["a"].clip_scale == 1.0
    assert shown["a"].norm == pytest.approx(norm(da), rel=1e-9)


# ---------------------------------------------------------------- the sum itself

SPEC = [TensorSpec("w", DType.F32, (4,))]


def piece(values: torch.Tensor) -> list[DecodedPiece]:
    return [DecodedPiece(0, "w", 0, values)]


def test_a_delta_near_the_float32_limit_is_clipped_exactly_in_the_rebuilt_sum() -> None:
    bounds = RoundBounds(clip=2.0, max_norm=math.inf)
    streaming = Accumulation(1, SPEC, "fp32", bounds=bounds)
    big = torch.full((4,), 3e38)
    assert streaming.fold("big", 0, piece(big), 2)  # held: over the bound, nothing added
    assert streaming.accept("big", 2)
    assert streaming.dirty  # rebuilt, clipped, when the round closes
    assert streaming.norm("big") == pytest.approx(6e38, rel=1e-6)

    rebuilt = Accumulation(1, SPEC, "fp32", bounds=bounds)
    rebuilt.fold("big", 0, piece(big), 2, scale=bounds.scale(streaming.norm("big")))
    rebuilt.accept("big", 2)
    honest = torch.tensor([0.1, -0.2, 0.3, 0.0])
    rebuilt.fold("ok", 0, piece(honest), 1)
    rebuilt.accept("ok", 1)
    [(_, mean)] = list(rebuilt.sum.mean())
    want = (2 * big.double() * (2.0 / (3e38 * 2)) + honest.double()) / 3
    torch.testing.assert_close(mean.double(), want, rtol=1e-6, atol=1e-7)


def test_an_upload_that_would_overflow_the_sum_is_refused_before_it_is_added() -> None:
    acc = Accumulation(1, SPEC, "fp32", bounds=RoundBounds(max_norm=math.inf))
    acc.fold("ok", 0, piece(torch.ones(4)), 1)
    with pytest.raises(InvalidArgument, match="accumulator's safe range"):
        acc.fold("big", 0, piece(torch.full((4,), 3e38)), 2)
    acc.accept("ok", 1)
    [(_, mean)] = list(acc.sum.mean())
    assert torch.equal(mean, torch.ones(4))


def test_the_influence_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"influence\.clip_norm"):
        InfluenceConfig(clip_norm=-1)
    with pytest.raises(ConfigError, match=r"influence\.max_norm"):
        InfluenceConfig(max_norm=0)
    with pytest.raises(ConfigError, match=r"influence\.adaptive"):
        InfluenceConfig(adaptive=float("nan"))
