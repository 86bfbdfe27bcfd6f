"""Robust aggregation rules (coordinate-wise trimmed mean and median) on a real aggregator.

Uploads are pushed over gRPC in tiny shards, into a state whose tensors take a
group each under a 1 MiB buffer, so the close reads the spools back group by
group with shards across groups. The published state must be what numpy
computes from the same uploads; a site sending its delta x100 must not move it
beyond the honest sites' range; a restart mid-round must publish the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.codec import encode
from common.codec.compact import compact_tensor
from common.delta import MIB, Codec, Lossy, TensorSpec
from common.dtypes import DType
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode
from server.config import (
    AggregationConfig,
    ConfigError,
    CyBgdConfig,
    InfluenceConfig,
    RoundPolicy,
    ServerConfig,
)
from server.config_file import load_config
from server.robust import RankedUpload, robust_means, trim_per_side
from server.spool import Spool
from tests.scripted import (
    AdminClient,
    Aggregator,
    Harness,
    ScriptedSite,
    State,
    add,
    assert_same_bits,
    random_delta,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
LIVE = (
    federation_pb2.ROUND_STATE_OPEN,
    federation_pb2.ROUND_STATE_TRAINING,
    federation_pb2.ROUND_STATE_COLLECTING,
)
INT8 = Codec(lossy=Lossy.INT8)
SHARD = 16 * 1024  # tiny shards: several per tensor, and shards that hold two tensors
BUFFER = MIB  # with 3+ uploads, each tensor below is a group of its own
SAMPLES = {"a": 1, "b": 10, "c": 100, "d": 7, "e": 1000, "f": 3}  # unweighted: these must not matter


def init_state() -> State:
    gen = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(300, 300, generator=gen) * 0.02,
        "layers.0.q.weight": torch.randn(300, 300, generator=gen) * 0.02,
        "layers.0.norm.weight": torch.ones(300),
    }


INIT = init_state()


def harness(tmp_path: Path, name: str, n_sites: int, **overrides: Any) -> Harness:
    sites = {s: SAMPLES[s] for s in "abcdef"[:n_sites]}
    return Harness(tmp_path / name, sites, init=INIT, **overrides)


def push(h: Harness, site: str, delta: State, codec: Codec | None = None, round: int = 1) -> State:
    """Upload ``delta`` from ``site``; the dense tensors the aggregator stands for (lossy: what was sent)."""
    tensors, sent = delta, delta
    if codec is not None and codec.lossy is not Lossy.NONE:
        tensors, sent = {}, {}
        for name, t in delta.items():
            wire, sent[name] = compact_tensor(name, t, codec)
            tensors.update(wire)
    head, payload = h[site].header(tensors, round=round, base=round - 1, codec=codec, shard_bytes=SHARD)
    assert h[site].push(head, payload).accepted
    return sent


def reference(deltas: list[State], trim: int) -> State:
    """numpy: per coordinate, sort the K values, drop ``trim`` at each end, mean of the rest (fp64)."""
    out: State = {}
    for name in deltas[0]:
        stack = np.stack([d[name].numpy().reshape(-1) for d in deltas]).astype(np.float64)
        kept = np.sort(stack, axis=0)[trim : len(deltas) - trim]
        out[name] = torch.from_numpy(kept.mean(axis=0).astype(np.float32)).view(deltas[0][name].shape)
    return out


def sample_weighted(deltas: list[State], sites: list[str], name: str) -> torch.Tensor:
    """What the mean rule would publish for tensor ``name``: Σ n_i Δ_i / Σ n_i."""
    weights = torch.tensor([float(SAMPLES[s]) for s in sites], dtype=torch.float64)
    stack = torch.stack([d[name].double() for d in deltas])
    return ((stack * weights.view(-1, *[1] * (stack.dim() - 1))).sum(0) / weights.sum()).float()


def published(h: Harness, round_number: int = 1) -> tuple[admin_pb2.RoundStatus, State]:
    status = h.admin.wait_round(round_number)
    assert status.state == PUBLISHED, status.failure_reason
    number, state = h["a"].snapshot()
    assert number == round_number
    return status, state


CASES = {
    "median-odd": (5, AggregationConfig(rule="median"), None, 2),  # type: ignore[arg-type]
    "median-even": (4, AggregationConfig(rule="median"), None, 1),  # type: ignore[arg-type]
    "trimmed-count": (5, AggregationConfig(rule="trimmed_mean", trim_count=1), None, 1),  # type: ignore[arg-type]
    "trimmed-fraction-int8": (
        4,
        AggregationConfig(rule="trimmed_mean", trim_fraction=0.25),  # type: ignore[arg-type]
        INT8,
        1,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_rules_publish_what_numpy_computes_from_the_same_uploads(tmp_path: Path, case: str) -> None:
    n_sites, rule, codec, trim = CASES[case]
    rule = AggregationConfig(
        rule=rule.rule, trim_count=rule.trim_count, trim_fraction=rule.trim_fraction, buffer_bytes=BUFFER
    )
    training = TrainingSpec(upload_codec=codec) if codec is not None else TrainingSpec()
    h = harness(tmp_path, case, n_sites, aggregation=rule, training=training)
    try:
        h.join_all()
        sent = [push(h, s, random_delta(i, INIT), codec) for i, s in enumerate(h.sites)]
        status, state = published(h)
        want = add(INIT, reference(sent, trim))
        if case == "median-odd":
            assert_same_bits(state, want)  # the middle value itself: no arithmetic at all
        else:
            for name, tensor in want.items():
                torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=1e-9)
        # Not the sample-weighted mean: the rule ignores sample counts.
        weighted = sample_weighted(sent, list(h.sites), "embed.weight")
        assert not torch.allclose(state["embed.weight"] - INIT["embed.weight"], weighted, atol=1e-6)
        assert status.aggregation_rule == rule.rule.value and status.trimmed_per_side == trim
    finally:
        h.close()


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_site_sending_its_delta_x100_stays_within_the_honest_range(tmp_path: Path, rule: str) -> None:
    config = AggregationConfig(rule=rule, trim_count=1 if rule == "trimmed_mean" else 0)  # type: ignore[arg-type]
    h = harness(tmp_path, rule, 5, aggregation=config)
    try:
        h.join_all()
        honest = [random_delta(i, INIT) for i in range(4)]
        for site, delta in zip("abcd", honest, strict=True):
            push(h, site, delta)
        attack = {k: v * 100 for k, v in random_delta(99, INIT).items()}
        push(h, "e", attack)  # the site claiming the most samples, too
        _, state = published(h)
        for name, start in INIT.items():
            stack = torch.stack([d[name] for d in honest])
            low, high = start + stack.min(dim=0).values, start + stack.max(dim=0).values
            assert bool(((state[name] >= low) & (state[name] <= high)).all()), name
        # The weighted mean the attack would have pulled out of that range (so the check can fail).
        mean = sample_weighted([*honest, attack], list("abcde"), "embed.weight")
        assert float(mean.abs().max()) > 10 * float(
            torch.stack([d["embed.weight"] for d in honest]).abs().max()
        )
    finally:
        h.close()


def run_round(tmp_path: Path, name: str, *, restart: bool) -> State:
    """Three of four sites upload (one clipped), the round is closed by the operator; with ``restart``,
    the aggregator is stopped once the uploads are accepted and started again before the close."""
    config: dict[str, Any] = {
        "aggregation": AggregationConfig(rule="median", buffer_bytes=BUFFER),  # type: ignore[arg-type]
        "influence": InfluenceConfig(clip_norm=0.1),  # random_delta's norm is about 0.52: all clipped
    }
    h = harness(tmp_path, name, 4, **config)
    again: Aggregator | None = None
    admin, site = h.admin, h["a"]
    try:
        h.join_all()
        for i, s in enumerate("abc"):
            delta = random_delta(10 + i, INIT)
            if s == "b":
                delta = {k: v * 0.01 for k, v in delta.items()}  # under the bound: not clipped
            push(h, s, delta)
        if restart:
            h.agg.stop()
            again = Aggregator(h.agg.config)
            admin, site = AdminClient(again.target), ScriptedSite(again.target, "a", SAMPLES["a"])
            site.join(held_round=0)
        assert admin.round(1).state in LIVE  # the fourth site never uploads: the operator closes it
        admin.stub.CloseRound(admin_pb2.ControlRequest(reason="test"), metadata=admin.metadata, timeout=10)
        status = admin.wait_round(1)
        assert status.state == PUBLISHED, status.failure_reason
        scales = sorted(p.clip_scale for p in status.participants if p.accepted)
        assert scales[0] < 1.0 and scales[-1] == 1.0
        return site.snapshot()[1]
    finally:
        if again is not None:
            site.close()
            admin.close()
            again.stop()
        h.close()


def test_a_restart_mid_round_publishes_the_identical_median(tmp_path: Path) -> None:
    straight = run_round(tmp_path, "straight", restart=False)
    restarted = run_round(tmp_path, "restarted", restart=True)
    assert_same_bits(restarted, straight)
    assert not torch.equal(straight["embed.weight"], INIT["embed.weight"])


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rule": "trimmed_mean"}, "aggregation.trim_fraction"),
        ({"rule": "trimmed_mean", "trim_fraction": 0.6}, "aggregation.trim_fraction"),
        ({"rule": "trimmed_mean", "trim_fraction": 0.1, "trim_count": 1}, "aggregation.trim_count"),
        ({"rule": "median", "trim_count": 1}, "aggregation.rule"),
        ({"rule": "mode"}, "aggregation.rule"),
        ({"rule": "median", "buffer_bytes": 1024}, "aggregation.buffer_bytes"),
    ],
)
def test_bad_aggregation_settings_are_refused_naming_the_field(kwargs: Mapping[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AggregationConfig(**kwargs)
    assert caught.value.field == field and field in str(caught.value)


def test_rules_that_do_not_fit_the_method_or_the_quorum_are_refused() -> None:
    median = AggregationConfig(rule="median")  # type: ignore[arg-type]
    flexlora = TrainingSpec(method=Method.FLEXLORA, mode=TrainMode.LORA, lora=LoraSpec(rank=4))
    with pytest.raises(ConfigError, match="flexlora") as caught:
        ServerConfig(training=flexlora, aggregation=median)
    assert caught.value.field == "aggregation.rule"
    cyclic = TrainingSpec(method=Method.FEDCYBGD)
    with pytest.raises(ConfigError, match="one site per round"):
        ServerConfig(training=cyclic, aggregation=median)
    ServerConfig(training=cyclic, cybgd=CyBgdConfig(mode="agg"), aggregation=median)  # type: ignore[arg-type]
    trimmed = AggregationConfig(rule="trimmed_mean", trim_count=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"round\.min_sites") as caught:
        ServerConfig(aggregation=trimmed, round=RoundPolicy(min_sites=4))
    assert caught.value.field == "aggregation.trim_count"
    ServerConfig(aggregation=trimmed, round=RoundPolicy(min_sites=5))


def test_the_aggregation_section_of_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gdfed.toml"
    path.write_text('[aggregation]\nrule = "trimmed_mean"\ntrim_fraction = 0.2\n')
    config = load_config(path, {})
    assert config.aggregation.rule == "trimmed_mean" and config.aggregation.trim_fraction == 0.2
    path.write_text('[aggregation]\nrule = "median"\ntrim = 1\n')
    with pytest.raises(ConfigError, match="unknown settings") as caught:
        load_config(path, {})
    assert caught.value.field == "aggregation.trim"


# ---------------------------------------------------------------- the rule itself, on real spool files


def spooled(spool: Spool, upload_id: str, delta: State, scale: float = 1.0) -> RankedUpload:
    with spool.path(upload_id).open("wb") as f:
        layout = encode(delta, Codec(), f, shard_bytes=SHARD)
    return RankedUpload(upload_id, layout, scale)


def test_each_tensor_is_ranked_over_the_uploads_that_carry_it_and_the_trim_is_capped(tmp_path: Path) -> None:
    """A FedCyBGD agg round: uploads carry a block each; a tensor no upload carries stays 0."""
    spool = Spool(tmp_path)
    manifest = [TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in INIT.items()]
    q, norm = "layers.0.q.weight", "layers.0.norm.weight"
    blocks = [{q: random_delta(i, INIT)[q]} for i in range(3)] + [{norm: torch.full((300,), 0.5)}]
    uploads = [spooled(spool, f"u{i}", d, scale=0.5 if i == 0 else 1.0) for i, d in enumerate(blocks)]
    config = AggregationConfig(rule="trimmed_mean", trim_count=2)  # type: ignore[arg-type]
    assert trim_per_side(config, 3) == 1 and trim_per_side(config, 1) == 0 and trim_per_side(config, 9) == 2
    out = dict(robust_means(uploads, spool, manifest, config))
    assert list(out) == list(INIT)
    assert torch.equal(out["embed.weight"], torch.zeros(300, 300))
    assert torch.equal(out[norm], torch.full((300,), 0.5))  # one upload: trimmed to none
    values = [blocks[0][q] * 0.5, blocks[1][q], blocks[2][q]]  # the first one clipped by half
    assert torch.equal(out[q], torch.stack(values).median(dim=0).values)  # 3 values, 1 per side dropped
