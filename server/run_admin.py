"""Administering the run, on the aggregator: what the Admin service reads and changes.

Reads: the run's status (with why it waits, if it does), its rounds (a round
not yet published with its values so far), one round's participants and
uploads, the sites. Changes: pause, resume, close the open round now, evict a
site, set the round settings. A setting no site could ever meet (more sites
than the config has tokens for, less the evicted) is refused; one the sites
alive now cannot meet is taken with a warning, returned to the operator.
(The operator's side of these calls is the command line: ``admin_cli.py``
for ``gdfed status``, ``admin_control.py`` for ``gdfed admin``.)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace
from typing import Protocol

from common.delta import TrainingStats
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from server import rounds
from server.config import RoundPolicy
from server.records import (
    ParticipantRecord,
    RoundRecord,
    RunRecord,
    SiteRecord,
    SiteState,
    UploadRecord,
    UploadState,
    training_of,
)
from server.run_state import RunState
from server.tree_view import IntermediateView, intermediates_view

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StatusView:
    """The run at one instant, as GetStatus reports it."""

    run: RunRecord
    current: RoundRecord | None
    sites_alive: int
    sites_known: int
    policy: RoundPolicy
    total_rounds: int
    full_model_bytes: int
    waiting_reason: str = ""  # why the run does not move now ("" = it does)
    intermediates: tuple[IntermediateView, ...] = ()  # the root of a tree: its [tree] intermediates


@dataclass(frozen=True, slots=True)
class SiteInRound:
    """One site's part in one round: its upload if it sent one, else what it declared."""

    site_id: str
    sample_count: int
    bytes_in: int
    accepted: bool
    dropped: bool
    train_loss: float
    eval_loss: float
    upload_seconds: float
    norm: float = 0.0  # bounded influence (server.influence), once the round is published
    clip_scale: float = 0.0
    outlier: bool = False
    training: TrainingStats = dataclasses.field(default_factory=TrainingStats)  # as its upload said (0: none)
    sites: int = 0  # its upload is an intermediate's partial sum of this many sites' uploads (0: its own)


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round as GetRound and ListRounds report it."""

    record: RoundRecord
    ratio_to_full_model: float  # mean accepted upload over the fp32 trainable state; 0 before any
    sites: tuple[SiteInRound, ...]


class RoundControl(Protocol):
    """What the Admin service asks of the round loop (``server.round_loop.RoundLoop``)."""

    def open_next_round(self) -> None: ...
    def request_close(self) -> None: ...
    def retry(self, round_number: int) -> int: ...
    def tick(self) -> None: ...
    def waiting(self) -> rounds.Waiting: ...


class UploadCanceller(Protocol):
    """What eviction asks of the intake (``server.intake.Intake``)."""

    def cancel_site(self, site_id: str, reason: str) -> None: ...


class RunAdmin:
    """The operator's reads and changes of the run.

    Given the run's ``state``; ``rounds``, the round loop (it opens and closes rounds);
    ``intake``, to stop an evicted site's uploads; the ``full_model_bytes`` of the fp32
    trainable state (compression ratios are against it), the ``total_rounds`` the run is
    configured for (0: until stopped) and ``configured_sites``, how many site tokens the config
    holds (no more sites can ever join); ``intermediates``, the sites a root's ``[tree]`` names.
    """

    def __init__(
        self,
        *,
        state: RunState,
        rounds: RoundControl,
        intake: UploadCanceller,
        full_model_bytes: int,
        total_rounds: int,
        configured_sites: int,
        intermediates: tuple[str, ...] = (),
    ) -> None:
        self._state = state
        self._rounds = rounds
        self._store = state.store
        self._lock = state.lock
        self._changed = state.changed
        self._intake = intake
        self._emit = state.emit
        self._full_model_bytes = full_model_bytes
        self._total_rounds = total_rounds
        self._configured_sites = configured_sites
        self._intermediates = intermediates

    def status(self) -> StatusView:
        with self._lock:
            sites = self._store.select(SiteRecord)
            return StatusView(
                run=replace(self._state.run),
                current=self._state.current_round(),
                sites_alive=sum(s.state is SiteState.ALIVE for s in sites),
                sites_known=len(sites),
                policy=self._state.policy(),
                total_rounds=self._total_rounds,
                full_model_bytes=self._full_model_bytes,
                waiting_reason=self._rounds.waiting().line(self._state.now_ms()),
                intermediates=intermediates_view(self._store, self._intermediates),
            )

    def rounds_page(self, limit: int, before: int) -> list[RoundReport]:
        with self._lock:
            if before:
                rows = self._store.select(
                    RoundRecord, "round < ? AND round > 0", (before,), order="round DESC"
                )
            else:
                rows = self._store.select(RoundRecord, "round > 0", order="round DESC")
            return [self._report(r) for r in rows[:limit]]

    def round_report(self, round_number: int) -> RoundReport:
        with self._lock:
            record = self._store.get(RoundRecord, round_number)
            if record is None:
                raise NotFound(f"round {round_number} does not exist", field="round")
            return self._report(record)

    def _report(self, record: RoundRecord) -> RoundReport:
        participants = self._state.participants(record.round)
        uploads = self._store.select(UploadRecord, "round = ?", (record.round,))
        if not record.state.is_final:
            record = _so_far(record, [u for u in uploads if u.state is UploadState.ACCEPTED])
        return RoundReport(
            record=record,
            ratio_to_full_model=_mean_ratio(uploads, self._full_model_bytes),
            sites=_sites_in_round(participants, uploads),
        )

    def sites(self) -> list[SiteRecord]:
        with self._lock:
            return self._store.select(SiteRecord)

    def pause(self, reason: str) -> None:
        with self._lock:
            run = self._state.run
            run.paused = True
            run.pause_reason = reason
            self._store.put(run)
            logger.info("[admin] paused: %s", reason or "(no reason)")
            self._emit("paused", round_number=run.current_round, detail=reason)

    def resume(self, reason: str) -> None:
        with self._lock:
            run = self._state.run
            run.paused = False
            run.pause_reason = ""
            self._store.put(run)
            logger.info("[admin] resumed: %s", reason or "(no reason)")
            self._emit("resumed", round_number=run.current_round, detail=reason)
            current = self._state.current_round()
            if current is None or current.state.is_final:
                self._rounds.open_next_round()
            self._changed.notify_all()

    def close_round(self, reason: str) -> None:
        with self._lock:
            current = self._state.current_round()
            if current is None or not current.state.accepts_uploads:
                raise FailedPrecondition(
                    f"no round is open: {self._between_rounds(current)}",
                    field="round",
                    reason="NO_OPEN_ROUND",
                )
            logger.info("[admin] round=%d close requested: %s", current.round, reason or "(no reason)")
            self._rounds.request_close()
        self._rounds.tick()

    def retry_round(self, round_number: int, reason: str) -> list[str]:
        """Aggregate a failed round again from its accepted uploads (``Closing.retry``): the
        latest round only, with its uploads' spools still there."""
        if round_number <= 0:
            raise InvalidArgument(f"round is {round_number}; must be >= 1", field="round")
        with self._lock:
            uploads = self._rounds.retry(round_number)
            logger.info(
                "[admin] round=%d retry requested (%d upload(s)): %s",
                round_number,
                uploads,
                reason or "(no reason)",
            )
        return []

    def _between_rounds(self, current: RoundRecord | None) -> str:
        """Where the run stands when no round is open, and when the next one opens."""
        run = self._state.run
        where = f"round {current.round} is {current.state.name.lower()}; " if current else ""
        if run.finished:
            return f"{where}the run is finished"
        if current is not None and not current.state.is_final:  # aggregating
            then = " and the run is resumed" if run.paused else ""
            return f"{where}round {current.round + 1} opens once it is published{then}"
        waiting = self._rounds.waiting().line(self._state.now_ms())
        return where + (waiting or f"round {run.current_round + 1} opens at the next tick")

    def evict(self, site_id: str, reason: str) -> None:
        with self._lock:
            site = self._store.get(SiteRecord, site_id)
            if site is None:
                raise NotFound(f"site {site_id!r} is not known", field="site_id")
            site.state = SiteState.EVICTED
            current = self._state.current_round()
            with self._store.transaction():
                self._store.put(site)
                if current is not None:
                    part = self._store.get(ParticipantRecord, current.round, site_id)
                    if part is not None:
                        part.dropped = True
                        self._store.put(part)
            self._intake.cancel_site(site_id, "the site was evicted")
            logger.warning("[admin] site=%s evicted: %s", site_id, reason or "(no reason)")
            self._emit(
                "site_evicted", round_number=self._state.run.current_round, site_id=site_id, detail=reason
            )

    def set_policy(
        self,
        *,
        min_sites: int | None,
        min_sample_fraction: float | None,
        deadline_s: int | None,
        min_sites_to_open: int | None = None,
    ) -> list[str]:
        """Change the settings given (None: unchanged) from the next tick on; the warnings for those
        the sites alive now cannot meet. A setting no site could ever meet is refused
        (FailedPrecondition naming it), and a refused request changes nothing."""
        for field, value in (
            ("quorum.min_sites", min_sites),
            ("round_deadline_s", deadline_s),
            ("min_sites_to_open", min_sites_to_open),
        ):
            if value is not None and value < 0:
                raise InvalidArgument(f"{field} is {value}; must be >= 0", field=field)
        if min_sample_fraction is not None and not 0.0 <= min_sample_fraction <= 1.0:
            raise InvalidArgument(
                f"min_sample_fraction is {min_sample_fraction}; must be 0..1", field="min_sample_fraction"
            )
        with self._lock:
            run = self._state.run
            current = self._state.current_round()
            is_open = current is not None and current.state.accepts_uploads
            deadline = run.round_deadline_s if deadline_s is None else deadline_s
            warnings = []
            if min_sites is not None:
                then = (
                    "otherwise it fails at its deadline"
                    if deadline
                    else "with no deadline it waits until then"
                )
                warnings += self._check_sites(
                    "quorum.min_sites",
                    min_sites,
                    f"a round closes only once {min_sites} uploads are accepted; {then}",
                )
            if min_sites_to_open is not None:
                between = current is None or current.state.is_final
                which = f"round {run.current_round + 1}" if between else "the next round"
                warnings += self._check_sites(
                    "min_sites_to_open",
                    min_sites_to_open,
                    f"{which} opens once {min_sites_to_open} are alive",
                )
            if min_sites is not None:
                run.min_sites = min_sites
            if min_sample_fraction is not None:
                run.min_sample_fraction = min_sample_fraction
            if min_sites_to_open is not None:
                run.min_sites_to_open = min_sites_to_open
            with self._store.transaction():
                if deadline_s is not None:
                    run.round_deadline_s = deadline_s
                    if current is not None and is_open:
                        current.deadline_ms = current.opened_ms + deadline_s * 1000 if deadline_s else 0
                        self._store.put(current)
                        if deadline_s and current.deadline_ms <= self._state.now_ms():
                            warnings.append(
                                f"round {current.round} opened more than {deadline_s} s ago: it closes "
                                "(or fails, short of its quorum) at the next tick"
                            )
                self._store.put(run)
            policy = rounds.describe(self._state.policy())
            logger.info("[admin] policy now %s", policy)
            for warning in warnings:
                logger.warning("[admin] policy: %s", warning)
            self._emit("policy_changed", round_number=run.current_round, detail=policy)
            if current is None or current.state.is_final:
                self._rounds.open_next_round()  # min_sites_to_open may hold now
            self._state.wake()  # the quorum may hold now, or the deadline have passed
            self._changed.notify_all()
            return warnings

    def _check_sites(self, field: str, value: int, consequence: str) -> list[str]:
        """Refuse ``value`` sites for ``field`` if no site could ever make it; warn if the sites
        alive now cannot (caller holds the lock)."""
        sites = self._store.select(SiteRecord)
        evicted = sum(s.state is SiteState.EVICTED for s in sites)
        alive = sum(s.state is SiteState.ALIVE for s in sites)
        possible = max(0, self._configured_sites - evicted)
        counts = (
            f"{self._configured_sites} site token(s) in the config, {len(sites)} joined, "
            f"{alive} alive, {evicted} evicted"
        )
        if value > possible:
            raise FailedPrecondition(
                f"{field} is {value} but at most {possible} site(s) can ever take part ({counts})",
                field=field,
                limit=possible,
            )
        if value > alive:
            return [f"{field} is {value} but {alive} site(s) are alive now ({counts}): {consequence}"]
        return []


