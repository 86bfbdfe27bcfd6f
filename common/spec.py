"""What a round asks of a worker: the method, which tensors train, and how (plain data).

The wire enums both sides branch on are mirrored here as IntEnums with the
generated values (``tests/test_spec_enums.py`` checks every mirror against its
``*_pb2`` enum); code compares with these names, never with bare numbers.
"""

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


class Device(enum.IntEnum):
    """What a worker trains on (wire enum gradualdiff.v1.Device)."""

    CPU = 1
    CUDA = 2


class Phase(enum.IntEnum):
    """What a worker is doing, as its heartbeats report (wire enum gradualdiff.v1.Phase)."""

    IDLE = 1
    SYNCING = 2
    TRAINING = 3
    UPLOADING = 4
    LOADING = 5  # loading the model: beats start at Join


class Directive(enum.IntEnum):
    """What a heartbeat reply tells the worker to do (wire enum gradualdiff.v1.Directive)."""

    CONTINUE = 0
    ABORT_ROUND = 1  # stop training this round; await the next
    RESYNC = 2  # local state is stale: fetch before training again
    SLOW_DOWN = 3  # beat less often (next_beat_ms)
    STOP = 4  # evicted or run over: exit


class RoundState(enum.IntEnum):
    """Lifecycle of a round (values equal the wire enum gradualdiff.v1.RoundState)."""

    OPEN = 1
    TRAINING = 2
    COLLECTING = 3
    AGGREGATING = 4
    PUBLISHED = 5
    FAILED = 6

    @property
    def is_final(self) -> bool:
        return self in (RoundState.PUBLISHED, RoundState.FAILED)

    @property
    def accepts_uploads(self) -> bool:
        return self in (RoundState.OPEN, RoundState.TRAINING, RoundState.COLLECTING)


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
