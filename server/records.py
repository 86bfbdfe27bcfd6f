"""The aggregator's durable records: run, rounds, sites, uploads (plain dataclasses).

These are what ``server.store`` keeps in SQLite and what the servicers turn
into protobuf replies; nothing here knows about either. ``check_id`` is the
rule for the ids that name them (run, site, upload), wherever they come in.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any

from common.delta import TrainingStats
from common.errors import InvalidArgument
from common.spec import RoundState as RoundState  # where it lived first; the wire mirror is common's

_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_id(value: str, field: str) -> None:
    """Raise InvalidArgument unless ``value`` is 1..64 chars of [A-Za-z0-9._-]."""
    if not _ID.match(value):
        raise InvalidArgument(
            f"{field} {value!r} must be 1..64 characters of [A-Za-z0-9._-]", field=field, limit=64
        )


class SiteState(enum.IntEnum):
    """Liveness of a site (values equal the wire enum gradualdiff.v1.SiteState)."""

    ALIVE = 1
    SILENT = 2
    EVICTED = 3


class UploadState(enum.IntEnum):
    """Where an upload stands."""

    RECEIVING = 1
    ACCEPTED = 2
    REJECTED = 3
    ABANDONED = 4


@dataclass(slots=True, kw_only=True)
class RunRecord:
    run_id: str
    created_ms: int
    current_round: int = 0
    paused: bool = False
    finished: bool = False
    min_sites: int = 0
    min_sample_fraction: float = 0.0
    round_deadline_s: int = 0
    optimizer_blob: str = ""  # content address of the server optimizer's state file ("" = fresh)
    pause_reason: str = ""  # what the operator said when pausing ("" when not paused)
    min_sites_to_open: int = 0  # alive sites a round waits for before it opens (live-changeable)
    # Client-level DP (server.privacy), as of the latest round published with noise (0 = none yet):
    # the epsilon spent by all of them at dp_delta, the noise multiplier, how many rounds had noise.
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_rounds: int = 0


@dataclass(slots=True, kw_only=True)
class RoundRecord:
    round: int
    state: RoundState
    opened_ms: int
    deadline_ms: int = 0
    closed_ms: int = 0
    published_ms: int = 0
    close_reason: str = ""
    failure_reason: str = ""
    expected_samples: int = 0
    samples: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    diff_blob: str = ""  # content address of the global difference D_r's payload
    diff_header: bytes = b""  # its gradualdiff.v1.DeltaHeader, serialized
    diff_bytes: int = 0
    snapshot_blob: str = ""  # the trainable state after this round, encoded
    snapshot_header: bytes = b""
    snapshot_bytes: int = 0
    # The payloads' full layouts (common.serde.layout_to_bytes): wire revision 2 sends a stored
    # payload's shard specs with its chunks, so they are kept beside it. Empty beside a header
    # means a state directory of wire revision 1 (server.genesis refuses it).
    diff_layout: bytes = b""
    snapshot_layout: bytes = b""
    state_blob: str = ""  # the same state as a plain safetensors file
    aggregate_seconds: float = 0.0
    mean_train_loss: float = 0.0
    mean_eval_loss: float = 0.0
    # Set when the round publishes: the rule that combined its uploads ("" = mean, before it existed),
    # the values trimmed per side and coordinate; with DP (server.privacy), the noise multiplier z,
    # the std of the noise on each coordinate of the mean delta, the sample rate the accountant took,
    # and the epsilon spent by the run up to and including this round.
    aggregation_rule: str = ""
    trimmed_per_side: int = 0
    dp_noise_multiplier: float = 0.0
    dp_noise_std: float = 0.0
    dp_sample_rate: float = 0.0
    dp_epsilon: float = 0.0


@dataclass(slots=True, kw_only=True)
class SiteRecord:
    site_id: str
    state: SiteState = SiteState.ALIVE
    joined_ms: int = 0
    last_beat_ms: int = 0
    rounds_joined: int = 0
    held_round: int = 0
    device: int = 0
    memory_bytes: int = 0
    lora_rank: int = 0
    num_samples: int = 0
    phase: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    beat_round: int = 0
    last_problem: str = ""  # the worker's last warning or error, as its heartbeat reported it
    load_seconds: float = 0.0  # the worker's phase timings, as its latest heartbeat reported them
    sync_seconds: float = 0.0
    train_seconds: float = 0.0
    upload_seconds: float = 0.0
    # The worker's training figures (common.delta.TrainingStats; 0 = not reported), as its latest
    # heartbeat reported them.
    tokens_per_second: float = 0.0
    step_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_is_accelerator: bool = False
    ranks: int = 0
    tokens: int = 0


@dataclass(slots=True, kw_only=True)
class ParticipantRecord:
    """A site's part in one round."""

    round: int
    site_id: str
    num_samples: int = 0
    dropped: bool = False


@dataclass(slots=True, kw_only=True)
class UploadRecord:
    upload_id: str
    round: int
    site_id: str
    state: UploadState = UploadState.RECEIVING
    sample_count: int = 0
    total_bytes: int = 0  # the payload's size, known once its last chunk arrived (0 before)
    committed_offset: int = 0
    header: bytes = b""  # gradualdiff.v1.DeltaHeader, serialized
    # The specs of the shards that end at or before committed_offset (common.serde.shards_to_bytes),
    # written with it: a resume after a restart knows the shards before it (their specs arrived
    # with chunks the worker will not send again).
    shards: bytes = b""
    layout: bytes = b""  # the full PayloadLayout (common.serde.layout_to_bytes), set at acceptance
    seq: int = 0  # acceptance order within the round (1-based; 0 = not accepted)
    train_loss: float = 0.0
    eval_loss: float = 0.0
    started_ms: int = 0
    accepted_ms: int = 0
    upload_seconds: float = 0.0
    reason: str = ""
    # Bounded influence (server.influence), set when the round publishes: the delta's global L2 norm
    # as received (0 = not measured), the factor clipping scaled it by, whether it was an outlier.
    norm: float = 0.0
    clip_scale: float = 1.0
    outlier: bool = False
    # The worker's training figures (common.delta.TrainingStats; 0 = not reported): the round's,
    # as the upload's metrics reported them.
    tokens_per_second: float = 0.0
    step_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_is_accelerator: bool = False
    ranks: int = 0
    tokens: int = 0
    # What the upload is (common.delta.DeltaKind's value: 1 DIFF, a site's own delta; 3 PARTIAL_SUM,
    # an intermediate aggregator's Σ n_i·Δ_i) and, for a partial sum, how many sites' uploads it holds.
    kind: int = 1
    sites: int = 0


def training_fields(stats: TrainingStats) -> dict[str, Any]:
    """``stats`` as the fields of a SiteRecord or an UploadRecord (``replace(record, **...)``)."""
    return dataclasses.asdict(stats)


def training_of(record: SiteRecord | UploadRecord) -> TrainingStats:
    """The training figures a SiteRecord or an UploadRecord holds."""
    return TrainingStats(**{f.name: getattr(record, f.name) for f in dataclasses.fields(TrainingStats)})
