"""Membership: sites join, beat and wait for a round; the silent ones are dropped.

A site's record says whether it is alive; its participant record says whether
it has a part in the open round (``add_participant``). Liveness counts from
this process's start at the earliest: sites cannot beat while the aggregator
is down, so after a restart each gets its full allowance again. A site that
beats is alive, whatever it does (a worker beats from Join on, loading its
model included).

Each beat also carries the worker's last problem (one line, at most
``MAX_PROBLEM_BYTES``) and its phase timings; the site's record keeps the
latest, for ``gdfed status --site``, and so are its training figures (tokens/s, step time, peak
memory, ranks). An evicted site is told so: STOP
"evicted" to its beats, PERMISSION_DENIED to every other call (server.auth.refuse_evicted).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from common.delta import TrainingStats
from common.errors import FailedPrecondition, InvalidArgument
from common.spec import Device, Directive, Phase
from server.auth import refuse_evicted
from server.config import RoundPolicy, ServerConfig
from server.methods import Assignment
from server.records import (
    ParticipantRecord,
    RoundState,
    SiteRecord,
    SiteState,
    check_id,
    training_fields,
)
from server.run_state import RunState

logger = logging.getLogger(__name__)

MAX_AWAIT_S = 60.0
MAX_PROBLEM_BYTES = 512  # HeartbeatRequest.last_problem
# How often a waiting AwaitRound looks again whether its site was evicted or its caller went away
# (nothing wakes it for either).
EVICTION_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class PhaseTimings:
    """A worker's latest phase durations, in seconds, as its heartbeat reported them (0 = not yet)."""

    load: float = 0.0
    sync: float = 0.0
    train: float = 0.0
    upload: float = 0.0

    def check(self) -> None:
        """InvalidArgument naming the field unless every duration is finite and >= 0."""
        for name in ("load", "sync", "train", "upload"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                field_name = f"timings.{name}_seconds"
                raise InvalidArgument(f"{field_name} is {value}; must be finite and >= 0", field=field_name)


@dataclass(frozen=True, slots=True)
class RoundView:
    """What a worker learns about the round it may train in."""

    run_id: str
    round: int
    state: RoundState
    deadline_ms: int
    policy: RoundPolicy
    finished: bool
    base_round: int  # the published round this round's uploads are deltas against
    assignment: Assignment = field(default_factory=Assignment)  # who trains what, at which rank


@dataclass(frozen=True, slots=True)
class JoinResult:
    run_id: str
    fingerprint: str
    heartbeat_interval_ms: int
    missed_beats: int
    current: RoundView
    max_upload_bytes: int


@dataclass(frozen=True, slots=True)
class BeatReply:
    directive: Directive
    current_round: int
    next_beat_ms: int
    message: str = ""


class Membership:
    """Join, Heartbeat and AwaitRound, and the liveness check the round loop runs every tick.

    Given the ``state`` it reads and changes under its lock, and the ``config`` (the base
    model's fingerprint, the heartbeat allowance, the upload limit a joining site learns).
    """

    def __init__(self, *, state: RunState, config: ServerConfig) -> None:
        self._state = state
        self._config = config
        self._live_since_ms = state.now_ms()
        # What every CONTINUE beat reply says besides ("" = nothing). An intermediate aggregator
        # (server.upstream.relay_loop) tells its sites here why a round's uploads were lost upstream.
        self.notice: Callable[[], str] = lambda: ""

    @property
    def _interval_ms(self) -> int:
        return int(self._config.heartbeat_interval_s * 1000)

    def join(self, site_id: str, *, device: Device | None, memory_bytes: int, lora_rank: int, num_samples: int,
             fingerprint: str, held_round: int) -> JoinResult:  # fmt: skip
        check_id(site_id, "site_id")
        expected = self._config.base_model_fingerprint
        if expected and fingerprint and fingerprint != expected:
            raise FailedPrecondition(
                f"base model fingerprint {fingerprint[:16]}… differs from the run's {expected[:16]}…: "
                "the site loaded a different model",
                field="base_model_fingerprint",
                reason="FINGERPRINT_MISMATCH",
            )
        state = self._state
        state.plan.check_site(lora_rank=lora_rank)
        with state.lock:
            site = state.store.get(SiteRecord, site_id)
            if site is not None:
                refuse_evicted(site)
            now = state.now_ms()
            site = replace(
                site or SiteRecord(site_id=site_id, joined_ms=now),
                state=SiteState.ALIVE,
                last_beat_ms=now,
                device=int(device or 0),
                memory_bytes=memory_bytes,
                lora_rank=lora_rank,
                num_samples=num_samples,
                held_round=held_round,
            )
            with state.store.transaction():
                state.store.put(site)
                self.add_participant(site)
            state.emit("site_joined", site_id=site_id, detail=f"samples={num_samples}")
            state.changed.notify_all()
            return JoinResult(
                run_id=state.run.run_id,
                fingerprint=expected,
                heartbeat_interval_ms=self._interval_ms,
                missed_beats=self._config.missed_beats,
                current=self.round_view(),
                max_upload_bytes=self._config.max_upload_bytes,
            )

    def add_participant(self, site: SiteRecord) -> None:
        """Give ``site`` its part in the open round, if the plan gives it one (caller holds the lock)."""
        state = self._state
        current = state.current_round()
        if current is None or not current.state.accepts_uploads:
            return
        if not state.assignment(current.round, site).trains:
            return
        existing = state.store.get(ParticipantRecord, current.round, site.site_id)
        if existing is None:
            site.rounds_joined += 1
            state.store.put(site)
        state.store.put(
            ParticipantRecord(
                round=current.round, site_id=site.site_id, num_samples=site.num_samples, dropped=False
            )
        )

    def heartbeat(self, site_id: str, *, round_number: int, phase: Phase | None, step: int, total_steps: int,
                  loss: float, last_problem: str = "", timings: PhaseTimings | None = None,
                  stats: TrainingStats | None = None) -> BeatReply:  # fmt: skip
        if not math.isfinite(loss):
            raise InvalidArgument(f"loss is {loss}; must be finite", field="loss")
        size = len(last_problem.encode())
        if size > MAX_PROBLEM_BYTES:
            raise InvalidArgument(
                f"last_problem is {size} bytes; the limit is {MAX_PROBLEM_BYTES}",
                field="last_problem",
                limit=MAX_PROBLEM_BYTES,
            )
        timings = timings or PhaseTimings()
        timings.check()
        state = self._state
        with state.lock:
            site = state.joined_site(site_id)
            run = state.run
            if site.state is SiteState.EVICTED:
                return BeatReply(Directive.STOP, run.current_round, self._interval_ms, "evicted")
            was_silent = site.state is SiteState.SILENT
            site = replace(
                site,
                state=SiteState.ALIVE,
                last_beat_ms=state.now_ms(),
                phase=int(phase or 0),
                step=step,
                total_steps=total_steps,
                loss=loss,
                beat_round=round_number,
                # One line, as the worker sends it; a stray newline must not break a status table.
                last_problem=" ".join(last_problem.split()),
                load_seconds=timings.load,
                sync_seconds=timings.sync,
                train_seconds=timings.train,
                upload_seconds=timings.upload,
                # Checked at the edge (common.serde.training_stats_from_proto).
                **training_fields(stats or TrainingStats()),
            )
            if run.finished:
                # Kept all the same: a worker's last beat leaves its final timings, or why it failed.
                state.store.put(site)
                return BeatReply(Directive.STOP, run.current_round, self._interval_ms, "the run is finished")
            with state.store.transaction():
                state.store.put(site)
                if was_silent:
                    self.add_participant(site)
            current = state.current_round()
            training = phase is Phase.TRAINING
            if current is not None and round_number == current.round and training:
                state.progress(current, RoundState.TRAINING)
            if current is not None and round_number and round_number < current.round and training:
                return BeatReply(
                    Directive.ABORT_ROUND, current.round, self._interval_ms, f"round {round_number} is over"
                )
            return BeatReply(Directive.CONTINUE, run.current_round, self._interval_ms, self.notice())

    def await_round(
        self, site_id: str, after_round: int, wait_s: float, gone: Callable[[], bool] | None = None
    ) -> RoundView:
        """The round after ``after_round`` once it takes this site's upload, or the view at ``wait_s``.

        ``gone`` says the caller went away: the wait ends within ``EVICTION_CHECK_S`` instead of
        holding its RPC thread (and its fair-share slot) for the rest of ``wait_s``.
        """
        deadline = time.monotonic() + max(0.0, min(wait_s, MAX_AWAIT_S))
        state = self._state
        with state.lock:
            while True:
                site = state.joined_site(site_id)
                refuse_evicted(site)  # evicted while it waited, too
                view = self.round_view(site)
                if view.finished or (
                    view.round > after_round and view.state.accepts_uploads and view.assignment.trains
                ):
                    return view
                remaining = deadline - time.monotonic()
                if remaining <= 0 or state.stopping.is_set() or (gone is not None and gone()):
                    return view
                state.changed.wait(min(remaining, EVICTION_CHECK_S))

    def refuse_if_evicted(self, site_id: str) -> None:
        """PERMISSION_DENIED naming the site if an operator evicted it; a site never joined passes."""
        with self._state.lock:
            site = self._state.store.get(SiteRecord, site_id)
        if site is not None:
            refuse_evicted(site)

    def round_view(self, site: SiteRecord | None = None) -> RoundView:
        """The current round as ``site`` sees it (caller holds the lock)."""
        state = self._state
        current = state.current_round()
        assignment = state.assignment(current.round, site) if current and site else Assignment()
        return RoundView(
            run_id=state.run.run_id,
            round=current.round if current else 0,
            state=current.state if current else RoundState.PUBLISHED,
            deadline_ms=current.deadline_ms if current else 0,
            policy=state.policy(),
            finished=state.run.finished,
            base_round=state.latest_published().round,
            assignment=assignment,
        )

    def check_liveness(self) -> None:
        """Mark the sites silent past their allowance and drop them from the open round (caller holds the lock)."""
        state = self._state
        limit = int(self._config.heartbeat_interval_s * self._config.missed_beats * 1000)
        now = state.now_ms()
        current = state.current_round()
        round_number = current.round if current else 0
        for site in state.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),)):
            if now - max(site.last_beat_ms, self._live_since_ms) <= limit:
                continue
            site.state = SiteState.SILENT
            dropped = False
            with state.store.transaction():
                state.store.put(site)
                if current is not None and current.state.accepts_uploads:
                    part = state.store.get(ParticipantRecord, current.round, site.site_id)
                    if part is not None and not part.dropped:
                        part.dropped = dropped = True
                        state.store.put(part)
            logger.warning(
                "[site] site=%s silent for %d ms (allowance %d ms)%s",
                site.site_id,
                now - site.last_beat_ms,
                limit,
                f": dropped from round {round_number}" if dropped else "",
            )
            state.emit("site_dropped", round_number=round_number, site_id=site.site_id)
