"""The optimizer a site trains with: torch's AdamW, or bitsandbytes' 8-bit (optionally paged) AdamW.

8-bit AdamW keeps both moments block-wise quantized (2 bytes per parameter instead of 8); the
paged variant also lets them spill to host memory through CUDA unified memory when the device
runs short. All three are AdamW without weight decay, as the worker's optimizer always was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from common.spec import LocalOptimizer

logger = logging.getLogger(__name__)


def make_optimizer(
    params: Sequence[torch.nn.Parameter], kind: LocalOptimizer, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """A fresh optimizer of ``kind`` over ``params``.

    PAGED_ADAMW_8BIT on a device other than CUDA becomes ADAMW_8BIT, with a log line: paging is
    CUDA unified memory, and the update is the same arithmetic either way (bitsandbytes itself
    falls back the same, warning on every parameter).
    """
    if kind is LocalOptimizer.ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    import bitsandbytes as bnb

    optim: Any = bnb.optim  # untyped
    if kind is LocalOptimizer.PAGED_ADAMW_8BIT:
        if device.type == "cuda":
            paged: torch.optim.Optimizer = optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0)
            return paged
        logger.info("[train] paged 8-bit AdamW needs CUDA; %s trains with unpaged 8-bit AdamW", device)
    plain: torch.optim.Optimizer = optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    return plain
