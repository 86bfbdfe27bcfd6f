"""FlexLoRA and FedCyBGD through the real aggregator and the real worker, on the tiny demo model."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.export import state_file_of_round
from client.worker import Worker
from common.pb.gradualdiff.v1 import federation_pb2
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode
from server.config import CyBgdConfig, CyBgdMode, CyBgdOptimizerState
from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
from tests.scripted import AdminClient, Aggregator, ScriptedSite, assert_same_bits

BASE = TrainingSpec(local_steps=3, batch_size=8, learning_rate=1e-3, max_seq_len=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("demo"), examples_per_site=40, eval_examples=10)


def _run(target: str, demo: Path, tmp: Path, ranks: dict[str, int]) -> list[Worker]:
    workers = [demo_worker(target, site, demo, tmp, lora_rank=rank) for site, rank in ranks.items()]
    assert run_workers(workers) == [0] * len(workers)
    return workers


@pytest.mark.slow
def test_flexlora_mixed_ranks_through_the_worker(tmp_path: Path, demo: Path) -> None:
    spec = replace(
        BASE,
        method=Method.FLEXLORA,
        mode=TrainMode.LORA,
        lora=LoraSpec(rank=4, target_modules=("q_proj", "v_proj")),
    )
    config = demo_config(tmp_path, demo, ["site-a", "site-b"], spec, rounds=2)
    with Aggregator(config) as agg, AdminClient(agg.target) as admin:
        # A site may not declare more than the run's rank.
        with ScriptedSite(agg.target, "site-a") as greedy:
            with pytest.raises(grpc.RpcError) as err:
                greedy.stub.Join(
                    federation_pb2.JoinRequest(
                        site_id="site-a", capabilities=federation_pb2.Capabilities(lora_rank=8, num_samples=5)
                    ),
                    metadata=greedy.metadata,
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "lora_rank" in str(err.value.details())
        workers = _run(agg.target, demo, tmp_path, {"site-a": 2, "site-b": 4})
        by_site = {w.config.site_id: w for w in workers}
        up_a = [r.bytes_up for r in by_site["site-a"].reports]
        up_b = [r.bytes_up for r in by_site["site-b"].reports]
        assert len(up_a) == len(up_b) == 2
        # Rank 2 uploads about half of rank 4's adapter bytes.
        assert all(0.35 < a / b < 0.7 for a, b in zip(up_a, up_b, strict=True)), (up_a, up_b)
        for number in (1, 2):
            r = admin.round(number)
            assert r.state == 5 and sum(p.accepted for p in r.participants) == 2
        path, number = state_file_of_round(config.state_dir, None)
        assert number == 2
        state = load_file(str(path))
        a_names = [n for n in state if ".lora_A." in n]
        assert a_names and all(state[n].shape[0] == 4 for n in a_names)
        for name in a_names:  # the SVD's V_rᵀ: orthonormal rows
            a = state[name].double()
            assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-4)
        # Each worker fetched the final round when the run finished: it holds the aggregator's last
        # state, bit for bit.
        for site in ("site-a", "site-b"):
            held = load_file(str(tmp_path / site / "held.safetensors"))
            assert_same_bits(held, load_file(str(path)))


@pytest.mark.slow
def test_cybgd_sites_take_turns_and_upload_one_block(tmp_path: Path, demo: Path) -> None:
    spec = replace(BASE, method=Method.FEDCYBGD, mode=TrainMode.FULL)
    sites = ["site-a", "site-b"]
    config = demo_config(
        tmp_path,
        demo,
        sites,
        spec,
        rounds=4,
        cybgd=CyBgdConfig(mode=CyBgdMode.DESCENDING, download_fraction=0.5),
        keep_states=5,
    )
    with Aggregator(config) as agg, AdminClient(agg.target) as admin:
        workers = _run(agg.target, demo, tmp_path, dict.fromkeys(sites, 0))
        states = [load_file(str(state_file_of_round(config.state_dir, n)[0])) for n in range(5)]
        full_bytes = sum(t.numel() * 4 for t in states[0].values())
        # descending, 2 sites over 4 blocks (N < L): the cycle advances by blocks, 3, 2, 1, 0, and the
        # sites take the turns in order, so every block is trained within the cycle.
        expected = {1: ("site-a", "model.layers.3."), 2: ("site-b", "model.layers.2."),
                    3: ("site-a", "model.layers.1."), 4: ("site-b", "model.layers.0.")}  # fmt: skip
        for number, (site, block) in expected.items():
            r = admin.round(number)
            assert r.state == 5, r.failure_reason
            assert [(p.site_id, p.accepted) for p in r.participants] == [(site, True)]
            changed = {n for n in states[number] if not torch.equal(states[number][n], states[number - 1][n])}
            assert changed and all(n.startswith(block) for n in changed), (number, sorted(changed)[:3])
        block_bytes = sum(t.numel() * 4 for n, t in states[0].items() if n.startswith("model.layers.3."))
        for w in workers:
            assert [r.round for r in w.reports] == ([1, 3] if w.config.site_id == "site-a" else [2, 4])
            for report in w.reports:
                # One block of four travels (compressed), not the model; down, its own block and
                # ceil(p·n) of the n = round − 1 others trained before it.
                assert report.bytes_up <= block_bytes < full_bytes / 4
                others = -(-(report.round - 1) // 2)
                assert 0 < report.bytes_down <= (1 + others) * block_bytes


@pytest.mark.slow
def test_cybgd_optimizer_state_travels_with_the_block(tmp_path: Path, demo: Path) -> None:
    spec = replace(BASE, method=Method.FEDCYBGD, mode=TrainMode.FULL)
    sites = ["site-a", "site-b"]
    config = demo_config(tmp_path, demo, sites, spec, rounds=5, keep_states=6,
                         cybgd=CyBgdConfig(mode=CyBgdMode.ASCENDING, optimizer_state=CyBgdOptimizerState.TRAVEL))  # fmt: skip
    with Aggregator(config) as agg, AdminClient(agg.target) as admin:
        _run(agg.target, demo, tmp_path, dict.fromkeys(sites, 0))
        for number in range(1, 6):
            assert admin.round(number).state == 5
        states = [load_file(str(state_file_of_round(config.state_dir, n)[0])) for n in range(6)]
    steps = [{b: float(s[f"model.layers.{b}.#step"][0]) for b in range(4)} for s in states]
    # ascending, N = 2 < L = 4: rounds 1-4 train blocks 0-3 (site-a, site-b, site-a, site-b), round 5
    # block 0 again (site-a). Its AdamW continues the first turn's: the step count goes on from 3 to 6.
    assert steps[0] == {0: 0, 1: 0, 2: 0, 3: 0}
    assert steps[1] == {0: 3, 1: 0, 2: 0, 3: 0}
    assert steps[3] == {0: 3, 1: 3, 2: 3, 3: 0}
    assert steps[4] == {0: 3, 1: 3, 2: 3, 3: 3}
    assert steps[5] == {0: 6, 1: 3, 2: 3, 3: 3}
    moment = "model.layers.0.mlp.down_proj.weight#exp_avg_sq"
    assert states[1][moment].abs().sum() > 0 and not torch.equal(states[5][moment], states[1][moment])
    assert torch.equal(states[4][moment], states[1][moment])  # untouched while other blocks train
