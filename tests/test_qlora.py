"""QLoRA on the CPU: a 4-bit (NF4) or 8-bit frozen base through bitsandbytes, fp32 adapters that travel,
and rounds of it through the real aggregator and real workers."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.data import batches, read_jsonl, tokenize
from client.export import state_file_of_round
from client.model import LoadedModel, load_model, load_trainable, trainable_state
from client.train import evaluate, train_steps
from common.spec import LocalOptimizer, LoraSpec, LrSchedule, Quantization, TrainingSpec, TrainMode
from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
from tests.scripted import AdminClient, Aggregator

LORA = TrainingSpec(
    mode=TrainMode.LORA,
    lora=LoraSpec(rank=4, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj")),
    local_steps=3,
    batch_size=8,
    learning_rate=3e-3,
    max_seq_len=32,
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("demo"), examples_per_site=40, eval_examples=10)


def _train_briefly(demo: Path, loaded: LoadedModel) -> float:
    examples = tokenize(read_jsonl(demo / "data" / "site-a.jsonl"), loaded.tokenizer, 32)
    data = batches(examples, 8, loaded.tokenizer.pad_token_id, seed=1)
    return train_steps(loaded, data, steps=2, lr=3e-3).mean_loss


@pytest.mark.slow
def test_training_after_an_eval_still_reaches_the_lowest_adapters(demo: Path) -> None:
    # A worker evaluates after each round and trains again the next: bitsandbytes' CPU inference
    # repacking (an eval without gradients) must not cut the adapters of the layers below off.
    loaded = load_model(demo / "model", replace(LORA, quantization=Quantization.NF4), CPU)
    examples = tokenize(read_jsonl(demo / "data" / "site-a.jsonl"), loaded.tokenizer, 32)
    assert math.isfinite(evaluate(loaded, examples[:8], 4))
    before = trainable_state(loaded)
    assert math.isfinite(_train_briefly(demo, loaded))
    after = trainable_state(loaded)
    lowest = [n for n in before if ".layers.0." in n and ".lora_A." in n]
    assert lowest and all(not torch.equal(after[n], before[n]) for n in lowest)


@pytest.mark.parametrize(
    ("quantization", "held_as"), [(Quantization.NF4, "Params4bit"), (Quantization.INT8, "Int8Params")]
)
def test_quantized_base_trains_fp32_adapters_under_the_same_names(
    demo: Path, quantization: Quantization, held_as: str
) -> None:
    # bitsandbytes 0.50 runs both 4-bit and LLM.int8() matmuls on the CPU: neither is refused there.
    plain = load_model(demo / "model", LORA, CPU)
    quantized = load_model(demo / "model", replace(LORA, quantization=quantization), CPU)
    params = dict(quantized.model.named_parameters())
    base = params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert type(base).__name__ == held_as and not base.requires_grad
    assert quantized.trainable == plain.trainable  # what travels is named as without quantization
    state = trainable_state(quantized)
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert all(params[n].dtype == torch.float32 for n in quantized.trainable)
    # The frozen base is smaller in memory (on this tiny model the fp32 embeddings and head dominate).
    assert quantized.model.get_memory_footprint() < 0.8 * plain.model.get_memory_footprint()
    load_trainable(quantized, trainable_state(plain))  # the aggregator's fp32 adapters load as they are
    assert math.isfinite(_train_briefly(demo, quantized))
    after = trainable_state(quantized)
    assert any(not torch.equal(after[n], state[n]) for n in state)


@pytest.mark.slow
def test_qlora_rounds_through_the_worker_and_aggregator(
    tmp_path: Path, demo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Everything the lean path has, chosen by the aggregator and carried to the sites in the spec.
    spec = replace(
        LORA,
        quantization=Quantization.NF4,
        gradient_checkpointing=True,
        micro_batch_size=4,
        max_grad_norm=1.0,
        optimizer=LocalOptimizer.ADAMW_8BIT,
        lr_schedule=LrSchedule.COSINE,
        warmup_steps=2,
        min_learning_rate=3e-4,
    )
    sites = ["site-a", "site-b"]
    config = demo_config(tmp_path, demo, sites, spec, rounds=2)
    assert config.training.schedule_rounds == 2  # the aggregator fills in the run's rounds
    round0 = load_file(str(config.init_state))
    with caplog.at_level(logging.INFO), Aggregator(config) as agg, AdminClient(agg.target) as admin:
        workers = [demo_worker(agg.target, site, demo, tmp_path) for site in sites]
        assert run_workers(workers) == [0, 0]
        for number in (1, 2):
            r = admin.round(number)
            assert r.state == 5 and sum(p.accepted for p in r.participants) == 2  # PUBLISHED
            assert math.isfinite(r.mean_eval_loss) and r.mean_eval_loss > 0
        path, number = state_file_of_round(config.state_dir, None)
    assert number == 2
    assert caplog.text.count("base nf4, gradient checkpointing") == 2  # each site loaded a 4-bit base
    published = load_file(str(path))
    # The aggregator's state: the fp32 adapters, under round 0's names; nothing quantized.
    assert published.keys() == round0.keys() and all(".lora_" in n for n in published)
    assert {t.dtype for t in published.values()} == {torch.float32}
    moved = {n: published[n] - round0[n] for n in published}
    assert all(torch.isfinite(d).all() for d in moved.values())
    assert all(float(d.abs().max()) > 0 for n, d in moved.items() if ".lora_B." in n)
    for w in workers:
        assert [rep.round for rep in w.reports] == [1, 2]
        assert all(math.isfinite(rep.train_loss) for rep in w.reports)
