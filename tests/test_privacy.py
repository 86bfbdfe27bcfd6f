"""Client-level differential privacy (DP-FedAvg style) on a real aggregator.

The noise is checked two ways: statistically, on a million coordinates (its
std within 2 % of z·C/K, where the sampling error is 0.07 %), and exactly, by
deriving it in the test from the secret as docs/operator.md describes. The ε in
status must be what opacus's RDPAccountant gives for the same rounds, across a
restart; a round rebuilt after a restart must publish the same bits.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode
from server.admin_cli import render_run
from server.config import AggregationConfig, ConfigError, InfluenceConfig, PrivacyConfig, ServerConfig
from server.status_json import status_document
from tests.scripted import (
    AdminClient,
    Aggregator,
    Harness,
    ScriptedSite,
    State,
    assert_same_bits,
    make_config,
    random_delta,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
SEED = "privacy.seed"
BIG = {"w": torch.zeros(1000, 1000), "b": torch.zeros(1000)}  # a million coordinates of noise to measure


def norm(delta: State) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))


def push(site: ScriptedSite, delta: State, round: int = 1) -> None:
    head, payload = site.header(delta, round=round, base=round - 1)
    assert site.push(head, payload).accepted


def expected_noise(
    secret: bytes, run_id: str, round_number: int, name: str, shape: torch.Size
) -> torch.Tensor:
    """The documented scheme, derived here: a generator per tensor, seeded by 63 bits of
    HMAC-SHA256(secret, "gdfed-dp-noise/run/round/name"), drawn 2^20 values at a time."""
    message = f"gdfed-dp-noise/{run_id}/{round_number}/{name}".encode()
    seed = int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:8], "big") & ((1 << 63) - 1)
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    parts = [torch.randn(min(1 << 20, n - lo), generator=gen) for lo in range(0, n, 1 << 20)]
    return torch.cat(parts).view(shape)


def dp(z: float, clip: float, **privacy: Any) -> dict[str, Any]:
    return {
        "privacy": PrivacyConfig(noise_multiplier=z, **privacy),
        "influence": InfluenceConfig(clip_norm=clip),
    }


def test_the_noise_has_std_z_c_over_k_and_is_the_documented_draw(tmp_path: Path) -> None:
    h = Harness(tmp_path / "run", {"a": 10, "b": 30}, init=BIG, **dp(1.0, 1.0))
    try:
        secret_file = h.agg.config.state_dir / SEED
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = bytes.fromhex(secret_file.read_text().strip())
        assert len(secret) == 32
        h.join_all()
        da = random_delta(1, BIG, scale=1e-4)  # norm about 0.1: under C
        db = random_delta(2, BIG, scale=1e-2)  # norm about 10: clipped to C
        push(h["a"], da)
        push(h["b"], db)
        status = h.admin.wait_round(1)
        assert status.state == PUBLISHED, status.failure_reason
        _, state = h["a"].snapshot()
        # Uniform weights (not 10 and 30), each upload clipped to C = 1; K = 2.
        scale_b = 1.0 / norm(db)
        mean = {k: (da[k].double() + db[k].double() * scale_b) / 2 for k in BIG}
        residual = torch.cat([(state[k].double() - mean[k]).reshape(-1) for k in BIG])
        std = 1.0 * 1.0 / 2
        assert abs(float(residual.std()) / std - 1) < 0.02
        assert abs(float(residual.mean())) < 0.01 * std
        within = float((residual.abs() < std).double().mean())
        assert abs(within - 0.6827) < 0.01  # Gaussian, not just any distribution with that std
        # Exactly the documented draw: the noise is reproducible from the secret, and only from it.
        for name, shape in ((k, v.shape) for k, v in BIG.items()):
            want = mean[name] + std * expected_noise(secret, "test-run", 1, name, shape).double()
            torch.testing.assert_close(state[name].double(), want, rtol=0, atol=1e-5)
        assert status.dp_noise_std == pytest.approx(std) and status.dp_noise_multiplier == 1.0
        assert status.dp_sample_rate == 1.0  # population 0: the 2 registered sites, both in the round
        scales = {p.site_id: p.clip_scale for p in status.participants}
        assert scales["a"] == 1.0 and scales["b"] == pytest.approx(scale_b, rel=1e-9)
    finally:
        h.close()


def run_round(tmp: Path, name: str, secret: bytes, *, restart: bool) -> State:
    """Two of three sites upload under DP; with ``restart`` the aggregator is stopped once they are
    accepted and started again before the operator closes the round."""
    state_dir = tmp / name / "state"
    state_dir.mkdir(parents=True)
    (state_dir / SEED).write_text(secret.hex() + "\n")
    (state_dir / SEED).chmod(0o600)
    h = Harness(tmp / name, {"a": 10, "b": 30, "c": 5}, **dp(0.8, 0.05))
    again: Aggregator | None = None
    admin, site = h.admin, h["a"]
    try:
        h.join_all()
        push(h["a"], random_delta(5, h.init))
        push(h["b"], random_delta(6, h.init, scale=1e-5))
        if restart:
            h.agg.stop()
            again = Aggregator(h.agg.config)
            admin, site = AdminClient(again.target), ScriptedSite(again.target, "a", 10)
            site.join(held_round=0)
        admin.stub.CloseRound(admin_pb2.ControlRequest(reason="test"), metadata=admin.metadata, timeout=10)
        status = admin.wait_round(1)
        assert status.state == PUBLISHED, status.failure_reason
        assert status.dp_noise_std == pytest.approx(0.8 * 0.05 / 2)
        return site.snapshot()[1]
    finally:
        if again is not None:
            site.close()
            admin.close()
            again.stop()
        h.close()


def test_a_restart_mid_round_publishes_the_identical_noised_state(tmp_path: Path) -> None:
    secret = bytes(range(32))
    straight = run_round(tmp_path, "straight", secret, restart=False)
    restarted = run_round(tmp_path, "restarted", secret, restart=True)
    assert_same_bits(restarted, straight)
    other = run_round(tmp_path, "other-secret", bytes(range(1, 33)), restart=False)
    assert not torch.equal(other["embed.weight"], straight["embed.weight"])  # the noise is the secret's


def direct_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=q)
    return float(accountant.get_epsilon(delta=delta))


def test_epsilon_in_status_is_the_rdp_accountants_and_survives_a_restart(tmp_path: Path) -> None:
    z, delta, population = 1.1, 1e-5, 10
    h = Harness(tmp_path / "run", {"a": 10, "b": 30}, **dp(z, 0.05, delta=delta, population=population))
    again: Aggregator | None = None
    sites: list[ScriptedSite] = []
    admin: AdminClient | None = None
    try:
        h.join_all()
        assert h.admin.status().dp_rounds == 0 and h.admin.status().dp_epsilon == 0
        for i, s in enumerate("ab"):
            push(h[s], random_delta(i, h.init))
        assert h.admin.wait_round(1).state == PUBLISHED
        first = h.admin.status()
        eps1 = direct_epsilon(z, 2 / population, 1, delta)
        assert first.dp_epsilon == pytest.approx(eps1, rel=1e-9)
        assert (first.dp_delta, first.dp_noise_multiplier, first.dp_rounds) == (delta, z, 1)

        h.agg.stop()  # the accountant is not kept: round 2's ε comes from the records after a restart
        again = Aggregator(h.agg.config)
        admin = AdminClient(again.target)
        sites = [ScriptedSite(again.target, s, n) for s, n in (("a", 10), ("b", 30))]
        for site in sites:
            site.join(held_round=1)
            site.start_beating()
        for i, site in enumerate(sites):
            push(site, random_delta(10 + i, h.init), round=2)
        round2 = admin.wait_round(2)
        assert round2.state == PUBLISHED, round2.failure_reason
        eps2 = direct_epsilon(z, 2 / population, 2, delta)
        assert eps2 > eps1
        status = admin.status()
        assert status.dp_epsilon == pytest.approx(eps2, rel=1e-9) and status.dp_rounds == 2
        rounds = admin.rounds()
        by_round = {r.round: r for r in rounds}
        assert by_round[1].dp_epsilon == pytest.approx(eps1, rel=1e-9)
        assert by_round[2].dp_epsilon == pytest.approx(eps2, rel=1e-9)
        assert by_round[2].dp_sample_rate == pytest.approx(0.2) and by_round[2].aggregation_rule == "mean"
        # What the operator reads: the JSON document and the text status.
        doc = status_document(status, rounds, list(admin.sites().values()))
        assert doc["run"]["privacy"] == {
            "epsilon": pytest.approx(eps2, rel=1e-9),
            "delta": delta,
            "noise_multiplier": z,
            "rounds": 2,
        }
        shown = {r["round"]: r for r in doc["rounds"]}
        assert shown[2]["privacy"]["noise_std"] == pytest.approx(z * 0.05 / 2)
        assert shown[3]["privacy"]["epsilon"] is None and shown[3]["aggregation_rule"] is None  # open
        assert any(line.startswith(f"privacy: ε={eps2:.4g} at δ=1e-05") for line in render_run(status))
    finally:
        for site in sites:
            site.close()
        if admin is not None:
            admin.close()
        if again is not None:
            again.stop()
        h.close()


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"privacy": PrivacyConfig(noise_multiplier=1.0)}, "influence.clip_norm"),
        (
            {
                "privacy": PrivacyConfig(noise_multiplier=1.0),
                "influence": InfluenceConfig(clip_norm=1.0, adaptive=2.0),
            },
            "influence.adaptive",
        ),
        (
            {**dp(1.0, 1.0), "aggregation": AggregationConfig(rule="median")},  # type: ignore[arg-type]
            "aggregation.rule",
        ),
        (
            {
                **dp(1.0, 1.0),
                "training": TrainingSpec(method=Method.FLEXLORA, mode=TrainMode.LORA, lora=LoraSpec(rank=4)),
            },
            "privacy.noise_multiplier",
        ),
    ],
)
def test_dp_that_cannot_hold_is_refused_naming_the_setting(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig(**overrides)
    assert caught.value.field == field and field in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": -1.0}, "privacy.noise_multiplier"),
        ({"noise_multiplier": math.nan}, "privacy.noise_multiplier"),
        ({"delta": 0.0}, "privacy.delta"),
        ({"delta": 0.6}, "privacy.delta"),
        ({"population": -3}, "privacy.population"),
    ],
)
def test_bad_privacy_settings_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PrivacyConfig(**kwargs)
    assert caught.value.field == field


def test_a_damaged_secret_stops_the_start(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"], **dp(1.0, 1.0))
    config.state_dir.mkdir(parents=True)
    (config.state_dir / SEED).write_text("not hex\n")
    with pytest.raises(ConfigError, match="DP noise secret"):
        Aggregator(config)
    (config.state_dir / SEED).write_text("abcd\n")
    with pytest.raises(ConfigError, match="must be 32"):
        Aggregator(config)