def _so_far(record: RoundRecord, accepted: list[UploadRecord]) -> RoundRecord:
    """A round not yet published, with the samples and losses of the uploads it has accepted so far."""
    samples = sum(u.sample_count for u in accepted)
    if not samples:
        return replace(record, samples=0)
    return replace(
        record,
        samples=samples,
        mean_train_loss=sum(u.train_loss * u.sample_count for u in accepted) / samples,
        mean_eval_loss=sum(u.eval_loss * u.sample_count for u in accepted) / samples,
    )


def _mean_ratio(uploads: list[UploadRecord], full_model_bytes: int) -> float:
    accepted = [u for u in uploads if u.state is UploadState.ACCEPTED]
    if not accepted or not full_model_bytes:
        return 0.0
    return sum(u.total_bytes for u in accepted) / len(accepted) / full_model_bytes


def _sites_in_round(
    participants: list[ParticipantRecord], uploads: list[UploadRecord]
) -> tuple[SiteInRound, ...]:
    """One row per site that took part or uploaded: its accepted upload, else its latest attempt."""
    by_site = {u.site_id: u for u in uploads if u.state is UploadState.ACCEPTED}
    by_site |= {u.site_id: u for u in uploads if u.site_id not in by_site}
    parts = {p.site_id: p for p in participants}
    rows = []
    for site_id in sorted(set(parts) | set(by_site)):
        part, upload = parts.get(site_id), by_site.get(site_id)
        accepted = upload is not None and upload.state is UploadState.ACCEPTED
        rows.append(
            SiteInRound(
                site_id=site_id,
                sample_count=upload.sample_count if upload else (part.num_samples if part else 0),
                bytes_in=upload.total_bytes if upload and accepted else 0,
                accepted=accepted,
                dropped=bool(part and part.dropped),
                train_loss=upload.train_loss if upload else 0.0,
                eval_loss=upload.eval_loss if upload else 0.0,
                upload_seconds=upload.upload_seconds if upload else 0.0,
                norm=upload.norm if upload and accepted else 0.0,
                clip_scale=upload.clip_scale if upload and accepted and upload.norm > 0 else 0.0,
                outlier=bool(upload and accepted and upload.outlier),
                training=training_of(upload) if upload else TrainingStats(),
                sites=upload.sites if upload else 0,
            )
        )
    return tuple(rows)
