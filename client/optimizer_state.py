"""FedCyBGD's optimizer state travelling with a block (``[cybgd] optimizer_state = "travel"``).

The global state then holds, beside each block parameter ``p``, tensors
``p#exp_avg`` and ``p#exp_avg_sq`` and one ``<block>#step`` per block. The
site whose turn it is starts AdamW from them and uploads their differences
with the weights', so the next site to train the block continues the same
optimizer: what the authors' simulation does by handing the optimizer from
client to client, made to work across machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from client.model import LoadedModel
from common.spec import OPTIMIZER_MARK


def split(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(parameter names, optimizer-state names) of a round's trainable tensors."""
    return [n for n in names if OPTIMIZER_MARK not in n], [n for n in names if OPTIMIZER_MARK in n]


def restored_adamw(
    part: LoadedModel, state: Mapping[str, torch.Tensor], names: Sequence[str], lr: float
) -> torch.optim.AdamW:
    """An AdamW over ``part``'s trainable parameters, with the moments and step found in ``state``.

    With one site cycling over every block this is BAdam's block-coordinate descent with one
    persistent AdamW, step for step (tests/test_cybgd_reference.py). The learning rate does not
    travel: the rate of each step is the run's schedule at that round (``client.schedule``; the
    authors' cosine schedule travels with their optimizer), the same on every site.

    Raises:
        ValueError: a moment's shape differs from its parameter's.
    """
    params = dict(part.model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in part.trainable], lr=lr, weight_decay=0.0)
    step = _step_of(state, names)
    if step <= 0:
        return optimizer  # never trained yet: AdamW starts from zero moments anyway
    for name in part.trainable:
        param = params[name]
        moments = {kind: state[name + OPTIMIZER_MARK + kind] for kind in ("exp_avg", "exp_avg_sq")}
        for kind, value in moments.items():
            # Moments are elementwise: on a parameter of another shape they would be another's.
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{name}{OPTIMIZER_MARK}{kind} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}"
                )
        # One count per block: AdamW's bias correction continues from this block's own steps.
        optimizer.state[param] = {"step": torch.tensor(step, dtype=torch.float32)} | {
            kind: value.to(param.device, torch.float32).clone() for kind, value in moments.items()
        }
    return optimizer


def optimizer_tensors(
    part: LoadedModel, optimizer: torch.optim.Optimizer, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The optimizer-state tensors ``names`` after training, as fp32 CPU tensors."""
    params = dict(part.model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    step = 0.0
    for name in part.trainable:
        st = optimizer.state[params[name]]
        out[name + OPTIMIZER_MARK + "exp_avg"] = st["exp_avg"].detach().to("cpu", torch.float32).clone()
        out[name + OPTIMIZER_MARK + "exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu", torch.float32).clone()
        step = float(st["step"])
    for name in names:
        if name.endswith(OPTIMIZER_MARK + "step"):
            out[name] = torch.tensor([step], dtype=torch.float32)
    missing = set(names) - set(out)
    if missing:
        raise ValueError(f"the round names optimizer state this block does not have: {sorted(missing)[:3]}")
    return {n: out[n] for n in names}


def _step_of(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> float:
    steps = [float(state[n].reshape(-1)[0]) for n in names if n.endswith(OPTIMIZER_MARK + "step")]
    return max(steps, default=0.0)


def fill_missing(state: dict[str, torch.Tensor], names: Sequence[str], loaded: LoadedModel) -> None:
    """Zero optimizer state for ``names`` not yet in ``state``: a worker that started from its own copy
    of the base model has fetched none (it is zero at round 0)."""
    params = dict(loaded.model.named_parameters())
    for name in names:
        if name in state:
            continue
        base, _, kind = name.rpartition(OPTIMIZER_MARK)
        shape = (1,) if kind == "step" else tuple(params[base].shape)
        state[name] = torch.zeros(shape)
