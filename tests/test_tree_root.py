"""The root of a tree of aggregators: partial sums from its [tree] intermediates, and its view of the tree.

A real aggregator in-process on 127.0.0.1; the intermediates are scripted sites
(tests/scripted.py) that upload PARTIAL_SUMs they form here from site deltas, the
way an intermediate with an fp64 accumulator forms them (Σ n_i·Δ_i in fp64, one
rounding to fp32). What the root must publish is then computed in torch twice:

- bit for bit, the root's own fold (each partial sum with weight 1, a site's DIFF
  with its n, in acceptance order, fp64; one division by Σ n_i; fp32);
- within the stated bound of the flat federation's mean Σ n_i·Δ_i / Σ n_i over
  the same site deltas (docs/operator.md, "A tree of aggregators: the root"):
  per element 2^-24·A/W + (K+1)·2^-52·A/W + one fp32 ulp, A = Σ n_i·|Δ_i|,
  W = Σ n_i, K the site uploads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from common.delta import Cast, Codec, DeltaHeader, DeltaKind
from common.errors import metadata_of, reason_of
from common.pb.gradualdiff.v1 import federation_pb2
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode
from server.admin_cli import render
from server.config import (
    AggregationConfig,
    AggregationRule,
    ConfigError,
    InfluenceConfig,
    OptimizerConfig,
    OptimizerName,
    PrivacyConfig,
    RoundPolicy,
    ServerConfig,
)
from server.config_file import load_config
from server.optimizers import make_optimizer
from server.status_json import status_document
from server.tree_config import TreeConfig
from tests.scripted import (
    ROOT,
    AdminClient,
    Aggregator,
    Harness,
    MakeHarness,
    Payload,
    ScriptedSite,
    State,
    add,
    assert_same_bits,
    harnesses,
    random_delta,
    refusal,
    weighted_mean,
)
from tests.test_status import check_document, documented_fields

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
TREE = TreeConfig(intermediates=("eu", "us"))
Parts = Sequence[tuple[State, int]]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path, tree=TREE, accumulator="fp64") as make:
        yield make


def partial_sum(parts: Parts) -> State:
    """Σ n_i·Δ_i as an intermediate with an fp64 accumulator sends it: fp64 sum, one rounding to fp32."""
    out: State = {}
    for name in parts[0][0]:
        acc = torch.zeros(parts[0][0][name].shape, dtype=torch.float64)
        for delta, n in parts:
            acc.add_(delta[name].to(torch.float64), alpha=float(n))
        out[name] = acc.to(torch.float32)
    return out


def partial_upload(
    site: ScriptedSite,
    parts: Parts,
    *,
    round: int = 1,
    base: int = 0,
    upload_id: str | None = None,
    codec: Codec | None = None,
    **fields: Any,
) -> tuple[DeltaHeader, Payload, State]:
    """A PARTIAL_SUM of ``parts`` (site deltas with their n_i) from ``site``: header, payload, the sum."""
    values = partial_sum(parts)
    header, payload = site.header(
        values, round=round, base=base, samples=sum(n for _, n in parts), upload_id=upload_id, codec=codec
    )
    header = dataclasses.replace(header, **({"kind": DeltaKind.PARTIAL_SUM, "sites": len(parts)} | fields))
    return header, payload, values


def root_fold(folded: Sequence[tuple[State, float]], total: int) -> State:
    """The root's fold, bit for bit: Σ alpha_j·X_j in fp64 in acceptance order, / total, fp32."""
    out: State = {}
    for name in folded[0][0]:
        acc = torch.zeros(folded[0][0][name].shape, dtype=torch.float64)
        for values, alpha in folded:
            acc.add_(values[name].to(torch.float64), alpha=alpha)
        out[name] = acc.div_(float(total)).to(torch.float32)
    return out


