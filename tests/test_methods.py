"""The method plans (who trains what) and FlexLoRA's close, against direct computations."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.codec import encode
from common.delta import Codec, DeltaKind, TensorSpec
from common.dtypes import DType
from common.lora import slice_state
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode
from common.statefile import StateReader
from server.flexlora_round import FlexUpload, next_state
from server.methods import CyBgdPlan, FlexLoraPlan, MethodPlan, make_plan
from server.spool import Spool

F32 = DType.F32


def _manifest(shapes: dict[str, tuple[int, ...]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, F32, s) for n, s in shapes.items())


LAYERED = _manifest(
    {
        "model.embed_tokens.weight": (10, 4),
        "model.layers.0.mlp.w": (4, 4),
        "model.layers.0.norm.weight": (4,),
        "model.layers.1.mlp.w": (4, 4),
        "model.layers.10.mlp.w": (4, 4),
        "model.layers.2.mlp.w": (4, 4),
        "lm_head.weight": (10, 4),
    }
)


def test_gradualdiff_plan_trains_everything() -> None:
    plan = make_plan(TrainingSpec(), LAYERED, ["b", "a"])
    assert type(plan) is MethodPlan and plan.streaming_fold
    got = plan.assignment(3, "a")
    assert got.trains and got.tensors == () and got.lora_rank == 0
    assert plan.upload_manifest(got) == LAYERED


def test_cybgd_ascending_one_site_per_round_and_exact_block_prefixes() -> None:
    spec = TrainingSpec(method=Method.FEDCYBGD)
    plan = make_plan(spec, LAYERED, ["site-b", "site-a", "site-c"])
    assert isinstance(plan, CyBgdPlan)
    assert plan.blocks == ["model.layers.0.", "model.layers.1.", "model.layers.2.", "model.layers.10."]
    # N = 3 < L = 4: the cycle advances by blocks, one round per block; sites in sorted order, in turn.
    assert plan.turns_per_cycle == 4
    expected = {1: ("site-a", 0), 2: ("site-b", 1), 3: ("site-c", 2), 4: ("site-a", 3), 5: ("site-b", 0)}
    for number, (site, block) in expected.items():
        for other in ("site-a", "site-b", "site-c"):
            got = plan.assignment(number, other)
            assert got.trains == (other == site), (number, other)
        got = plan.assignment(number, site)
        assert got.block == plan.blocks[block]
        # Exact prefix with the trailing dot: block 1 does not take layers.10.
        assert all(n.startswith(plan.blocks[block]) for n in got.tensors) and got.tensors
        assert [t.name for t in plan.upload_manifest(got)] == list(got.tensors)
    assert plan.assignment(2, "site-b").tensors == ("model.layers.1.mlp.w",)
    # Every block is trained within one cycle, layers.10. included (the authors' table never trains it).
    for cycle in range(3):
        rounds = range(1 + 4 * cycle, 5 + 4 * cycle)
        trained = [
            plan.assignment(n, s).block for n in rounds for s in plan.sites if plan.assignment(n, s).trains
        ]
        assert sorted(trained) == sorted(plan.blocks)


def test_cybgd_keeps_the_authors_assignment_when_sites_are_at_least_blocks() -> None:
    plan = CyBgdPlan(TrainingSpec(method=Method.FEDCYBGD), LAYERED, [f"s{i}" for i in range(6)])
    assert plan.turns_per_cycle == 6
    # Site c trains block c mod L, every cycle.
    assert [plan.turn(n)[1:] for n in range(1, 8)] == [
        (0, ["s0"]),
        (1, ["s1"]),
        (2, ["s2"]),
        (3, ["s3"]),
        (0, ["s4"]),
        (1, ["s5"]),
        (0, ["s0"]),
    ]


def test_cybgd_agg_trains_one_block_per_round_with_its_group_in_parallel() -> None:
    spec = TrainingSpec(method=Method.FEDCYBGD)
    plan = CyBgdPlan(spec, LAYERED, [f"s{i}" for i in range(5)], mode="agg")
    assert plan.uniform_weights and plan.turns_per_cycle == 4
    # Blocks 0..3; groups {0: s0, s4}, {1: s1}, {2: s2}, {3: s3}.
    assert [plan.turn(n)[1:] for n in range(1, 6)] == [
        (0, ["s0", "s4"]),
        (1, ["s1"]),
        (2, ["s2"]),
        (3, ["s3"]),
        (0, ["s0", "s4"]),
    ]


@pytest.mark.parametrize("mode", ["random", "descending"])
def test_cybgd_fewer_sites_visit_every_block_each_cycle(mode: str) -> None:
    spec = TrainingSpec(method=Method.FEDCYBGD, seed=7)
    plan = CyBgdPlan(spec, LAYERED, ["a", "b"], mode=mode)
    assert plan.turns_per_cycle == 4
    for cycle in range(3):
        turns = [plan.turn(n) for n in range(1 + 4 * cycle, 5 + 4 * cycle)]
        assert sorted(b for _, b, _ in turns) == [0, 1, 2, 3]
        assert [m for _, _, m in turns] == [["a"], ["b"], ["a"], ["b"]]


def test_cybgd_needs_configured_sites_and_blocks() -> None:
    spec = TrainingSpec(method=Method.FEDCYBGD)
    with pytest.raises(ValueError, match="sites"):
        make_plan(spec, LAYERED, [])
    with pytest.raises(ValueError, match="block pattern"):
        make_plan(spec, _manifest({"w": (2,)}), ["a"])
    with pytest.raises(ValueError, match="mode"):
        CyBgdPlan(spec, LAYERED, ["a"], mode="sideways")


def _lora_manifest(rank: int) -> tuple[TensorSpec, ...]:
    return _manifest(
        {
            "m.q.lora_A.default.weight": (rank, 6),
            "m.q.lora_B.default.weight": (5, rank),
            "m.v.lora_A.default.weight": (rank, 6),
            "m.v.lora_B.default.weight": (3, rank),
        }
    )


def test_flexlora_plan_slices_the_upload_manifest_by_rank() -> None:
    spec = TrainingSpec(method=Method.FLEXLORA, mode=TrainMode.LORA, lora=LoraSpec(rank=4))
    plan = make_plan(spec, _lora_manifest(4), ["a"])
    assert isinstance(plan, FlexLoraPlan) and not plan.streaming_fold
    got = plan.assignment(1, "a", declared_rank=2)
    assert got.lora_rank == 2
    assert plan.upload_manifest(got) == _lora_manifest(2)
    assert plan.assignment(1, "a", declared_rank=0).lora_rank == 4
    with pytest.raises(ValueError, match="rank"):
        make_plan(spec, _lora_manifest(3), ["a"])
    with pytest.raises(ValueError, match="mode = lora"):
        make_plan(TrainingSpec(method=Method.FLEXLORA), _lora_manifest(4), ["a"])


def test_flexlora_close_matches_a_direct_numpy_computation(tmp_path: Path) -> None:
    """Mixed ranks, α/r scaling, weights by samples; the new rank-R state is ΔW's best rank-R approximation."""
    big, alpha = 4, 16.0
    gen = torch.Generator().manual_seed(3)
    previous = {
        t.name: torch.randn(t.shape, generator=gen) * 0.1 for t in _lora_manifest(big)
    }  # a state as after some round: B nonzero
    state_path = tmp_path / "state.safetensors"
    save_file(previous, str(state_path))
    reader = StateReader(state_path)
    spool = Spool(tmp_path / "spool")
    sites = [("a", 2, 10.0), ("b", 4, 30.0), ("c", 1, 5.0)]
    uploads, trained = [], {}
    for site, rank, n in sites:
        start = slice_state(previous, rank)
        delta = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in start.items()}
        trained[site] = {k: start[k] + delta[k] for k in start}
        sink = io.BytesIO()
        layout = encode(delta, Codec(), sink)
        writer = spool.open_at(site, 0)
        writer.write(sink.getvalue())
        writer.sync()
        writer.close()
        manifest = tuple(TensorSpec(k, F32, tuple(v.shape)) for k, v in delta.items())
        uploads.append(FlexUpload(upload_id=site, layout=layout, rank=rank, weight=n, manifest=manifest))
    new = next_state(reader, uploads, spool, alpha=alpha, budget_bytes=1)  # one module per group
    total = sum(n for _, _, n in sites)
    for module, d_out in (("m.q", 5), ("m.v", 3)):
        a_name, b_name = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
        dw = np.zeros((d_out, 6))
        for site, rank, n in sites:
            a = trained[site][a_name].double().numpy()
            b = trained[site][b_name].double().numpy()
            dw += (n / total) * (alpha / rank) * (b @ a)
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        best = (u[:, :big] * s[:big]) @ vt[:big]
        got = (alpha / big) * (new[b_name].double().numpy() @ new[a_name].double().numpy())
        np.testing.assert_allclose(got, best, atol=1e-5)
        assert new[a_name].shape == (big, 6) and new[b_name].shape == (d_out, big)
        # A has orthonormal rows; all of Σ sits in B. Ranks above min(d_out, d_in) are zero-padded.
        k = min(big, d_out)
        a_new = new[a_name].double().numpy()
        np.testing.assert_allclose(a_new[:k] @ a_new[:k].T, np.eye(k), atol=1e-5)
        assert not a_new[k:].any()
        # A rank-2 site starts next round from the best rank-2 approximation.
        r2 = slice_state(new, 2)
        got2 = (alpha / 2) * (r2[b_name].double().numpy() @ r2[a_name].double().numpy())
        np.testing.assert_allclose(got2, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


def test_cybgd_agg_round_takes_the_plain_mean_of_its_group_and_refuses_others(tmp_path: Path) -> None:
    from common.pb.gradualdiff.v1 import federation_pb2
    from server.config import CyBgdConfig, CyBgdMode, RoundPolicy
    from tests.scripted import Harness, assert_same_bits, rpc_code

    gen = torch.Generator().manual_seed(5)
    init = {
        "model.embed.weight": torch.randn(8, 4, generator=gen),
        "model.layers.0.w": torch.randn(4, 4, generator=gen),
        "model.layers.1.w": torch.randn(4, 4, generator=gen),
    }
    # N = 3 sites, L = 2 blocks, agg: block 0 is trained by a and c together, block 1 by b.
    h = Harness(tmp_path, {"a": 10, "b": 30, "c": 5}, init=init, training=TrainingSpec(method=Method.FEDCYBGD),
                cybgd=CyBgdConfig(mode=CyBgdMode.AGG), round=RoundPolicy(min_sites_to_open=3))  # fmt: skip
    try:
        h.join_all()
        spec = h["a"].await_round(after=0)
        assert (spec.round, list(spec.trainable_tensors), spec.sits_out) == (1, ["model.layers.0.w"], False)
        assert h["b"].await_round(after=0, wait_ms=300).sits_out  # not b's turn: it is told to sit out
        da = {"model.layers.0.w": torch.randn(4, 4, generator=gen)}
        dc = {"model.layers.0.w": torch.randn(4, 4, generator=gen)}
        # b has no part in round 1; a whole-state upload from a is not its block.
        code = rpc_code(
            lambda: h["b"].push(*h["b"].header({"model.layers.1.w": torch.ones(4, 4)}, round=1, base=0))
        )
        assert code.name == "FAILED_PRECONDITION"
        code = rpc_code(lambda: h["a"].push(*h["a"].header(init, round=1, base=0)))
        assert code.name == "INVALID_ARGUMENT"
        for site, delta in (("a", da), ("c", dc)):
            receipt = h[site].push(*h[site].header(delta, round=1, base=0))
            assert receipt.accepted
        assert h.admin.wait_round(1).state == federation_pb2.ROUND_STATE_PUBLISHED
        _, state = h["b"].snapshot()
        mean = (da["model.layers.0.w"] + dc["model.layers.0.w"]) / 2  # not weighted by 10 and 5 samples
        expected = dict(init) | {"model.layers.0.w": init["model.layers.0.w"] + mean}
        torch.testing.assert_close(state["model.layers.0.w"], expected["model.layers.0.w"], rtol=0, atol=1e-6)
        assert_same_bits({k: state[k] for k in ("model.embed.weight", "model.layers.1.w")},
                         {k: init[k] for k in ("model.embed.weight", "model.layers.1.w")})  # fmt: skip
        spec = h["b"].await_round(after=1)
        assert (spec.round, list(spec.trainable_tensors)) == (2, ["model.layers.1.w"])
    finally:
        h.close()


def test_cybgd_compressed_download_fetches_own_block_and_a_subset(tmp_path: Path) -> None:
    from common.pb.gradualdiff.v1 import federation_pb2
    from server.config import CyBgdConfig, CyBgdMode, RoundPolicy
    from tests.scripted import Harness

    gen = torch.Generator().manual_seed(9)
    init = {f"model.layers.{i}.w": torch.randn(3, 3, generator=gen) for i in range(4)}
    init["model.norm.weight"] = torch.ones(3)
    sites = {f"s{i}": 10 for i in range(4)}
    h = Harness(tmp_path, sites, init=init, training=TrainingSpec(method=Method.FEDCYBGD),
                cybgd=CyBgdConfig(mode=CyBgdMode.ASCENDING, download_fraction=0.5),
                round=RoundPolicy(min_sites_to_open=4))  # fmt: skip
    try:
        h.join_all()
        state = dict(init)
        for number in range(1, 5):  # one cycle: s_i trains block i
            site = h[f"s{number - 1}"]
            spec = site.await_round(after=number - 1)
            assert spec.round == number and not spec.sits_out
            own = f"model.layers.{number - 1}."
            # Its own block always; a random ceil(p·n) of the n other blocks trained before.
            others = [b for b in spec.download_blocks if b != own]
            assert own in spec.download_blocks and len(others) == -(-(number - 1) // 2)
            assert set(others) <= {f"model.layers.{i}." for i in range(number - 1)}
            fetched = site.stub.FetchDiff(
                federation_pb2.FetchDiffRequest(
                    site_id=site.site_id, have_round=0, only_prefixes=list(spec.download_blocks)
                ),
                metadata=site.metadata,
                timeout=30,
            )
            from common.codec import decode_chunks
            from common.serde import chunk_from_proto

            head, tensors = decode_chunks([chunk_from_proto(m) for m in fetched])
            assert head.kind is DeltaKind.SNAPSHOT and head.round == number - 1
            assert sorted(tensors) == sorted(n for n in state if n.startswith(tuple(spec.download_blocks)))
            for name, value in tensors.items():
                assert torch.equal(value, state[name])  # the latest values
            delta = {f"{own}w": torch.full((3, 3), float(number))}
            assert site.push(*site.header(delta, round=number, base=number - 1)).accepted
            assert h.admin.wait_round(number).state == federation_pb2.ROUND_STATE_PUBLISHED
            state[f"{own}w"] = state[f"{own}w"] + delta[f"{own}w"]
    finally:
        h.close()
