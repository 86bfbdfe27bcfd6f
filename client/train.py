"""Local training: a few optimizer steps on the site's data, and the eval loss.

A fresh optimizer each round (FlexLoRA does the same; ``client.local_optimizer``: AdamW or 8-bit
AdamW), except under FedCyBGD with ``[cybgd] optimizer_state = "travel"``: the aggregator then
sends the block's AdamW moments and step with its weights, training continues from them, and
their differences travel back with the weights' (``client.optimizer_state``). On CUDA the forward
pass runs under bf16 autocast (fp16 where bf16 is missing, with loss scaling) while trainable
parameters stay fp32, so deltas are taken between fp32 master weights. An optimizer step may
accumulate several micro-batches, clips the gradient norm if asked, and follows the run's
learning-rate schedule (``client.schedule``). An optional FedProx term pulls towards the round's
start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from client import optimizer_state, schedule
from client.data import IGNORE, Batch, Example, eval_batches
from client.local_optimizer import make_optimizer
from client.model import LoadedModel, trainable_state, training_only
from common.spec import TrainingSpec

# Gradients of a rank's part of the global batch, reduced across ranks (a mean, as DDP's).
GradientReducer = Callable[[Sequence[torch.nn.Parameter]], None]


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int
    mean_loss: float
    last_loss: float
    seconds: float
    tokens: int  # non-padding tokens this process trained on (its part of each batch)


@dataclass(frozen=True, slots=True)
class RoundTraining:
    """A round's local training: the trained tensors (this round's own copies), how it went, the eval loss."""

    state: dict[str, torch.Tensor]
    result: TrainResult
    eval_loss: float


class Aborted(Exception):
    """The aggregator told the worker to stop this round."""


def _autocast(loaded: LoadedModel) -> torch.autocast:
    device = loaded.device
    dtype = loaded.compute_dtype or torch.bfloat16
    enabled = loaded.compute_dtype is not None or device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _loss(loaded: LoadedModel, batch: Batch) -> torch.Tensor:
    device = loaded.device
    with _autocast(loaded):
        out = loaded.model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            labels=batch.labels.to(device),
        )
    loss: torch.Tensor = out.loss
    return loss


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """A micro-batch and the weight of its mean loss in the step's gradient (None: the whole batch)."""

    batch: Batch
    weight: float | None