def assert_within_tree_bound(got: Mapping[str, torch.Tensor], sites: Parts) -> None:
    """``got`` is within the documented bound of the flat federation's mean of ``sites``."""
    flat = weighted_mean(sites, torch.float64)  # what a flat aggregator publishes for them
    total = float(sum(n for _, n in sites))
    for name, want in flat.items():
        a = sum(
            (delta[name].double().abs() * n for delta, n in sites),
            torch.zeros(want.shape, dtype=torch.float64),
        )
        top = torch.maximum(got[name].abs(), want.abs())
        ulp = (torch.nextafter(top, torch.full_like(top, float("inf"))) - top).double()
        bound = 2.0**-24 * a / total + (len(sites) + 1) * 2.0**-52 * a / total + ulp
        error = (got[name].double() - want.double()).abs()
        assert bool((error <= bound).all()), (
            f"{name}: off by {float((error - bound).max()):.3g} past the bound"
        )
        assert float(bound.max()) < 1e-9  # the bound is tight enough to mean something at these scales


def open_round(h: Harness, *sites: str) -> None:
    """The named sites join (and beat); round 1 opens."""
    for name in sites:
        h[name].join()
        h[name].start_beating()
    spec = h[sites[0]].await_round(after=0)
    assert spec.round == 1


def published_state(h: Harness, site: str) -> State:
    """The state round 1 published, as ``site`` fetches it (a snapshot: θ_0 + the published difference)."""
    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED, status.failure_reason
    number, state = h[site].snapshot()
    assert number == 1
    return state


def refused(site: ScriptedSite, header: DeltaHeader, payload: Payload) -> grpc.RpcError:
    return refusal(lambda: site.push(header, payload))


# ---------------------------------------------------------------- the fold


def test_partial_sums_and_a_sites_own_upload_publish_the_flat_mean(harness: MakeHarness) -> None:
    h = harness({"eu": 20, "us": 30, "own": 5})
    open_round(h, "eu", "us", "own")
    d = [random_delta(seed, h.init) for seed in range(5)]
    eu_parts, us_parts, own = [(d[0], 7), (d[1], 13)], [(d[2], 11), (d[3], 19)], (d[4], 5)
    eu_head, eu_payload, eu_sum = partial_upload(h["eu"], eu_parts)
    us_head, us_payload, us_sum = partial_upload(h["us"], us_parts)
    assert h["eu"].push(eu_head, eu_payload).accepted
    assert h["us"].push(us_head, us_payload).accepted
    own_head, own_payload = h["own"].header(own[0], round=1, base=0)
    assert h["own"].push(own_head, own_payload).accepted

    mean = root_fold([(eu_sum, 1.0), (us_sum, 1.0), (own[0], 5.0)], 55)
    assert_same_bits(published_state(h, "own"), add(h.init, mean))
    assert_within_tree_bound(mean, [*eu_parts, *us_parts, own])
    report = h.admin.round(1)
    assert report.samples == 55  # the partial sums' Σ n_i count once each
    by_site = {p.site_id: p for p in report.participants}
    assert [(by_site[s].sample_count, by_site[s].sites) for s in ("eu", "us", "own")] == [
        (20, 2),
        (30, 2),
        (5, 0),
    ]


def test_the_server_optimizer_steps_on_the_same_mean(harness: MakeHarness) -> None:
    h = harness({"eu": 20, "us": 30}, optimizer=OptimizerConfig(name=OptimizerName.FEDADAM, lr=0.01))
    open_round(h, "eu", "us")
    d = [random_delta(seed, h.init) for seed in range(10, 13)]
    eu_parts, us_parts = [(d[0], 7), (d[1], 13)], [(d[2], 30)]
    pushed = []
    for site, parts in (("eu", eu_parts), ("us", us_parts)):
        head, payload, values = partial_upload(h[site], parts)
        assert h[site].push(head, payload).accepted
        pushed.append((values, 1.0))
    mean = root_fold(pushed, 50)
    assert_within_tree_bound(mean, [*eu_parts, *us_parts])
    adam = make_optimizer("fedadam", lr=0.01)
    stepped = {name: adam.step(name, values) for name, values in mean.items()}
    assert_same_bits(published_state(h, "eu"), add(h.init, stepped))


