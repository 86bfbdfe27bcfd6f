"""``gdfed status --json``: the run, its rounds and its sites as one versioned JSON document.

Built by hand from the Admin service's messages, not by MessageToJson, so the
document is a contract of its own (docs/operator.md, "Status and its JSON
schema"): every field is always present, numbers are JSON numbers (64-bit
counters included), enums are lowercase words, and "no value yet" is ``null``,
never a 0 that reads like a measurement. A change that removes or retypes a
field bumps the version in ``SCHEMA``; adding a field does not.

The words and notes here are also what the text table shows (``admin_cli``).
"""

from __future__ import annotations

import math
import time
from typing import Any

SCHEMA = "gdfed.status/1"
SITE_SCHEMA = "gdfed.site/1"

# Wire enum value -> word. 0 (unspecified) is None: JSON null, "-" in the table.
ROUND_STATES = {1: "open", 2: "training", 3: "collecting", 4: "aggregating", 5: "published", 6: "failed"}
SITE_STATES = {1: "alive", 2: "silent", 3: "evicted"}
PHASES = {1: "idle", 2: "syncing", 3: "training", 4: "uploading", 5: "loading"}
DEVICES = {1: "cpu", 2: "cuda"}
CLOSE_REASONS = ("all", "quorum", "deadline", "admin")
PARTICIPANT_STATES = ("accepted", "dropped", "pending")


def word(table: dict[int, str], value: int) -> str | None:
    """The word of a wire enum value; None for unspecified, ``unknown(N)`` for a value newer than this CLI."""
    return table.get(value, f"unknown({value})") if value else None


def measured(value: float) -> float | None:
    """A loss or a duration as reported, None where nothing was reported yet (0 or not finite)."""
    return float(value) if value and math.isfinite(value) else None


def ms(value: int) -> int | None:
    """A Unix-ms time, None for "not yet" (0)."""
    return value or None


def participant_state(p: Any) -> str:
    return "accepted" if p.accepted else ("dropped" if p.dropped else "pending")


def close_note(r: Any) -> str:
    """What closed a round, in words: which rule, and how many of its sites it had.

    ``all 2 live sites`` or ``quorum: 1 of 2 (1 dropped)``; a failed round's reason as recorded.
    """
    if r.failure_reason:
        return str(r.failure_reason)
    reason = r.close_reason
    if reason not in CLOSE_REASONS:
        return str(reason)
    accepted = sum(1 for p in r.participants if p.accepted)
    dropped = sum(1 for p in r.participants if p.dropped and not p.accepted)
    late = len(r.participants) - accepted - dropped
    extra = ", ".join(f"{n} {what}" for n, what in ((dropped, "dropped"), (late, "late")) if n)
    if reason == "all":
        return f"all {accepted} live site{'s' if accepted != 1 else ''}" + (f" ({extra})" if extra else "")
    label = {"quorum": "quorum", "deadline": "deadline", "admin": "closed by the operator"}[reason]
    return f"{label}: {accepted} of {len(r.participants)}" + (f" ({extra})" if extra else "")


def elapsed_s(r: Any, now_ms: int) -> float | None:
    """Seconds from opening to publication (or closing); for a round still going, to ``now_ms``."""
    if not r.opened_unix_ms:
        return None
    end: int = r.published_unix_ms or r.closed_unix_ms or now_ms
    opened: int = r.opened_unix_ms
    return max(0, end - opened) / 1000


def is_live(r: Any) -> bool:
    """Whether a round is not published or failed yet: its values are those of its uploads so far."""
    return word(ROUND_STATES, r.state) in ("open", "training", "collecting", "aggregating")


def run_json(status: Any) -> dict[str, Any]:
    return {
        "run_id": status.run_id,
        "paused": status.paused,
        "pause_reason": status.pause_reason,
        "finished": status.finished,
        "waiting_reason": status.waiting_reason,
        "current_round": status.current_round,
        "current_state": word(ROUND_STATES, status.current_state),
        "total_rounds": status.total_rounds or None,
        "sites_alive": status.sites_alive,
        "sites_known": status.sites_known,
        "full_model_bytes": status.full_model_bytes,
        "policy": {
            "min_sites": status.quorum.min_sites,
            "min_sample_fraction": status.quorum.min_sample_fraction,
            "round_deadline_s": status.round_deadline_s,
            "min_sites_to_open": status.min_sites_to_open,
        },
        "started_unix_ms": ms(status.started_unix_ms),
        "server_version": status.server_version,
        "privacy": {  # client-level DP spent so far (null before a round publishes with noise)
            "epsilon": measured(status.dp_epsilon),
            "delta": measured(status.dp_delta),
            "noise_multiplier": measured(status.dp_noise_multiplier),
            "rounds": status.dp_rounds,
        },
    }


