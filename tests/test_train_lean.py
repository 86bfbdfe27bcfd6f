"""Memory-lean training on the demo model: micro-batches, rank shares, clipping, the lr schedule,
gradient checkpointing, 8-bit AdamW, and the fp32 master copy under a half-precision base."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client import schedule
from client.data import Batch, batches, collate, read_jsonl, tokenize
from client.local_optimizer import make_optimizer
from client.model import LoadedModel, load_model, load_trainable, trainable_state
from client.train import micro_batches, train_round, train_steps
from common.spec import BaseDtype, LocalOptimizer, LoraSpec, LrSchedule, TrainingSpec, TrainMode
from tests.federation import tiny_demo

LORA = TrainingSpec(mode=TrainMode.LORA, lora=LoraSpec(rank=4, dropout=0.0), max_seq_len=48)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("demo"), examples_per_site=40, eval_examples=10)


@pytest.fixture(scope="module")
def batch(demo: Path) -> Batch:
    """Eight examples of unequal lengths, prompts masked, so micro-batches differ in loss tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    examples = tokenize(read_jsonl(demo / "data" / "site-a.jsonl"), tokenizer, 48)
    chosen = sorted(examples, key=lambda e: len(e.input_ids))[::5][:8]
    assert len({len(e.input_ids) for e in chosen}) > 2
    return collate(chosen, tokenizer.pad_token_id)


def _gradient(loaded: LoadedModel, batch: Batch, **options: Any) -> dict[str, torch.Tensor]:
    """Δ of one SGD step at lr 1 from the loaded state: minus the gradient train_steps applied."""
    start = trainable_state(loaded)
    params = dict(loaded.model.named_parameters())
    sgd = torch.optim.SGD([params[n] for n in loaded.trainable], lr=1.0)
    train_steps(loaded, iter([batch]), steps=1, lr=1.0, optimizer=sgd, **options)
    after = trainable_state(loaded)
    load_trainable(loaded, start)
    return {n: start[n] - after[n] for n in loaded.trainable}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def test_micro_batches_give_the_whole_batch_gradient(demo: Path, batch: Batch) -> None:
    loaded = load_model(demo / "model", TrainingSpec(mode=TrainMode.FULL), CPU)
    whole = _gradient(loaded, batch)
    parts = micro_batches(batch, 2)
    assert len(parts) == 4 and len({p.batch.tokens for p in parts}) > 1  # unequal: 1/4 each would be wrong
    assert sum(p.weight or 0 for p in parts) == pytest.approx(1.0)
    accumulated = _gradient(loaded, batch, micro_batch=2)
    # fp32 sums in another order (and micro-batches cut to their own width): a few ulps of the largest.
    _close(whole, accumulated, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # the comparison is not of zeros


@pytest.mark.slow
def test_rank_shares_average_to_the_whole_batch_gradient(demo: Path, batch: Batch) -> None:
    """Two ranks' gradients, each scaled for DDP's mean, as ``reduce_gradients`` sees them."""
    loaded = load_model(demo / "model", LORA, CPU)
    whole = _gradient(loaded, batch)
    seen: list[dict[str, torch.Tensor]] = []

    def record(params: Any) -> None:
        seen.append({n: p.grad.clone() for n, p in zip(loaded.trainable, params, strict=True)})

    tokens = []
    for rank in (0, 1):
        _gradient(loaded, batch, micro_batch=3, shard=(rank, 2), reduce_gradients=record)
        tokens.append(sum(int(p.batch.attention_mask.sum()) for p in micro_batches(batch, 3, (rank, 2))))
    assert len(seen) == 2  # once per optimizer step
    mean = {n: (seen[0][n] + seen[1][n]) / 2 for n in whole}
    _close(whole, mean, rtol=1e-4, atol=1e-7)
    assert sum(tokens) == int(batch.attention_mask.sum())


def test_tokens_are_counted_per_step(demo: Path, batch: Batch) -> None:
    loaded = load_model(demo / "model", LORA, CPU)
    counts: list[int] = []
    result = train_steps(
        loaded,
        iter([batch, batch]),
        steps=2,
        lr=1e-3,
        micro_batch=4,
        on_step=lambda step, loss, tokens: counts.append(tokens),
    )
    n = int(batch.attention_mask.sum())
    assert counts == [n, 2 * n] and result.tokens == 2 * n


def test_max_grad_norm_bounds_the_step(demo: Path, batch: Batch) -> None:
    loaded = load_model(demo / "model", LORA, CPU)
    free = _gradient(loaded, batch)
    free_norm = math.sqrt(sum(float((g**2).sum()) for g in free.values()))
    bound = free_norm / 10
    clipped = _gradient(loaded, batch, max_grad_norm=bound)
    norm = math.sqrt(sum(float((g**2).sum()) for g in clipped.values()))
    assert norm == pytest.approx(bound, rel=1e-4)
    # Clipping scales the whole gradient: the direction is the same.
    _close(
        {n: g / bound for n, g in clipped.items()}, {n: g / free_norm for n, g in free.items()}, 1e-3, 1e-6
    )
    untouched = _gradient(loaded, batch, max_grad_norm=free_norm * 2)
    _close(untouched, free, rtol=0, atol=0)


COSINE = TrainingSpec(
    local_steps=10,
    learning_rate=1e-3,
    min_learning_rate=1e-4,
    warmup_steps=4,
    lr_schedule=LrSchedule.COSINE,
    schedule_rounds=5,
)


@pytest.mark.parametrize(
    ("g", "expected"),
    [
        (0, 1e-3 * 1 / 4),  # warm-up: no step at rate 0
        (2, 1e-3 * 3 / 4),
        (3, 1e-3),  # the warm-up's last step reaches the rate
        (4 + 23 - 1, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 23 / 46))),  # halfway: the mid rate
        (49, 1e-4),  # the run's last step: the floor
        (80, 1e-4),  # past the span: stays at the floor
    ],
)
def test_cosine_schedule_closed_form(g: int, expected: float) -> None:
    assert schedule.learning_rate(COSINE, g) == pytest.approx(expected, rel=1e-12)