def test_per_site_bounds_skip_partial_sums_and_a_rebuilt_sum_keeps_their_weight(harness: MakeHarness) -> None:
    # The partial sum's norm (~8) is far over clip_norm and max_norm: a sum's norm, not a site's.
    h = harness({"eu": 20, "own": 5}, influence=InfluenceConfig(clip_norm=0.5, max_norm=1.0))
    open_round(h, "eu", "own")
    eu_parts = [(random_delta(20, h.init, scale=1e-2), 7), (random_delta(21, h.init, scale=1e-2), 13)]
    head, payload, eu_sum = partial_upload(h["eu"], eu_parts)
    assert h["eu"].push(head, payload).accepted
    # A site's own upload over max_norm is still refused; what it folded makes the sum dirty, so the
    # close rebuilds it from the spools, where the partial sum must keep its weight 1.
    big_head, big_payload = h["own"].header(random_delta(22, h.init, scale=1e-1), round=1, base=0)
    assert reason_of(refused(h["own"], big_head, big_payload)) == "INVALID_ARGUMENT"
    own = random_delta(23, h.init)
    own_head, own_payload = h["own"].header(own, round=1, base=0)
    assert h["own"].push(own_head, own_payload).accepted

    assert_same_bits(published_state(h, "own"), add(h.init, root_fold([(eu_sum, 1.0), (own, 5.0)], 25)))
    rows = {p.site_id: p for p in h.admin.round(1).participants}
    assert rows["eu"].norm > 1.0 and rows["eu"].clip_scale == 1.0 and not rows["eu"].outlier
    assert rows["own"].clip_scale == 1.0


# ---------------------------------------------------------------- who may send what


def test_partial_sums_only_from_intermediates_and_only_partial_sums_from_them(harness: MakeHarness) -> None:
    h = harness({"eu": 20, "us": 30, "own": 5})
    open_round(h, "eu", "us", "own")
    parts = [(random_delta(30, h.init), 8), (random_delta(31, h.init), 12)]

    head, payload, _ = partial_upload(h["own"], parts)
    error = refused(h["own"], head, payload)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and reason_of(error) == "NOT_AN_INTERMEDIATE"
    assert "'own' is not one of this aggregator's [tree] intermediates (eu, us)" in str(error.details())
    head, payload = h["eu"].header(parts[0][0], round=1, base=0)
    error = refused(h["eu"], head, payload)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and reason_of(error) == "PARTIAL_SUMS_ONLY"

    cases: list[tuple[dict[str, Any], str]] = [
        ({"sites": 0}, "sites"),
        ({"sites": 21}, "sites"),
        ({"sample_count": 0}, "sample_count"),
    ]
    for fields, field in cases:
        head, payload, _ = partial_upload(h["eu"], parts, **fields)
        error = refused(h["eu"], head, payload)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, fields
        assert metadata_of(error)["field"] == field, fields
    head, payload = h["own"].header(parts[0][0], round=1, base=0)
    error = refused(h["own"], dataclasses.replace(head, sites=2), payload)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and metadata_of(error)["field"] == "sites"
    head, payload, _ = partial_upload(h["eu"], parts, codec=Codec(cast=Cast.BF16))
    error = refused(h["eu"], head, payload)
    assert reason_of(error) == "CODEC_MISMATCH" and metadata_of(error)["field"] == "codec.cast"

    # Refused at the header: nothing was recorded, and the same intermediate's valid sum goes in.
    head, payload, _ = partial_upload(h["eu"], parts)
    assert h["eu"].push(head, payload).accepted
    assert [p.site_id for p in h.admin.round(1).participants if p.accepted] == ["eu"]


def test_a_root_without_a_tree_refuses_partial_sums(tmp_path: Path) -> None:
    with harnesses(tmp_path) as make:
        h = make({"eu": 20})
        open_round(h, "eu")
        head, payload, _ = partial_upload(h["eu"], [(random_delta(40, h.init), 20)])
        error = refused(h["eu"], head, payload)
        assert reason_of(error) == "NOT_AN_INTERMEDIATE" and "none: it is not the root of a tree" in str(
            error.details()
        )


