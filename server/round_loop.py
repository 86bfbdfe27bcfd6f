"""The round loop: every tick, liveness, then the round's fate by ``rounds.decide``.

    tick:  drop silent sites
           no round open?      -> open the next one (unless paused, finished or short of sites)
           decide(policy, tally):
             fail              -> closing.fail, open the next round
             close             -> closing.close, closing.aggregate (outside the lock),
                                  open the next round
             neither           -> wait for the next tick
           aggregating?        -> try to publish it again once its backoff is over
                                  (outside the lock: heartbeats and admin calls go on meanwhile)

The loop thread ticks every ``tick_s`` and at once when ``RunState.wake`` is
called (an upload was accepted: the quorum may hold now). After each tick,
``waiting`` says why the run does not move (sites, pause, quorum, finished);
the log gets one line each time that reason changes.
"""

from __future__ import annotations

import logging
import threading

from server import rounds
from server.closing import Closing
from server.config import ServerConfig
from server.membership import Membership
from server.records import RoundRecord, RoundState, SiteRecord, SiteState
from server.run_state import RunState

logger = logging.getLogger(__name__)


class RoundLoop:
    """Opens, closes and fails rounds; runs on its own thread between ``start`` and ``stop``.

    Given the ``state``; ``membership``, for liveness and to give the alive sites their part in
    a new round; ``closing``, which ends rounds; and the ``config`` (tick period, sites needed to
    open a round).
    """

    def __init__(
        self, *, state: RunState, membership: Membership, closing: Closing, config: ServerConfig
    ) -> None:
        self._state = state
        self._membership = membership
        self._closing = closing
        self._config = config
        self._admin_close = False
        self._thread: threading.Thread | None = None
        self._logged_waiting = rounds.Waiting()

    # ------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gdfed-rounds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        state = self._state
        while True:
            state.wakeup.wait(self._config.tick_s)
            state.wakeup.clear()
            if state.stopping.is_set():
                return
            try:
                self.tick()
            except Exception:
                logger.exception("[round] tick failed; the loop goes on")

    def stop(self) -> None:
        """End the thread (``RunState.stopping`` is set by the caller) and wait for it."""
        self._state.wakeup.set()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------ one tick
    def tick(self) -> None:
        """One pass: liveness, then close, fail, publish or open as due; log a new waiting reason."""
        self._step()
        self._log_waiting()

    def _step(self) -> None:
        state = self._state
        with state.lock:
            self._membership.check_liveness()
            current = state.current_round()
            if current is None or current.state.is_final or state.run.finished:
                # Also between rounds: the next one may be waiting for min_sites_to_open sites.
                self.open_next_round()
                return
            retry = current.state is RoundState.AGGREGATING and self._closing.retry_due(current.round)
            if not current.state.accepts_uploads and not retry:
                return
        if retry:  # a publication that failed (or a retry-round): again, outside the lock
            self.aggregate(current.round)
            return
        with state.lock:
            current = state.current_round()
            if current is None or not current.state.accepts_uploads:
                return
            if state.run.paused and not self._admin_close:
                return
            decision = rounds.decide(state.policy(), self._tally(current), admin_close=self._admin_close)
            if decision.fail:
                self._closing.fail(current, decision.reason, kind=decision.kind)
                self.open_next_round()
                return
            if not decision.close:
                return
            self._closing.close(current, decision.reason)
        self.aggregate(current.round)

    def aggregate(self, round_number: int) -> None:
        """Try to publish (or fail) the closed round ``round_number``, then open the next one if it
        is done (a failed attempt leaves it AGGREGATING: the next rounds wait for it)."""
        self._closing.aggregate(round_number)
        with self._state.lock:
            self.open_next_round()
        self._state.wake()

    def retry(self, round_number: int) -> int:
        """Aggregate the failed latest round again from its kept uploads, at the next tick (caller
        holds the lock); the number of its uploads (``Closing.retry``)."""
        return self._closing.retry(round_number)

    def request_close(self) -> None:
        """Have the next tick close the open round, quorum or not, paused or not (caller holds the lock)."""
        self._admin_close = True

    def open_next_round(self) -> None:
        """Open the next round, unless one is open, the run is paused or finished, or too few sites
        are alive (caller holds the lock)."""
        state = self._state
        run = state.run
        current = state.current_round()
        if run.paused or run.finished or (current is not None and not current.state.is_final):
            return
        alive = state.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),))
        if len(alive) < run.min_sites_to_open:
            return
        now = state.now_ms()
        self.open_round(
            run.current_round + 1, now + run.round_deadline_s * 1000 if run.round_deadline_s else 0
        )

    def open_round(self, number: int, deadline_ms: int) -> None:
        """Open round ``number`` for the alive sites, due by ``deadline_ms`` (0: none; caller holds
        the lock). An intermediate's loop (server.upstream.relay_loop) opens its parent's rounds here."""
        state = self._state
        run = state.run
        alive = state.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),))
        now = state.now_ms()
        record = RoundRecord(round=number, state=RoundState.OPEN, opened_ms=now, deadline_ms=deadline_ms)
        with state.store.transaction():
            run.current_round = number
            state.store.put(run)
            state.store.put(record)
            for site in alive:
                self._membership.add_participant(site)
        state.acc = self._closing.start_sum(number)
        state.set_open_round(number)
        self._admin_close = False
        logger.info("[round] round=%d opened with %d site(s)", number, len(alive))
        state.emit("round_opened", round_number=number, state=RoundState.OPEN)
        state.changed.notify_all()

    def waiting(self) -> rounds.Waiting:
        """Why the run does not move now (caller holds the lock)."""
        state = self._state
        run = state.run
        current = state.current_round()
        if run.finished:
            return rounds.finished(run.current_round)
        is_open = current is not None and current.state.accepts_uploads
        if run.paused:
            return rounds.paused(
                run.pause_reason,
                open_round=run.current_round if is_open else 0,
                next_round=run.current_round + 1,
            )
        if current is None or current.state.is_final:
            alive = len(state.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),)))
            return rounds.waiting_to_open(
                next_round=run.current_round + 1, alive=alive, min_sites_to_open=run.min_sites_to_open
            )
        if is_open:
            return rounds.waiting_for_quorum(state.policy(), self._tally(current), current.round)
        return rounds.Waiting()  # aggregating

    def _log_waiting(self) -> None:
        with self._state.lock:  # also called by close-round's thread: one line per change
            waiting = self.waiting()
            if waiting == self._logged_waiting:  # the countdown is not in it: no line every tick
                return
            self._logged_waiting = waiting
            if waiting.text:
                logger.info("[round] waiting: %s", waiting.line(self._state.now_ms()))

    def _tally(self, record: RoundRecord) -> rounds.Tally:
        state = self._state
        accepted = state.accepted_records(record.round)
        live = [p for p in state.participants(record.round) if not p.dropped]
        return rounds.Tally(
            accepted=len(accepted),
            accepted_samples=sum(u.sample_count for u in accepted),
            alive_participants=len(live),
            expected_samples=sum(p.num_samples for p in live),
            now_ms=state.now_ms(),
            deadline_ms=record.deadline_ms,
        )