def test_schedule_is_transformers_one_step_on() -> None:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=COSINE.learning_rate)
    hf = get_cosine_with_min_lr_schedule_with_warmup(sgd, 4, 50, min_lr=COSINE.min_learning_rate)
    for g in range(50):
        sgd.step()
        hf.step()
        assert schedule.learning_rate(COSINE, g) == pytest.approx(hf.get_last_lr()[0], rel=1e-9), g


def test_schedule_runs_across_rounds_and_constant_after_warmup() -> None:
    rate = schedule.for_round(COSINE, 3)
    assert rate is not None and rate(1) == schedule.learning_rate(COSINE, 20)
    assert schedule.for_round(TrainingSpec(), 7) is None  # constant, no warm-up: the optimizer's own rate
    warm = schedule.for_round(TrainingSpec(learning_rate=2e-4, warmup_steps=2), 1)
    assert warm is not None and [warm(s) for s in (1, 2, 3, 10)] == [1e-4, 2e-4, 2e-4, 2e-4]
    with pytest.raises(ValueError, match="schedule_rounds"):
        schedule.for_round(replace(COSINE, schedule_rounds=0), 1)


class _Recording(torch.optim.SGD):
    """SGD that notes the rate each step runs at."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.5)
        self.rates: list[float] = []

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        self.rates.append(self.param_groups[0]["lr"])
        loss: float | None = super().step(closure)
        return loss


def test_train_steps_applies_the_schedule(demo: Path, batch: Batch) -> None:
    loaded = load_model(demo / "model", LORA, CPU)
    params = dict(loaded.model.named_parameters())
    sgd = _Recording([params[n] for n in loaded.trainable])
    rate = schedule.for_round(COSINE, 2)
    assert rate is not None
    train_steps(loaded, iter([batch] * 3), steps=3, lr=1.0, optimizer=sgd, lr_at=rate)
    assert sgd.rates == [schedule.learning_rate(COSINE, g) for g in (10, 11, 12)]


@pytest.mark.slow
def test_gradient_checkpointing_changes_nothing_but_memory(demo: Path, batch: Batch) -> None:
    for spec in (LORA, TrainingSpec(mode=TrainMode.FULL)):
        plain = load_model(demo / "model", spec, CPU)
        lean = load_model(demo / "model", replace(spec, gradient_checkpointing=True), CPU)
        assert lean.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
        load_trainable(lean, trainable_state(plain))  # the same adapters
        losses: list[list[float]] = [[], []]
        grads = []
        for loaded, seen in zip((plain, lean), losses, strict=True):
            grads.append(_gradient(loaded, batch, on_step=lambda s, loss, t, seen=seen: seen.append(loss)))
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        _close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
        assert any(float(g.abs().max()) > 0 for g in grads[1].values())


def _data(demo: Path, loaded: LoadedModel, spec: TrainingSpec) -> Iterator[Batch]:
    examples = tokenize(read_jsonl(demo / "data" / "site-a.jsonl"), loaded.tokenizer, spec.max_seq_len)
    return batches(examples, spec.batch_size, loaded.tokenizer.pad_token_id, seed=3)


def test_8bit_adamw_trains_on_the_cpu(demo: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = replace(LORA, optimizer=LocalOptimizer.ADAMW_8BIT, local_steps=4, learning_rate=3e-3)
    loaded = load_model(demo / "model", spec, CPU)
    start = trainable_state(loaded)
    names = loaded.trainable
    trained = train_round(loaded, spec, _data(demo, loaded, spec), start, names, [], [])
    assert math.isfinite(trained.result.mean_loss)
    assert all(torch.isfinite(t).all() for t in trained.state.values())
    assert any(not torch.equal(trained.state[n], start[n]) for n in names)
    # The moments are held in 8 bits where a tensor is big enough (bitsandbytes: 4096 elements).
    big = torch.nn.Parameter(torch.randn(128, 64))
    adamw = make_optimizer([big], LocalOptimizer.ADAMW_8BIT, 1e-3, CPU)
    big.grad = torch.randn_like(big)
    adamw.step()
    assert adamw.state[big]["state1"].dtype == torch.uint8
    with caplog.at_level(logging.INFO, logger="client.local_optimizer"):
        paged = make_optimizer([big], LocalOptimizer.PAGED_ADAMW_8BIT, 1e-3, CPU)
    assert type(paged).__name__ == "AdamW8bit" and "needs CUDA" in caplog.text


@pytest.mark.slow
def test_half_base_keeps_fp32_masters(demo: Path) -> None:
    files = load_file(str(demo / "model" / "model.safetensors"))
    fp32 = load_model(demo / "model", LORA, CPU)
    lora = load_model(demo / "model", replace(LORA, base_dtype=BaseDtype.BF16), CPU)
    params = dict(lora.model.named_parameters())
    assert lora.trainable == fp32.trainable
    assert all(params[n].dtype == torch.float32 for n in lora.trainable)
    assert {p.dtype for n, p in params.items() if n not in lora.trainable} == {torch.bfloat16}
    assert lora.compute_dtype == torch.bfloat16  # a half base on the CPU runs under autocast
    loss = train_steps(lora, _data(demo, lora, LORA), steps=2, lr=1e-3).mean_loss
    assert math.isfinite(loss)

    subset = replace(
        LORA, mode=TrainMode.SUBSET, trainable_patterns=(r"layers\.0\.",), base_dtype=BaseDtype.BF16
    )
    part = load_model(demo / "model", subset, CPU)
    params = dict(part.model.named_parameters())
    assert part.trainable and all(params[n].dtype == torch.float32 for n in part.trainable)
    assert params["lm_head.weight"].dtype == torch.bfloat16
    # Trainable tensors are the file's own values, never rounded through bf16.
    assert all(torch.equal(params[n].detach(), files[n]) for n in part.trainable)
    assert math.isfinite(train_steps(part, _data(demo, part, subset), steps=2, lr=1e-3).mean_loss)

    full = load_model(demo / "model", replace(subset, mode=TrainMode.FULL), CPU)
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
