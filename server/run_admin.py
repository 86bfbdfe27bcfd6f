"""Administering the run, on the aggregator: what the Admin service reads and changes.

Reads: the run's status, its rounds, one round's participants and uploads,
the sites. Changes: pause, resume, close the open round now, evict a site,
set the quorum and deadline. (The operator's side of these calls is the
command line: ``admin_cli.py`` for ``gdfed status``, ``admin_control.py`` for
``gdfed admin``.)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from common.errors import FailedPrecondition, InvalidArgument, NotFound
from server.config import RoundPolicy
from server.intake import Intake
from server.records import (
    ParticipantRecord,
    RoundRecord,
    RunRecord,
    SiteRecord,
    SiteState,
    UploadRecord,
)
from server.store import Store

if TYPE_CHECKING:
    from server.coordinator import Coordinator, Emit

# Under the coordinator's logger name, which these lines had before they moved here: the daemon's log
# format prints the name, and log filters and level settings key on it.
logger = logging.getLogger("server.coordinator")


@dataclass(frozen=True, slots=True)
class StatusView:
    run: RunRecord
    current: RoundRecord | None
    sites_alive: int
    sites_known: int
    policy: RoundPolicy


class RunAdmin:
    """The operator's reads and changes of the run.

    Given ``rounds``, the round state machine (the run record, the current round, the
    policy; it opens and closes rounds); the run's ``store``; the coordinator's ``lock``
    and its condition ``changed``, notified when a resume may have opened a round;
    ``intake``, to stop an evicted site's uploads; and ``emit`` for events.
    """

    def __init__(
        self,
        *,
        rounds: Coordinator,
        store: Store,
        lock: threading.RLock,
        changed: threading.Condition,
        intake: Intake,
        emit: Emit,
    ) -> None:
        self._rounds = rounds
        self._store = store
        self._lock = lock
        self._changed = changed
        self._intake = intake
        self._emit = emit

    def status(self) -> StatusView:
        with self._lock:
            sites = self._store.select(SiteRecord)
            return StatusView(
                run=replace(self._rounds.run),
                current=self._rounds.current_round(),
                sites_alive=sum(s.state is SiteState.ALIVE for s in sites),
                sites_known=len(sites),
                policy=self._rounds.policy(),
            )

    def rounds_page(self, limit: int, before: int) -> list[RoundRecord]:
        with self._lock:
            if before:
                rows = self._store.select(
                    RoundRecord, "round < ? AND round > 0", (before,), order="round DESC"
                )
            else:
                rows = self._store.select(RoundRecord, "round > 0", order="round DESC")
            return rows[:limit]

    def round_detail(
        self, round_number: int
    ) -> tuple[RoundRecord, list[ParticipantRecord], list[UploadRecord]]:
        with self._lock:
            record = self._store.get(RoundRecord, round_number)
            if record is None:
                raise NotFound(f"round {round_number} does not exist", field="round")
            uploads = self._store.select(UploadRecord, "round = ?", (round_number,))
            return record, self._rounds.participants(round_number), uploads

    def sites(self) -> list[SiteRecord]:
        with self._lock:
            return self._store.select(SiteRecord)

    def pause(self, reason: str) -> None:
        with self._lock:
            run = self._rounds.run
            run.paused = True
            self._store.put(run)
            logger.info("[admin] paused: %s", reason or "(no reason)")
            self._emit("paused", round_number=run.current_round, detail=reason)

    def resume(self, reason: str) -> None:
        with self._lock:
            run = self._rounds.run
            run.paused = False
            self._store.put(run)
            logger.info("[admin] resumed: %s", reason or "(no reason)")
            self._emit("resumed", round_number=run.current_round, detail=reason)
            current = self._rounds.current_round()
            if current is None or current.state.is_final:
                self._rounds.open_next_round()
            self._changed.notify_all()

    def close_round(self, reason: str) -> None:
        with self._lock:
            current = self._rounds.current_round()
            if current is None or not current.state.accepts_uploads:
                raise FailedPrecondition("no round is open", field="round")
            logger.info("[admin] round=%d close requested: %s", current.round, reason or "(no reason)")
            self._rounds.request_close()
        self._rounds.tick()

    def evict(self, site_id: str, reason: str) -> None:
        with self._lock:
            site = self._store.get(SiteRecord, site_id)
            if site is None:
                raise NotFound(f"site {site_id!r} is not known", field="site_id")
            site.state = SiteState.EVICTED
            current = self._rounds.current_round()
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
                "site_evicted", round_number=self._rounds.run.current_round, site_id=site_id, detail=reason
            )

    def set_policy(
        self, *, min_sites: int | None, min_sample_fraction: float | None, deadline_s: int | None
    ) -> None:
        # Validate everything before changing anything: a refused request leaves the policy as it was.
        if min_sample_fraction is not None and not 0.0 <= min_sample_fraction <= 1.0:
            raise InvalidArgument(
                f"min_sample_fraction is {min_sample_fraction}; must be 0..1", field="min_sample_fraction"
            )
        with self._lock:
            run = self._rounds.run
            if min_sites is not None:
                run.min_sites = min_sites
            if min_sample_fraction is not None:
                run.min_sample_fraction = min_sample_fraction
            current = self._rounds.current_round()
            with self._store.transaction():
                if deadline_s is not None:
                    run.round_deadline_s = deadline_s
                    if current is not None and current.state.accepts_uploads:
                        current.deadline_ms = current.opened_ms + deadline_s * 1000 if deadline_s else 0
                        self._store.put(current)
                self._store.put(run)
            logger.info("[admin] policy now %s", self._rounds.policy())
            self._emit("policy_changed", round_number=run.current_round, detail=str(self._rounds.policy()))
