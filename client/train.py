"""Local training: a few optimizer steps on the site's data, and the eval loss.

A fresh AdamW each round (FlexLoRA does the same), except under FedCyBGD with
``[cybgd] optimizer_state = "travel"``: the aggregator then sends the block's
AdamW moments and step with its weights, training continues from them, and
their differences travel back with the weights' (``client.optimizer_state``).
On CUDA the forward pass runs under bf16 autocast while the parameters stay
fp32, so deltas are taken between fp32 master weights. An optional FedProx
term pulls towards the round's start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from client import optimizer_state
from client.data import Batch, Example, eval_batches
from client.model import LoadedModel, trainable_state, training_only
from common.spec import TrainingSpec


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int
    mean_loss: float
    last_loss: float
    seconds: float


@dataclass(frozen=True, slots=True)
class RoundTraining:
    """A round's local training: the trained tensors (this round's own copies), how it went, the eval loss."""

    state: dict[str, torch.Tensor]
    result: TrainResult
    eval_loss: float


class Aborted(Exception):
    """The aggregator told the worker to stop this round."""


def _loss(loaded: LoadedModel, batch: Batch) -> torch.Tensor:
    device = loaded.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = loaded.model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            labels=batch.labels.to(device),
        )
    loss: torch.Tensor = out.loss
    return loss


def train_steps(
    loaded: LoadedModel,
    data: Iterator[Batch],
    *,
    steps: int,
    lr: float,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    should_stop: Callable[[], bool] = lambda: False,
    prox_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps over the trainable parameters (a fresh AdamW unless one is given)."""
    params = dict(loaded.model.named_parameters())
    trainable = [params[n] for n in loaded.trainable]
    anchor = [p.detach().clone() for p in trainable] if prox_mu > 0 else []
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    loaded.model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if should_stop():
            raise Aborted(f"stopped at step {step - 1} of {steps}")
        loss = _loss(loaded, next(data))
        total = loss
        if prox_mu > 0:
            # FedProx (Li et al.): (mu / 2) * ||w - w_start||^2 keeps local models near the global one.
            total = loss + 0.5 * prox_mu * sum(
                ((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True)
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}; lower the learning rate")
        losses.append(value)
        on_step(step, value)
    loaded.model.eval()
    return TrainResult(steps, sum(losses) / len(losses), losses[-1], time.perf_counter() - start)


@torch.no_grad()
def evaluate(loaded: LoadedModel, examples: Sequence[Example], batch_size: int) -> float:
    """Token-weighted mean loss over ``examples``."""
    loaded.model.eval()
    total, tokens = 0.0, 0
    pad = loaded.tokenizer.pad_token_id
    for batch in eval_batches(examples, batch_size, pad):
        n = batch.tokens
        if n:
            total += float(_loss(loaded, batch)) * n
            tokens += n
    return total / max(1, tokens)


def train_round(
    loaded: LoadedModel,
    spec: TrainingSpec,
    data: Iterator[Batch],
    start: Mapping[str, torch.Tensor],
    params: Sequence[str],
    carried: Sequence[str],
    held_out: Sequence[Example],
    *,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RoundTraining:
    """A round's steps over the parameters ``params``, from the state ``start`` already loaded, then the eval loss.

    ``carried``: optimizer-state tensors travelling with the round (FedCyBGD); AdamW starts from
    them in ``start`` and their trained values join the result. Raises ``Aborted`` when told to stop.
    """
    moved: dict[str, torch.Tensor] = {}
    with training_only(loaded, params) as part:
        adamw = optimizer_state.restored_adamw(part, start, carried, spec.learning_rate) if carried else None
        result = train_steps(
            part,
            data,
            steps=spec.local_steps,
            lr=spec.learning_rate,
            on_step=on_step,
            should_stop=should_stop,
            prox_mu=spec.prox_mu,
            optimizer=adamw,
        )
        if adamw is not None:
            moved = optimizer_state.optimizer_tensors(part, adamw, carried)
    eval_loss = evaluate(loaded, held_out, spec.batch_size) if held_out else 0.0
    return RoundTraining(trainable_state(loaded) | moved, result, eval_loss)


def difference(
    trained: dict[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    names: Sequence[str],
    *,
    own: set[str],
) -> dict[str, torch.Tensor]:
    """Δ = trained − start over ``names``, in place for the tensors ``own`` (``trained``'s own copies).

    Subtracting in place spares a second copy of the trainable state at the round's peak.
    (Travelling optimizer tensors may be the optimizer's own; those are subtracted out of place.)
    """
    return {
        name: trained[name].sub_(start[name]) if name in own else trained[name] - start[name]
        for name in names
    }