def round_json(r: Any, now_ms: int) -> dict[str, Any]:
    return {
        "round": r.round,
        "state": word(ROUND_STATES, r.state),
        "live": is_live(r),
        "accepted": sum(1 for p in r.participants if p.accepted),
        "samples": r.samples,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "diff_bytes": r.diff_bytes,
        "ratio_to_full_model": measured(r.ratio_to_full_model),
        "opened_unix_ms": ms(r.opened_unix_ms),
        "closed_unix_ms": ms(r.closed_unix_ms),
        "published_unix_ms": ms(r.published_unix_ms),
        "elapsed_s": elapsed_s(r, now_ms),
        "aggregate_seconds": measured(r.aggregate_seconds),
        "mean_train_loss": measured(r.mean_train_loss),
        "mean_eval_loss": measured(r.mean_eval_loss),
        "close_reason": r.close_reason or None,
        "close_note": close_note(r) if r.close_reason or r.failure_reason else "",
        "failure_reason": r.failure_reason,
        "aggregation_rule": r.aggregation_rule or None,
        "trimmed_per_side": r.trimmed_per_side,
        "privacy": {
            "noise_multiplier": measured(r.dp_noise_multiplier),
            "noise_std": measured(r.dp_noise_std),
            "sample_rate": measured(r.dp_sample_rate),
            "epsilon": measured(r.dp_epsilon),
        },
        "participants": [
            {
                "site_id": p.site_id,
                "state": participant_state(p),
                "sample_count": p.sample_count,
                "bytes_in": p.bytes_in,
                "train_loss": measured(p.train_loss),
                "eval_loss": measured(p.eval_loss),
                "upload_seconds": measured(p.upload_seconds),
                "norm": measured(p.norm),
                "clip_scale": measured(p.clip_scale),
                "outlier": p.outlier,
                "training": training_json(p.training),  # the round's figures, from the upload
                "sites": p.sites or None,  # an intermediate's partial sum: the sites' uploads it held
            }
            for p in r.participants
        ],
    }


def site_json(s: Any) -> dict[str, Any]:
    caps, timings = s.capabilities, s.timings
    return {
        "site_id": s.site_id,
        "state": word(SITE_STATES, s.state),
        "last_beat_unix_ms": ms(s.last_beat_unix_ms),
        "rounds_joined": s.rounds_joined,
        "held_round": s.held_round,
        "phase": word(PHASES, s.phase),
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": measured(s.loss),
        "last_problem": s.last_problem,
        "timings": {
            "load_seconds": measured(timings.load_seconds),
            "sync_seconds": measured(timings.sync_seconds),
            "train_seconds": measured(timings.train_seconds),
            "upload_seconds": measured(timings.upload_seconds),
        },
        "capabilities": {
            "device": word(DEVICES, caps.device),
            "memory_bytes": caps.memory_bytes,
            "lora_rank": caps.lora_rank,
            "num_samples": caps.num_samples,
        },
        "training": training_json(s.training),  # from the latest heartbeat: this round so far, or the last
    }


def training_json(t: Any) -> dict[str, Any]:
    """A site's training figures (wire TrainingStats); null where none was reported."""
    return {
        "tokens_per_second": measured(t.tokens_per_second),
        "step_seconds": measured(t.step_seconds),
        "peak_memory_bytes": t.peak_memory_bytes or None,
        "peak_memory_kind": memory_kind(t),
        "ranks": t.ranks or None,
        "tokens": t.tokens or None,
    }


def memory_kind(t: Any) -> str | None:
    """What a peak_memory_bytes measures: ``accelerator`` (torch max_memory_allocated) or ``host`` (peak RSS)."""
    if not t.peak_memory_bytes:
        return None
    return "accelerator" if t.peak_is_accelerator else "host"


def memory_note(t: Any) -> str:
    """The peak memory in words: ``1.23 GB accelerator``, ``0.41 GB host``; "-" where none was reported."""
    kind = memory_kind(t)
    return f"{t.peak_memory_bytes / 1e9:.2f} GB {kind}" if kind else "-"


def status_document(
    status: Any, rounds: list[Any], sites: list[Any], now_ms: int | None = None
) -> dict[str, Any]:
    """The ``gdfed.status/1`` document: the run, its recent rounds (newest first), its sites."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return {
        "schema": SCHEMA,
        "run": run_json(status),
        "rounds": [round_json(r, now) for r in rounds],
        "sites": [site_json(s) for s in sites],
        "intermediates": [intermediate_json(i) for i in status.intermediates],
    }


def intermediate_json(i: Any) -> dict[str, Any]:
    """One intermediate of a root's tree (wire IntermediateStatus): null where it has sent nothing yet."""
    sent = bool(i.round)
    return {
        "site_id": i.site_id,
        "joined": i.joined,
        "state": word(SITE_STATES, i.state),
        "last_beat_unix_ms": ms(i.last_beat_unix_ms),
        "round": i.round if sent else None,  # of its last accepted partial sum
        "sites": i.sites if sent else None,
        "samples": i.samples if sent else None,
        "accepted_unix_ms": ms(i.accepted_unix_ms),
    }


def site_document(site: Any) -> dict[str, Any]:
    """The ``gdfed.site/1`` document of ``gdfed status --site S --json``."""
    return {"schema": SITE_SCHEMA, "site": site_json(site)}