# ---------------------------------------------------------------- counted once


def test_a_cut_resumed_and_retried_partial_sum_counts_once(harness: MakeHarness) -> None:
    h = harness({"eu": 20, "us": 30})
    open_round(h, "eu", "us")
    eu, us = h["eu"], h["us"]
    head, payload, eu_sum = partial_upload(
        eu, [(random_delta(50, h.init), 9), (random_delta(51, h.init), 11)], upload_id="eu.r1.sum"
    )
    chunks = list(eu.chunks(head, payload, chunk_bytes=1024))
    assert len(chunks) > 8
    with pytest.raises(grpc.RpcError):  # cut after a quarter: ABORTED, what arrived is kept
        eu.push_messages(iter(chunks[: len(chunks) // 4]))
    committed = eu.offset("eu.r1.sum").committed_offset
    assert 0 < committed < len(payload)
    first = eu.push(head, payload, start=committed, chunk_bytes=1024)
    assert first.accepted and not first.duplicate
    again = eu.push(head, payload)  # the intermediate restarted and sends it once more
    assert again.accepted and again.duplicate
    assert h.admin.round(1).samples == 20

    us_head, us_payload, us_sum = partial_upload(us, [(random_delta(52, h.init), 30)])
    assert us.push(us_head, us_payload).accepted
    assert_same_bits(published_state(h, "us"), add(h.init, root_fold([(eu_sum, 1.0), (us_sum, 1.0)], 50)))
    assert h.admin.round(1).samples == 50


def test_a_root_restarted_mid_round_keeps_the_partial_sums_weight(tmp_path: Path) -> None:
    # min_sites = 2: two uploads, whatever the sites they hold (the first partial sum holds 2).
    with harnesses(tmp_path, tree=TREE, accumulator="fp64", round=RoundPolicy(min_sites=2)) as make:
        h = make({"eu": 20, "us": 30})
        open_round(h, "eu", "us")
        head, payload, eu_sum = partial_upload(
            h["eu"], [(random_delta(60, h.init), 5), (random_delta(61, h.init), 15)]
        )
        assert h["eu"].push(head, payload).accepted
        h.agg.stop()
        again = Aggregator(h.agg.config)  # recovery folds the accepted partial sum again, from its spool
        us, admin = ScriptedSite(again.target, "us", 30), AdminClient(again.target)
        try:
            us.join(held_round=0)
            us_head, us_payload, us_sum = partial_upload(us, [(random_delta(62, h.init), 30)])
            assert us.push(us_head, us_payload).accepted
            status = admin.wait_round(1)
            assert status.state == PUBLISHED and status.samples == 50, status.failure_reason
            number, state = us.snapshot()
            assert number == 1
            assert_same_bits(state, add(h.init, root_fold([(eu_sum, 1.0), (us_sum, 1.0)], 50)))
        finally:
            us.close()
            admin.close()
            again.stop()


# ---------------------------------------------------------------- the view of the tree


def tree_fields() -> dict[str, str]:
    """Path -> type of ``intermediates[]``'s fields, from docs/operator.md's section on the root."""
    text = (ROOT / "docs" / "operator.md").read_text()
    section = text.split("## A tree of aggregators: the root", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(intermediates\[\][a-z_.]*)` \| ([a-z ]+) \|", section, flags=re.MULTILINE))


def test_status_shows_each_intermediate_and_its_last_partial_sum(tmp_path: Path) -> None:
    tree = TreeConfig(intermediates=("eu", "us"))
    with harnesses(tmp_path, tree=tree) as make:
        h = make({"eu": 20, "us": 30, "own": 5})
        open_round(h, "eu", "own")  # us never joins
        head, payload, _ = partial_upload(
            h["eu"], [(random_delta(70, h.init), 8), (random_delta(71, h.init), 12)]
        )
        assert h["eu"].push(head, payload).accepted
        own_head, own_payload = h["own"].header(random_delta(72, h.init), round=1, base=0)
        assert h["own"].push(own_head, own_payload).accepted
        assert h.admin.wait_round(1).state == PUBLISHED

        status = h.admin.status()
        eu, us = status.intermediates
        assert (eu.site_id, eu.joined, eu.round, eu.sites, eu.samples) == ("eu", True, 1, 2, 20)
        assert eu.state == 1 and eu.last_beat_unix_ms > 0 and eu.accepted_unix_ms > 0  # SITE_STATE_ALIVE
        assert (us.site_id, us.joined, us.state, us.round, us.sites, us.samples) == ("us", False, 0, 0, 0, 0)

        rounds, sites = h.admin.rounds(), list(h.admin.sites().values())
        doc = json.loads(json.dumps(status_document(status, rounds, sites)))
        assert doc["schema"] == "gdfed.status/1"
        check_document(doc, documented_fields() | tree_fields())
        assert doc["intermediates"][0] | {"last_beat_unix_ms": 0, "accepted_unix_ms": 0} == {
            "site_id": "eu", "joined": True, "state": "alive", "round": 1, "sites": 2, "samples": 20,
            "last_beat_unix_ms": 0, "accepted_unix_ms": 0,
        }  # fmt: skip
        assert doc["intermediates"][1] == {
            "site_id": "us", "joined": False, "state": None, "last_beat_unix_ms": None, "round": None,
            "sites": None, "samples": None, "accepted_unix_ms": None,
        }  # fmt: skip
        [first] = [r for r in doc["rounds"] if r["round"] == 1]
        assert {p["site_id"]: p["sites"] for p in first["participants"]} == {"eu": 2, "own": None}

        table = render(status, rounds, sites)
        assert re.search(r"^eu +alive .* 1 +2 +20 ", table, re.MULTILINE), table
        assert re.search(r"^us +not joined +- +- +- +- +-$", table, re.MULTILINE), table
        one_round = render(status, [h.admin.round(1)], sites)
        assert "partial sum of 2 site(s)" in one_round and one_round.count("partial sum of") == 1


# ---------------------------------------------------------------- configuration


FLEXLORA = TrainingSpec(method=Method.FLEXLORA, mode=TrainMode.LORA, lora=LoraSpec(rank=4))


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ({"training": FLEXLORA}, "training.method", "an SVD of each site's own adapters"),
        (
            {"training": TrainingSpec(method=Method.FEDCYBGD)},
            "training.method",
            "assigned to sites one by one",
        ),
        (
            {"aggregation": AggregationConfig(rule=AggregationRule.MEDIAN)},
            "aggregation.rule",
            "compares every site's own upload",
        ),
        (
            {"privacy": PrivacyConfig(noise_multiplier=1.0), "influence": InfluenceConfig(clip_norm=1.0)},
            "privacy.noise_multiplier",
            "calibrates its noise per site",
        ),
    ],
)
def test_what_a_tree_cannot_compute_is_refused_at_the_root(
    settings: dict[str, Any], field: str, words: str
) -> None:
    ServerConfig(**settings)  # fine without a tree
    with pytest.raises(ConfigError) as caught:
        ServerConfig(tree=TREE, **settings)
    assert caught.value.field == field
    assert "tree.intermediates (eu, us) cannot be used with" in str(caught.value) and words in str(
        caught.value
    )


def test_the_tree_section_of_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "root.toml"
    path.write_text('[tree]\nintermediates = ["eu-1", "us-1"]\n\n[sites]\neu-1 = "t1"\nus-1 = "t2"\n')
    assert load_config(path, {}).tree.intermediates == ("eu-1", "us-1")
    assert load_config(None, {}).tree == TreeConfig() and not TreeConfig().enabled
    for text, field in (
        ('[tree]\nintermediates = ["eu", "eu"]\n', "tree.intermediates[1]"),
        ('[tree]\nintermediates = ["eu/1"]\n', "tree.intermediates[0]"),
        ('[tree]\nintermediates = "eu"\n', "tree.intermediates"),
        ('[tree]\nroots = ["eu"]\n', "tree.roots"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(path, {})
        assert caught.value.field == field, text
