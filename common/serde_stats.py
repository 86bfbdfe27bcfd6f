"""Protobuf <-> domain conversion of a site's training figures (TrainingStats), bounded on the way in.

Re-exported by common.serde, where the rest of the delta messages convert.
"""

from __future__ import annotations

import math

from common.delta import TrainingStats
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import delta_pb2 as pb

# The most a site's training figures may say: past any real site, yet no corrupt or hostile value
# passes for a measurement (tokens: exact as a JSON number).
STATS_LIMITS: dict[str, float] = {
    "tokens_per_second": 1e9,
    "step_seconds": 7 * 86400.0,
    "peak_memory_bytes": float(2**50),
    "ranks": 65536,
    "tokens": float(2**53),
}


def training_stats_to_proto(stats: TrainingStats) -> pb.TrainingStats:
    return pb.TrainingStats(
        tokens_per_second=stats.tokens_per_second,
        step_seconds=stats.step_seconds,
        peak_memory_bytes=stats.peak_memory_bytes,
        peak_is_accelerator=stats.peak_is_accelerator,
        ranks=stats.ranks,
        tokens=stats.tokens,
    )


def training_stats_from_proto(msg: pb.TrainingStats, field: str = "training") -> TrainingStats:
    """The figures as sent, each finite, >= 0 and within ``STATS_LIMITS``.

    Raises:
        InvalidArgument: naming the field (``training.step_seconds``, under ``field``) and its limit.
    """
    for name, limit in STATS_LIMITS.items():
        value = getattr(msg, name)
        if not (math.isfinite(value) and 0 <= value <= limit):
            raise InvalidArgument(
                f"{field}.{name} is {value}; must be finite, >= 0 and <= {limit:g}",
                field=f"{field}.{name}",
                limit=limit,
            )
    return TrainingStats(
        tokens_per_second=msg.tokens_per_second,
        step_seconds=msg.step_seconds,
        peak_memory_bytes=msg.peak_memory_bytes,
        peak_is_accelerator=msg.peak_is_accelerator,
        ranks=msg.ranks,
        tokens=msg.tokens,
    )
