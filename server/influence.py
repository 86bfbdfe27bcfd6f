"""Bounded influence of a site: the norm bounds of one round's uploads.

Every upload's global L2 norm ‖Δ‖ (over all its tensors) is measured as its
shards are decoded. Per round, fixed when the round opens:

    clip    = min(clip_norm, adaptive × median(recent norms))   (either part off when 0)
    scale   = min(1, clip / ‖Δ‖)                                 (the delta folds as scale·Δ)
    refused when ‖Δ‖ > max_norm                                  (INVALID_ARGUMENT naming both)
    outlier when ‖Δ‖ > outlier_factor × median                   (flagged in the log and the record)

"Recent norms" are the raw norms of the last ``history`` uploads accepted in
earlier, published rounds (``UploadRecord.norm``), so a round's bounds are the
same when its sum is rebuilt after a restart. With no history yet, the
adaptive bound and the outlier test are off. ``max_norm`` also keeps the sum
finite: with it, Σ n_i·‖Δ_i‖ is checked against the accumulator's range
before anything is added (``Accumulation``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.errors import InvalidArgument
from server.config import InfluenceConfig
from server.records import UploadRecord, UploadState
from server.store import Store

_NORM_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class RoundBounds:
    """One round's bounds on an upload's norm (see the module docstring)."""

    clip: float = math.inf  # inf: no clipping
    max_norm: float = 1e9
    median: float = 0.0  # of the recent accepted norms; 0: no history
    outlier_factor: float = 0.0

    def check(self, upload_id: str, norm: float) -> None:
        """INVALID_ARGUMENT if ``norm`` (so far) is over ``max_norm``: the upload is refused."""
        if not norm <= self.max_norm:
            raise InvalidArgument(
                f"upload {upload_id!r}: the delta's global L2 norm is {norm:.4g} (at least), over "
                f"influence.max_norm {self.max_norm:.4g}; the aggregator refuses it",
                field="delta",
                limit=self.max_norm,
            )

    def scale(self, norm: float) -> float:
        """The factor the upload is folded with: min(1, clip / norm)."""
        return 1.0 if norm <= self.clip else self.clip / norm

    def is_outlier(self, norm: float) -> bool:
        return self.outlier_factor > 0 and self.median > 0 and norm > self.outlier_factor * self.median


def round_bounds(config: InfluenceConfig, history: Sequence[float]) -> RoundBounds:
    """The bounds of a round, given the recent accepted norms (``recent_norms``)."""
    median = statistics.median(history) if history else 0.0
    clip = config.clip_norm if config.clip_norm > 0 else math.inf
    if config.adaptive > 0 and median > 0:
        clip = min(clip, config.adaptive * median)
    return RoundBounds(
        clip=clip, max_norm=config.max_norm, median=median, outlier_factor=config.outlier_factor
    )


def recent_norms(store: Store, before_round: int, count: int) -> list[float]:
    """The norms of the last ``count`` sites' uploads accepted in rounds before ``before_round``
    (not intermediates' partial sums, ``sites`` > 0: theirs are norms of sums)."""
    uploads = store.select(
        UploadRecord,
        "state = ? AND round < ? AND round >= ? AND norm > 0 AND sites = 0",
        (int(UploadState.ACCEPTED), before_round, before_round - count),
        order="round DESC, seq DESC",
    )
    return [u.norm for u in uploads[:count]]


def squared_norm(values: torch.Tensor) -> float:
    """Σ v² of a float tensor.

    Blocks of 4096 in fp32 (as fast as a fold: 64M elements in about 10 ms on 2 cores), their
    sums in fp64 (relative error ~1e-8); all of it in fp64 if an fp32 block overflows (a delta
    near fp32's limit squares far past fp32's range).
    """
    flat = values.reshape(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    whole = flat.numel() // _NORM_BLOCK * _NORM_BLOCK
    squares = 0.0
    if whole:
        blocks = torch.linalg.vector_norm(flat[:whole].view(-1, _NORM_BLOCK), dim=1, dtype=dtype)
        squares = float(blocks.double().square().sum())
    if whole < flat.numel():
        squares += float(torch.linalg.vector_norm(flat[whole:], dtype=torch.float64)) ** 2
    if not math.isfinite(squares):
        squares = float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2
    return squares
