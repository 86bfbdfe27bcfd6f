"""What a round asks of a worker: the method, which tensors train, and how (plain data)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.delta import Codec

# FedCyBGD's optimizer state when it travels with a block: tensors "<param>#exp_avg",
# "<param>#exp_avg_sq" and "<block prefix>#step" beside the weights in the global state.
OPTIMIZER_MARK = "#"


class Method(enum.IntEnum):
    """Federated method (wire enum gradualdiff.v1.Method)."""

    GRADUALDIFF = 1
    FLEXLORA = 2
    FEDCYBGD = 3


class TrainMode(enum.IntEnum):
    """Which tensors train (wire enum gradualdiff.v1.TrainMode)."""

    FULL = 1
    SUBSET = 2
    LORA = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSpec:
    """Local training settings every site of a run uses."""

    method: Method = Method.GRADUALDIFF
    mode: TrainMode = TrainMode.FULL
    trainable_patterns: tuple[str, ...] = ()
    lora: LoraSpec = field(default_factory=LoraSpec)
    local_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-4
    max_seq_len: int = 256
    upload_codec: Codec = field(default_factory=Codec)
    seed: int = 0
    prox_mu: float = (
        0.0  # FedProx (Li et al.): pull local weights towards the round's start; 0 = plain local training
    )
