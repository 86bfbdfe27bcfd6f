"""What a round asks of a worker: the method, which tensors train, and how (plain data).

The wire enums both sides branch on are mirrored here as IntEnums with the
generated values (``tests/test_spec_enums.py`` checks every mirror against its
``*_pb2`` enum); code compares with these names, never with bare numbers.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from common.delta import Codec
from common.errors import InvalidArgument

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


class BaseDtype(enum.IntEnum):
    """How the frozen base is held (wire enum gradualdiff.v1.BaseDtype)."""

    AUTO = 1  # bf16 on an accelerator that has it, else fp16 there; fp32 on the CPU
    FP32 = 2
    BF16 = 3
    FP16 = 4


class Quantization(enum.IntEnum):
    """A quantized frozen base through bitsandbytes (wire enum gradualdiff.v1.Quantization)."""

    NONE = 1
    NF4 = 2  # 4-bit NormalFloat, double quantization: QLoRA
    INT8 = 3  # LLM.int8()


class LocalOptimizer(enum.IntEnum):
    """The optimizer a site trains with (wire enum gradualdiff.v1.LocalOptimizer)."""

    ADAMW = 1
    ADAMW_8BIT = 2
    PAGED_ADAMW_8BIT = 3


class LrSchedule(enum.IntEnum):
    """The learning rate along the run (wire enum gradualdiff.v1.LrSchedule)."""

    CONSTANT = 1
    COSINE = 2


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
    # Memory-lean training (issue 17); every site of the run trains alike, so these travel in the spec.
    base_dtype: BaseDtype = BaseDtype.AUTO
    quantization: Quantization = Quantization.NONE
    gradient_checkpointing: bool = False
    micro_batch_size: int = 0  # 0 = batch_size: no gradient accumulation
    max_grad_norm: float = 0.0  # 0 = no clipping
    optimizer: LocalOptimizer = LocalOptimizer.ADAMW
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    min_learning_rate: float = 0.0
    warmup_steps: int = 0
    schedule_rounds: int = 0  # COSINE: the rounds it spans; the aggregator fills in the run's rounds

    def __post_init__(self) -> None:
        # Validated here so a config file and a wire message are held to the same limits.
        _at_least(self.local_steps, 1, "local_steps")
        _at_least(self.batch_size, 1, "batch_size")
        _at_least(self.max_seq_len, 1, "max_seq_len")
        _at_least(self.micro_batch_size, 0, "micro_batch_size")
        _at_least(self.warmup_steps, 0, "warmup_steps")
        _at_least(self.schedule_rounds, 0, "schedule_rounds")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise InvalidArgument(
                f"training.micro_batch_size = {self.micro_batch_size} must divide "
                f"training.batch_size = {self.batch_size}",
                field="training.micro_batch_size",
            )
        for name in ("learning_rate", "max_grad_norm", "min_learning_rate", "prox_mu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(
                    f"training.{name} = {value!r} must be a finite number >= 0", field=f"training.{name}"
                )
        if self.min_learning_rate > self.learning_rate:
            raise InvalidArgument(
                f"training.min_learning_rate = {self.min_learning_rate} is above "
                f"training.learning_rate = {self.learning_rate}",
                field="training.min_learning_rate",
            )
        if self.quantization is not Quantization.NONE and self.mode is not TrainMode.LORA:
            # A quantized weight cannot train, and its delta would not be an fp32 difference.
            raise InvalidArgument(
                f"training.quantization = {self.quantization.name.lower()} needs "
                f'training.mode = "lora" (is {self.mode.name.lower()})',
                field="training.quantization",
            )

    @property
    def micro_batch(self) -> int:
        """Examples per forward/backward pass."""
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation_steps(self) -> int:
        """Forward/backward passes per optimizer step."""
        return self.batch_size // self.micro_batch


def _at_least(value: int, low: int, name: str) -> None:
    if value < low:
        raise InvalidArgument(f"training.{name} = {value} must be >= {low}", field=f"training.{name}")
