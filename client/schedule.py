"""The learning rate along a run: linear warm-up, then constant or cosine down to a floor.

Written as a closed form of the run's step count instead of a torch ``LambdaLR``: a worker builds a
fresh optimizer each round (and after a restart), and every site must train a round at the same
rates, so the rate is a pure function of (spec, round, step) that needs no scheduler state to
fast-forward or carry. The formula is transformers'
``get_cosine_with_min_lr_schedule_with_warmup`` (and ``get_constant_schedule_with_warmup``)
evaluated one scheduler step later: there the first optimizer step of a warm-up runs at rate 0
(``LambdaLR`` applies its value at step 0 before the first ``scheduler.step()``); here step g of
the run takes the value after g + 1 steps, so no step is wasted and the run's last step is at
``min_learning_rate``. Past the schedule's span the rate stays at the floor (transformers'
cosine would rise again).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from common.spec import LrSchedule, TrainingSpec


def run_step(spec: TrainingSpec, round_number: int, step: int) -> int:
    """The 0-based index along the run of a round's optimizer step ``step`` (1-based).

    Every round is ``local_steps`` steps of the run's clock, whether this site trained in the
    rounds before or not. Under FedCyBGD a round is one turn of the cycle and counts the same: the
    schedule follows the run, not the block.
    """
    return (max(1, round_number) - 1) * spec.local_steps + step - 1


def learning_rate(spec: TrainingSpec, g: int) -> float:
    """The learning rate of the run's optimizer step ``g`` (0-based).

    Raises:
        ValueError: a cosine schedule without ``schedule_rounds`` (the aggregator fills it in).
    """
    if spec.lr_schedule is LrSchedule.COSINE and spec.schedule_rounds <= 0:
        raise ValueError('training.lr_schedule = "cosine" needs training.schedule_rounds >= 1')
    s = g + 1  # transformers' scheduler step after this optimizer step
    if s < spec.warmup_steps:
        return spec.learning_rate * s / spec.warmup_steps
    if spec.lr_schedule is LrSchedule.CONSTANT:
        return spec.learning_rate
    total = spec.schedule_rounds * spec.local_steps
    progress = min(1.0, (s - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_learning_rate + (spec.learning_rate - spec.min_learning_rate) * factor


def for_round(spec: TrainingSpec, round_number: int) -> Callable[[int], float] | None:
    """Step (1-based within the round) -> learning rate, or None where the rate is constant."""
    if spec.lr_schedule is LrSchedule.CONSTANT and spec.warmup_steps == 0:
        return None
    learning_rate(spec, 0)  # a cosine without a span fails here, not mid-round
    return lambda step: learning_rate(spec, run_step(spec, round_number, step))
