"""What a site's worker is told to do (``WorkerConfig``) and what each round gave it (``RoundReport``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.transfer import MAX_WAIT_S


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """How one site runs."""

    aggregator: str
    site_id: str
    token: str
    model: Path
    data: Path
    state_dir: Path
    eval_data: Path | None = None  # default: a held-out part of ``data``
    eval_fraction: float = 0.1
    device: str = "auto"
    lora_rank: int = 0  # the rank this site can afford (FlexLoRA); 0 = the run's
    max_rounds: int = 0  # stop after this many rounds; 0 = until the run ends
    quiet: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    seed: int = 0
    # The longest a call waits for an aggregator that is away (from its first failure), in seconds.
    max_wait_s: float = MAX_WAIT_S

    def __post_init__(self) -> None:
        if not 0 < self.max_wait_s < float("inf"):
            raise ValueError(f"max_wait_s is {self.max_wait_s}; must be a number of seconds > 0")


@dataclass
class RoundReport:
    """What one round cost and gave this site."""

    round: int
    train_loss: float
    eval_loss: float
    bytes_up: int
    bytes_down: int
    train_seconds: float
    steps: int
