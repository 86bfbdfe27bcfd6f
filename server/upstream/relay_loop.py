"""The round loop of an intermediate aggregator: the parent's rounds, run for this aggregator's sites.

    follower thread (gdfed-upstream), one pass at a time:
      join the parent (again when the sites' samples change), heartbeat it from then on
      AwaitRound at the parent                      -> the parent's round r: state, deadline, spec
      a round closed here (AGGREGATING)?            -> forward its partial sum (server.upstream.forward)
                                                       refused (the parent closed r first) -> FAILED
      the parent published rounds not held here?   -> adopt them (server.upstream.adopt)
      the parent's r failed / closed without us?    -> FAILED here, the reason named
      the parent's r takes uploads, none open here? -> open r here, due by the parent's deadline
                                                       minus the forwarding margin
      the parent's run finished?                    -> finished here once its last round is held
    tick thread (RoundLoop's): liveness, and each open round's close by this aggregator's own
      [round] quorum and its deadline (rounds.decide), exactly as any aggregator's

Nothing opens a round here but the parent: ``open_next_round`` does nothing,
and ``aggregate`` (what a flat aggregator does at a close) is the
follower's forward. The parent being away costs waits (the link's retries,
then this loop's backoff, each logged), never a round that was not lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import grpc

from common.errors import FailedPrecondition
from common.spec import Phase
from server import rounds
from server.blobs import BlobStore
from server.closing import Closing
from server.config import ServerConfig
from server.membership import Membership
from server.records import RoundRecord, RoundState, SiteRecord, SiteState
from server.round_loop import RoundLoop
from server.run_state import RunState
from server.spool import Spool
from server.upstream.adopt import Adopter
from server.upstream.forward import Forwarded, Forwarder, ForwardRecord, Ledger
from server.upstream.link import ParentBeats, ParentRound, UpstreamLink, said
from server.upstream.settings import DEFAULT_MARGIN_FRACTION, method_refusal

logger = logging.getLogger(__name__)

BUSY_POLL_S = 1.0  # the parent's state is looked at this often while a round is under way here
IDLE_POLL_S = 5.0  # between rounds (AwaitRound answers at once when the parent's next one opens)
MIN_PASS_S = 0.2  # a pass that found nothing to wait on waits this long before the next
MAX_BACKOFF_S = 30.0


class RelayLoop(RoundLoop):
    """An intermediate's rounds (see the module docstring); RoundLoop's tick closes them."""

    def __init__(
        self,
        *,
        state: RunState,
        membership: Membership,
        closing: Closing,
        config: ServerConfig,
        adopter: Adopter,
        forwarder: Forwarder,
    ) -> None:
        super().__init__(state=state, membership=membership, closing=closing, config=config)
        self._settings = config.upstream
        self._spec = config.training
        self._adopter = adopter
        self._forwarder = forwarder
        self._link = UpstreamLink(self._settings, state.stopping)
        self._beats = ParentBeats(self._link, self._beat_now, state.stopping)
        self._follower: threading.Thread | None = None
        self._declared = -1  # the samples the last Join at the parent declared (-1: not joined)
        self._phase: Phase | None = None  # what the follower does now, for the beats
        self._parent_deadline: dict[int, int] = {}  # round -> the parent's deadline, as seen at opening
        self._notice = ""
        self._forwarded: dict[int, str] = {}  # round -> its partial sum's Forwarded value, for waiting()
        self._spec_warned = False
        self.parent: ParentRound | None = None  # the parent's round as last seen
        membership.notice = self.notice

    # ------------------------------------------------------------ RoundLoop's hooks
    def start(self) -> None:
        super().start()
        self._follower = threading.Thread(target=self._follow, name="gdfed-upstream", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        super().stop()
        self._link.close()  # ends a call to the parent in flight
        if self._follower is not None:
            self._follower.join(timeout=15)
        self._beats.join()

    def open_next_round(self) -> None:
        """Rounds open here when the parent's do (the follower); never on this aggregator's own."""

    def aggregate(self, round_number: int) -> None:
        """A round closed here is forwarded by the follower at its next pass."""

    def retry(self, round_number: int) -> int:
        raise FailedPrecondition(
            f"round {round_number}: an intermediate's rounds are its parent's, which aggregates them; "
            f"retry-round applies at the parent ({self._settings.address})",
            field="round",
        )

    def notice(self) -> str:
        """What this aggregator's sites' beats are told: the latest round whose uploads were lost upstream."""
        return self._notice

    def waiting(self) -> rounds.Waiting:
        state = self._state
        current = state.current_round()
        if state.run.finished or state.run.paused or (current is not None and current.state.accepts_uploads):
            return super().waiting()
        parent = self.parent
        where = f"the parent at {self._settings.address}"
        if current is not None and current.state is RoundState.AGGREGATING:
            said = self._forwarded.get(current.round, "being formed")
            return rounds.Waiting(
                "", f"round {current.round} closed here; its partial sum is {said} at {where}"
            )
        if parent is None:
            return rounds.Waiting("", f"waiting for {where}")
        if parent.accepts and parent.round > state.run.current_round:
            alive = len(state.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),)))
            short = rounds.waiting_to_open(
                next_round=parent.round, alive=alive, min_sites_to_open=state.run.min_sites_to_open
            )
            if short.kind:
                return short
        return rounds.Waiting(
            "",
            f"waiting for the next round of {where} (its round {parent.round} is {parent.state.name.lower()})",
        )

    # ------------------------------------------------------------ the follower
    def _follow(self) -> None:
        stopping = self._state.stopping
        backoff = 1.0
        while not stopping.is_set():
            started = time.monotonic()
            try:
                rest = self._pass()
                backoff = 1.0
            except grpc.RpcError as exc:
                if stopping.is_set():
                    return
                logger.warning(
                    "[upstream] the parent at %s: %s; trying again in %.0fs",
                    self._settings.address,
                    said(exc),
                    backoff,
                )
                stopping.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            except Exception:
                if stopping.is_set():
                    return  # the link was closed under a call
                logger.exception("[upstream] following the parent failed; trying again in %.0fs", backoff)
                stopping.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            spent = time.monotonic() - started
            if spent < rest:
                stopping.wait(rest - spent)

    def _pass(self) -> float:
        """One look at the parent, and whatever it asks of this aggregator (see the module docstring);
        how long the next pass may wait at the least (AwaitRound answers at once while the parent
        has a round this aggregator does not open: paused here, too few sites, the run over)."""
        self._join_if_due()
        state = self._state
        with state.lock:
            current = state.current_round()
            busy = current is not None and not current.state.is_final
            after = state.run.current_round
        parent = self._link.await_round(after=after, wait_s=BUSY_POLL_S if busy else IDLE_POLL_S)
        self.parent = parent
        if parent.run_id != state.run.run_id:
            self._wrong_run(parent)
            return IDLE_POLL_S
        self._forward(parent)
        self._settle(parent)
        self._adopt(parent)
        self._open(parent)
        self._finish(parent)
        with state.lock:
            if state.run.finished:
                return IDLE_POLL_S
            behind = parent.accepts and parent.round > state.run.current_round
        return BUSY_POLL_S if behind else MIN_PASS_S

    def _join_if_due(self) -> None:
        state = self._state
        with state.lock:
            samples = sum(
                s.num_samples for s in state.store.select(SiteRecord, "state != ?", (int(SiteState.EVICTED),))
            )
            held = state.latest_published().round
        if samples == self._declared and not self._beats.rejoin.is_set():
            return
        joined = self._link.join(num_samples=samples, held_round=held)
        self._beats.rejoin.clear()
        if self._declared < 0:
            logger.info(
                "[upstream] joined the parent at %s as %s (run %s, its round %d)",
                self._settings.address,
                self._link.site_id,
                joined.run_id,
                joined.current.round,
            )
        self._declared = samples
        self._beats.start(joined.heartbeat_interval_s)

    def _beat_now(self) -> tuple[int, Phase]:
        state = self._state
        if self._phase is not None:
            return state.run.current_round, self._phase
        with state.lock:
            current = state.current_round()
        training = current is not None and current.state.accepts_uploads
        return state.run.current_round, Phase.TRAINING if training else Phase.IDLE

    # ------------------------------------------------------------ forward
    def _forward(self, parent: ParentRound) -> None:
        """Send the partial sum of the round closed here, if there is one not yet settled."""
        state = self._state
        with state.lock:
            current = state.current_round()
        if current is None or current.state is not RoundState.AGGREGATING:
            return
        number = current.round
        record = self._forwarder.prepare(number, self._link.site_id)
        if record is None:
            self._fail(number, "no accepted uploads when the round closed here", "no_uploads")
            return
        self._forwarded[number] = record.status.value
        if record.status is Forwarded.READY:
            self._phase = Phase.UPLOADING
            try:
                record = self._forwarder.send(record, self._link)
            finally:
                self._phase = None
            self._forwarded[number] = record.status.value
        if record.status is Forwarded.REFUSED:
            self._fail(number, self._lost(record, parent), "deadline")

    def _lost(self, record: ForwardRecord, parent: ParentRound) -> str:
        """Why a refused partial sum's round is lost, the parent's deadline named where it is known."""
        number = record.round
        deadline = self._parent_deadline.get(number) or (parent.deadline_ms if parent.round == number else 0)
        when = f" (its deadline {_utc(deadline)})" if deadline else ""
        return (
            f"the parent at {self._settings.address} closed round {number}{when} before this aggregator's "
            f"partial sum arrived: the {record.header.sites} upload(s) of its sites ({record.header.sample_count} "
            f"samples) are not in the round. The parent said: {record.reason}"
        )

    def _fail(self, number: int, reason: str, kind: str) -> None:
        """Round ``number`` FAILED here, if it is not over yet; its sites are told why in their beats."""
        state = self._state
        with state.lock:
            record = state.store.get(RoundRecord, number)
            if record is None or record.state.is_final:
                return
            self._closing.fail(record, reason, kind=kind)
            self._notice = f"round {number}: {reason}"
        self._forwarder.ledger.settle(number)

    # ------------------------------------------------------------ the parent moved on
    def _settle(self, parent: ParentRound) -> None:
        """Fail the round under way here if the parent no longer takes (or will not publish) it."""
        state = self._state
        with state.lock:
            current = state.current_round()
        if current is None or current.state.is_final:
            return
        number = current.round
        past = parent.round > number or (parent.round == number and not parent.state.accepts_uploads)
        if not past:
            return
        if current.state.accepts_uploads:
            deadline = self._parent_deadline.get(number, 0)
            when = f" (its deadline {_utc(deadline)})" if deadline else ""
            self._fail(
                number,
                f"the parent at {self._settings.address} closed round {number}{when} before this aggregator's "
                "own round closed: its sites' uploads are not in the round",
                "deadline",
            )
            return
        record = self._forwarder.ledger.get(number)
        forwarded = record is not None and record.status is Forwarded.ACCEPTED
        failed_there = parent.base_round < number and (
            parent.round > number or parent.state is RoundState.FAILED
        )
        if forwarded and failed_there:
            self._fail(
                number,
                f"the parent's round {number} failed (its latest published round is {parent.base_round})",
                "other",
            )

    def _adopt(self, parent: ParentRound) -> None:
        """Publish here every round the parent published that this aggregator does not hold yet."""
        state = self._state
        with state.lock:
            held = state.latest_published().round
        if parent.base_round <= held:
            return
        self._phase = Phase.SYNCING
        try:
            self._adopter.catch_up(self._link, before=self._before_adopting, after=self._after_adopting)
        finally:
            self._phase = None

    def _before_adopting(self, number: int) -> None:
        """A round the parent published while it is still under way here: its part here is lost."""
        state = self._state
        with state.lock:
            record = state.store.get(RoundRecord, number)
        if record is None or record.state.is_final:
            return
        forward = self._forwarder.ledger.get(number)
        if forward is not None and forward.status is Forwarded.ACCEPTED:
            return
        self._fail(
            number,
            f"the parent at {self._settings.address} published round {number} without this aggregator's "
            "partial sum (it closed the round first): its sites' uploads are not in it",
            "deadline",
        )

    def _after_adopting(self, number: int) -> None:
        self._forwarder.ledger.settle(number)
        record = self._forwarder.ledger.get(number)
        if record is not None and record.status is Forwarded.ACCEPTED:
            self._notice = ""  # this subtree's part is in the latest round again

    # ------------------------------------------------------------ open, finish
    def _open(self, parent: ParentRound) -> None:
        """Open the parent's round here when it takes uploads and none is under way here."""
        if not parent.accepts:
            return
        state = self._state
        with state.lock:
            run = state.run
            current = state.current_round()
            if run.finished or run.paused:
                return
            if current is not None and (current.round >= parent.round or not current.state.is_final):
                return
            if state.latest_published().round != parent.base_round:
                return  # its base is adopted first (the next pass)
            self._check_spec(parent)
            refusal = method_refusal(parent.training.method)
            if refusal:
                self._refuse(parent, refusal)
                return
            alive = state.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),))
            if len(alive) < run.min_sites_to_open:
                return  # the tick's waiting line says so
            deadline = self._deadline(parent)
            self._parent_deadline[parent.round] = parent.deadline_ms
            self.open_round(parent.round, deadline)

    def _deadline(self, parent: ParentRound) -> int:
        """This aggregator's deadline for the parent's round: its own [round] deadline, and the
        parent's less the margin its partial sum needs to arrive (0: none)."""
        state = self._state
        now = state.now_ms()
        own = now + state.run.round_deadline_s * 1000 if state.run.round_deadline_s else 0
        if not parent.deadline_ms:
            return own
        left = max(0, parent.deadline_ms - now)
        margin = self._settings.forward_margin_s * 1000 or left * DEFAULT_MARGIN_FRACTION
        upstream = int(parent.deadline_ms - margin)
        return min(own, upstream) if own else upstream

    def _check_spec(self, parent: ParentRound) -> None:
        if parent.training != self._spec and not self._spec_warned:
            self._spec_warned = True
            logger.warning(
                "[upstream] the parent's training spec changed since this aggregator started; its sites "
                "are served the one it started with until it is restarted"
            )

    def _refuse(self, parent: ParentRound, refusal: str) -> None:
        """Round ``parent.round`` FAILED here without opening it: the parent runs what a tree cannot."""
        state = self._state
        now = state.now_ms()
        reason = f"refused: the parent's round {parent.round} asks for what a tree cannot run: {refusal}"
        record = RoundRecord(
            round=parent.round, state=RoundState.FAILED, opened_ms=now, closed_ms=now, failure_reason=reason
        )
        with state.store.transaction():
            state.run.current_round = parent.round
            state.store.put(state.run)
            state.store.put(record)
        logger.error("[upstream] round=%d %s", parent.round, reason)
        self._notice = f"round {parent.round}: {reason}"
        state.observe("round_failed", 1, "other")
        state.emit("round_failed", round_number=parent.round, state=RoundState.FAILED, detail=reason)
        state.changed.notify_all()

    def _finish(self, parent: ParentRound) -> None:
        state = self._state
        with state.lock:
            run = state.run
            if not parent.finished or run.finished or state.latest_published().round < parent.base_round:
                return
            run.finished = True
            state.store.put(run)
            logger.info("[run] run=%s finished at the parent after round %d", run.run_id, parent.base_round)
            state.emit("run_finished", round_number=parent.base_round)
            state.changed.notify_all()

    def _wrong_run(self, parent: ParentRound) -> None:
        state = self._state
        reason = (
            f"the parent at {self._settings.address} runs {parent.run_id!r}, not this aggregator's run "
            f"{state.run.run_id!r}: start this intermediate in a new state directory to join it"
        )
        with state.lock:
            if state.run.paused and state.run.pause_reason == reason:
                return
            state.run.paused, state.run.pause_reason = True, reason
            state.store.put(state.run)
        logger.error("[upstream] %s; paused", reason)


def _utc(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def relay_loop(
    *,
    state: RunState,
    membership: Membership,
    closing: Closing,
    config: ServerConfig,
    blobs: BlobStore,
    spool: Spool,
    snapshot_estimate: Callable[[RoundRecord], int],
) -> RelayLoop:
    """An intermediate's loop with its adopter and forwarder (what the Coordinator wires)."""
    adopter = Adopter(
        state=state,
        blobs=blobs,
        spool=spool,
        snapshot_estimate=snapshot_estimate,
        keep_states=config.keep_states,
    )
    forwarder = Forwarder(
        state=state,
        closing=closing,
        spool=spool,
        ledger=Ledger(config.state_dir / "upstream"),
        precision=config.accumulator,
    )
    return RelayLoop(
        state=state,
        membership=membership,
        closing=closing,
        config=config,
        adopter=adopter,
        forwarder=forwarder,
    )
