"""What a site's training costs and yields, as its heartbeats and uploads report it (``TrainingStats``).

* tokens per second: the non-padding tokens trained this round over the time since its training
  began (the round so far, in a heartbeat);
* step seconds: that time over the optimizer steps taken;
* peak memory: ``torch.cuda.max_memory_allocated`` when training on CUDA, else the host's peak
  RSS (``VmHWM`` in /proc/self/status; ``ru_maxrss`` where there is no /proc). Both are the
  process's peak since it started: resetting them each round would also reset them for anyone
  else reading them in the process (a bench's peak), and "does the site fit" is about the peak;
* ranks: the torch.distributed world size when a process group is up, else 1. Rank 0 alone
  reports, counting its own part of each batch, so the site's tokens are rank 0's times the
  ranks: exact when the ranks' parts are alike, an estimate otherwise.

Figures go out finite and within ``common.serde.STATS_LIMITS`` (the aggregator refuses others):
a clock or counter gone wrong is reported as nothing measured, not as a measurement.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path

import torch

from common.delta import TrainingStats
from common.serde import STATS_LIMITS

_PROC_STATUS = Path("/proc/self/status")


def peak_host_rss() -> int:
    """The process's peak resident set size in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_memory(device: torch.device) -> tuple[int, bool]:
    """The process's peak memory in bytes and whether it is the accelerator's (else the host's RSS)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), True
    return peak_host_rss(), False


def world_size() -> int:
    """Processes training this site: the torch.distributed world size when initialised, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


class RoundMeter:
    """Measures one round's training from its making on; ``at`` gives the figures so far."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._started = time.perf_counter()
        self._ranks = world_size()

    def at(self, steps: int, tokens: int, seconds: float | None = None) -> TrainingStats:
        """The figures after ``steps`` optimizer steps and ``tokens`` non-padding tokens (this
        process's) in ``seconds`` (default: since the meter was made)."""
        elapsed = time.perf_counter() - self._started if seconds is None else seconds
        peak, on_accelerator = peak_memory(self._device)
        site_tokens = tokens * self._ranks
        return TrainingStats(
            tokens_per_second=_bounded(site_tokens / elapsed if elapsed > 0 else 0.0, "tokens_per_second"),
            step_seconds=_bounded(elapsed / steps if steps > 0 else 0.0, "step_seconds"),
            peak_memory_bytes=int(_bounded(peak, "peak_memory_bytes")),
            peak_is_accelerator=on_accelerator,
            ranks=int(_bounded(self._ranks, "ranks")),
            tokens=int(_bounded(site_tokens, "tokens")),
        )


def _bounded(value: float, name: str) -> float:
    """``value`` if it is one the aggregator takes, else 0 (nothing measured)."""
    return value if math.isfinite(value) and 0 <= value <= STATS_LIMITS[name] else 0.0