def micro_batches(batch: Batch, micro: int, shard: tuple[int, int] = (0, 1)) -> list[MicroBatch]:
    """This rank's micro-batches of a global batch, each weighted so the gradients add up to the batch's.

    The model's loss is a mean over a micro-batch's loss tokens; weighting it by its share of the
    global batch's loss tokens (times the ranks, whose gradients are averaged) makes the accumulated
    gradient the global batch's own, exactly, however padding and prompt masks fall. (A plain
    1/accumulation_steps is the same only where every micro-batch has as many loss tokens.) A
    micro-batch without loss tokens has no loss (0/0) and is left out. Each is cut to its own
    longest sequence: padding a short micro-batch to the global batch's width is wasted work.
    """
    rank, world = shard
    rows = batch.input_ids.shape[0]
    if world == 1 and (micro <= 0 or micro >= rows):
        return [MicroBatch(batch, None)]
    total = batch.tokens
    lo, hi = rank * rows // world, (rank + 1) * rows // world
    step = micro if micro > 0 else max(1, hi - lo)
    parts = []
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        used = batch.attention_mask[a:b].any(dim=0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1  # through the last column any row uses
        piece = Batch(
            batch.input_ids[a:b, :width], batch.attention_mask[a:b, :width], batch.labels[a:b, :width]
        )
        tokens = int((piece.labels[:, 1:] != IGNORE).sum())
        if tokens:
            parts.append(MicroBatch(piece, world * tokens / total))
    return parts


def train_steps(
    loaded: LoadedModel,
    data: Iterator[Batch],
    *,
    steps: int,
    lr: float,
    on_step: Callable[[int, float, int], None] = lambda step, loss, tokens: None,
    should_stop: Callable[[], bool] = lambda: False,
    prox_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    micro_batch: int = 0,
    max_grad_norm: float = 0.0,
    lr_at: Callable[[int], float] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce_gradients: GradientReducer | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps over the trainable parameters (a fresh AdamW unless one is given).

    Each step takes one batch from ``data``: with ``shard = (rank, world)``, world > 1, this process
    runs only its rank's share of it (rows ``[rank·n/world, (rank+1)·n/world)``), in micro-batches
    of ``micro_batch`` rows (0: all at once), accumulating their gradients. Then, once per step:
    ``reduce_gradients(params)``, which must leave on every rank the MEAN over ranks of each
    parameter's ``.grad`` (each rank's gradient is scaled by ``world`` for that, and every rank adds
    the whole FedProx term); the gradient norm clipped to ``max_grad_norm`` (0: not clipped); the
    learning rate set to ``lr_at(step)`` (None: ``lr`` throughout); the optimizer's step.
    ``on_step(step, loss, tokens)``: the step's loss on this rank's part, and the non-padding
    tokens trained so far this call.
    """
    params = dict(loaded.model.named_parameters())
    trainable = [params[n] for n in loaded.trainable]
    anchor = [p.detach().clone() for p in trainable] if prox_mu > 0 else []
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    # fp16 autocast (a CUDA device without bf16, or an fp16 base) needs loss scaling: small
    # gradients would underflow in fp16. bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(loaded.device.type) if loaded.compute_dtype is torch.float16 else None
    loaded.model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if should_stop():
            raise Aborted(f"stopped at step {step - 1} of {steps}")
        batch = next(data)
        parts = micro_batches(batch, micro_batch, shard)
        optimizer.zero_grad(set_to_none=True)
        weighted, weights = 0.0, 0.0
        for i, part in enumerate(parts):
            loss = _loss(loaded, part.batch)
            total = loss if part.weight is None else loss * part.weight
            if prox_mu > 0 and i == 0:
                total = total + _prox(prox_mu, trainable, anchor)
            (scaler.scale(total) if scaler else total).backward()  # type: ignore[no-untyped-call]
            share = 1.0 if part.weight is None else part.weight
            weighted += float(loss.detach()) * share
            weights += share
            tokens += int(part.batch.attention_mask.sum())
        if not parts and prox_mu > 0:
            prox = _prox(prox_mu, trainable, anchor)
            (scaler.scale(prox) if scaler else prox).backward()  # type: ignore[no-untyped-call]
        elif not parts and shard[1] > 1 and reduce_gradients is None:
            _idle_backward(loaded, batch, shard)
        if reduce_gradients is not None:
            for p in trainable:
                if p.grad is None:  # a rank without loss tokens this step still joins the reduction
                    p.grad = torch.zeros_like(p)
            reduce_gradients(trainable)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        value = weighted / weights if weights else float("nan")
        if not math.isfinite(value) and (parts or shard[1] == 1):  # a rank may have no share
            raise FloatingPointError(f"training loss became {value} at step {step}; lower the learning rate")
        losses.append(value)
        on_step(step, value, tokens)
    loaded.model.eval()
    finite = [v for v in losses if math.isfinite(v)]
    return TrainResult(
        steps,
        sum(finite) / max(1, len(finite)),
        losses[-1],
        time.perf_counter() - start,
        tokens,
    )


def _idle_backward(loaded: LoadedModel, batch: Batch, shard: tuple[int, int]) -> None:
    """A zero-gradient forward and backward for a rank whose share of a step has no loss tokens.

    FSDP reduces gradients inside backward, so a rank that skipped it would leave the others
    waiting in the collective. Zero times the logits, not the loss: the loss of no tokens is 0/0.
    """
    rank, world = shard
    rows = batch.input_ids.shape[0]
    lo, hi = rank * rows // world, (rank + 1) * rows // world
    lo, hi = (lo, hi) if hi > lo else (0, 1)  # fewer rows than ranks: any row carries the zero
    device = loaded.device
    with _autocast(loaded):
        out = loaded.model(
            input_ids=batch.input_ids[lo:hi].to(device), attention_mask=batch.attention_mask[lo:hi].to(device)
        )
    (out.logits.float().sum() * 0.0).backward()


def _prox(mu: float, trainable: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]) -> torch.Tensor:
    # FedProx (Li et al.): (mu / 2) * ||w - w_start||^2 keeps local models near the global one.
    norm = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
    assert isinstance(norm, torch.Tensor)  # at least one trainable tensor
    return 0.5 * mu * norm


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
    on_step: Callable[[int, float, int], None] = lambda step, loss, tokens: None,
    should_stop: Callable[[], bool] = lambda: False,
    round_number: int = 1,
    shard: tuple[int, int] = (0, 1),
    reduce_gradients: GradientReducer | None = None,
) -> RoundTraining:
    """A round's steps over the parameters ``params``, from the state ``start`` already loaded, then the eval loss.

    ``carried``: optimizer-state tensors travelling with the round (FedCyBGD); AdamW starts from
    them in ``start`` and their trained values join the result. ``round_number`` places the round's
    steps on the run's learning-rate schedule; ``shard`` and ``reduce_gradients`` as for
    ``train_steps``. Raises ``Aborted`` when told to stop.
    """
    moved: dict[str, torch.Tensor] = {}
    lr_at = schedule.for_round(spec, round_number)
    with training_only(loaded, params) as part:
        adamw = optimizer_state.restored_adamw(part, start, carried, spec.learning_rate) if carried else None
        named = dict(part.model.named_parameters())
        optimizer = adamw or make_optimizer(
            [named[n] for n in part.trainable], spec.optimizer, spec.learning_rate, part.device
        )
        result = train_steps(
            part,
            data,
            steps=spec.local_steps,
            lr=spec.learning_rate,
            on_step=on_step,
            should_stop=should_stop,
            prox_mu=spec.prox_mu,
            optimizer=optimizer,
            micro_batch=spec.micro_batch_size,
            max_grad_norm=spec.max_grad_norm,
            lr_at=lr_at,
            shard=shard,
            reduce_gradients=reduce_gradients,
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
