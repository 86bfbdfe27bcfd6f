"""The run's shared state: one lock, the run record, the round queries, the event bus.

Every collaborator of the aggregator (membership, intake, the round loop,
closing, the Admin service) receives a ``RunState`` instead of the
Coordinator, so none of them depends on another's internals and the import
graph points one way: this module at the bottom, the Coordinator (wiring
only) on top. The lock is re-entrant because a collaborator holding it may
call another (closing a round opens the next one); ``changed`` is notified
whenever a round or a site changes, which is what long polls wait on.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import FailedPrecondition
from server import rounds
from server.accumulation import Accumulation
from server.config import RoundPolicy
from server.methods import Assignment, MethodPlan
from server.records import (
    ParticipantRecord,
    RoundRecord,
    RoundState,
    RunRecord,
    SiteRecord,
    UploadRecord,
    UploadState,
)
from server.spooled import SpooledUpload, spooled_upload
from server.store import Store

# (name, value, label): label is "" or a word from a fixed set (server.reasons), never an id.
Observer = Callable[[str, float, str], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened in the run, as the Admin service's Watch streams it."""

    unix_ms: int
    round: int
    kind: str
    site_id: str = ""
    state: RoundState | None = None
    detail: str = ""


class EventBus:
    """Fan-out of run events to watchers; a watcher that stops reading loses events, never stalls the run."""

    def __init__(self, now_ms: Callable[[], int], *, queue_size: int = 1000) -> None:
        self._now_ms = now_ms
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue[Event]] = []

    def subscribe(self) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue(maxsize=self._queue_size)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[Event]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    @property
    def watchers(self) -> int:
        """How many watchers are subscribed now."""
        with self._lock:
            return len(self._subscribers)

    def emit(self, kind: str, *, round_number: int = 0, site_id: str = "", state: RoundState | None = None,
             detail: str = "") -> None:  # fmt: skip
        event = Event(self._now_ms(), round_number, kind, site_id, state, detail)
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            with contextlib.suppress(queue.Full):
                q.put_nowait(event)


class RunState:
    """What every part of the aggregator reads and changes about the run, under ``lock``.

    Holds the run's ``store``, its ``run`` record, the method's ``plan``, the open round's
    accumulation (``acc``), the ``events`` bus, the ``stopping`` flag (set at shutdown: long
    polls return, the loop ends) and ``wakeup`` (set when something the round loop acts on has
    happened). Queries that read the store expect the caller to hold ``lock`` unless they say
    otherwise.
    """

    def __init__(self, *, store: Store, run: RunRecord, plan: MethodPlan, clock: Callable[[], float]) -> None:
        self.store = store
        self.run = run
        self.plan = plan
        self._clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.events = EventBus(self.now_ms)
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.acc: Accumulation | None = None
        self._open_round = 0  # the round taking uploads (0: none); read without the lock on every chunk
        self._observers: list[Observer] = []

    # ------------------------------------------------------------ clock, events, metrics
    def now_ms(self) -> int:
        """The run's clock, in Unix milliseconds."""
        return int(self._clock() * 1000)

    def emit(self, kind: str, *, round_number: int = 0, site_id: str = "", state: RoundState | None = None,
             detail: str = "") -> None:  # fmt: skip
        """Send one event to the watchers."""
        self.events.emit(kind, round_number=round_number, site_id=site_id, state=state, detail=detail)

    def add_observer(self, observer: Observer) -> None:
        """Have ``observer(name, value, label)`` called for every measurement (bytes in and out,
        seconds, refused uploads and failed rounds by reason)."""
        self._observers.append(observer)

    def observe(self, name: str, value: float, label: str = "") -> None:
        for observer in self._observers:
            observer(name, value, label)

    def wake(self) -> None:
        """Have the round loop tick now (an upload was accepted: the quorum may be met)."""
        self.wakeup.set()

    # ------------------------------------------------------------ the open round
    def set_open_round(self, round_number: int) -> None:
        """Name the round that takes uploads (0: none); the caller holds the lock."""
        self._open_round = round_number

    def round_accepts(self, round_number: int) -> bool:
        """Whether ``round_number`` is open for uploads; no lock and no query (called for every chunk)."""
        return round_number != 0 and round_number == self._open_round

    def progress(self, record: RoundRecord, target: RoundState) -> None:
        """Move an open round forward to ``target`` if it is not there yet."""
        new_state = rounds.progress(record.state, target)
        if new_state is not record.state:
            record.state = new_state
            self.store.put(record)
            self.emit("round_state", round_number=record.round, state=new_state)

    # ------------------------------------------------------------ queries
    def current_round(self) -> RoundRecord | None:
        """The record of the run's latest round, whatever its state; None before round 1."""
        return self.store.get(RoundRecord, self.run.current_round) if self.run.current_round else None

    def latest_published(self) -> RoundRecord:
        """The record of the latest published round (round 0, the initial state, at the least)."""
        rows = self.store.select(RoundRecord, "state = ?", (int(RoundState.PUBLISHED),), order="round DESC")
        return rows[0]

    def policy(self) -> RoundPolicy:
        """The round settings in force (the configured ones, as changed by the operator)."""
        return RoundPolicy(
            min_sites=self.run.min_sites,
            min_sample_fraction=self.run.min_sample_fraction,
            deadline_s=self.run.round_deadline_s,
            min_sites_to_open=self.run.min_sites_to_open,
        )

    def joined_site(self, site_id: str) -> SiteRecord:
        """The site's record; FailedPrecondition if it never joined."""
        site = self.store.get(SiteRecord, site_id)
        if site is None:
            raise FailedPrecondition(
                f"site {site_id!r} has not joined; call Join first", field="site_id", reason="NOT_JOINED"
            )
        return site

    def assignment(self, round_number: int, site: SiteRecord) -> Assignment:
        """The site's part in the round, by the method's plan."""
        return self.plan.assignment(round_number, site.site_id, site.lora_rank)

    def participants(self, round_number: int) -> list[ParticipantRecord]:
        """The sites that had a part in the round, dropped ones included."""
        return self.store.select(ParticipantRecord, "round = ?", (round_number,))

    def accepted_records(self, round_number: int) -> list[UploadRecord]:
        """The round's accepted uploads, in the order they were accepted."""
        return self.store.select(
            UploadRecord, "round = ? AND state = ?", (round_number, int(UploadState.ACCEPTED)), order="seq"
        )

    def accepted_uploads(self, round_number: int) -> list[SpooledUpload]:
        """The round's accepted uploads with their recorded layouts, in acceptance order."""
        return [spooled_upload(u) for u in self.accepted_records(round_number)]

    def abandon_uploads(self, round_number: int, reason: str) -> None:
        """Mark the round's uploads still being received as abandoned (inside the caller's transaction)."""
        for upload in self.store.select(
            UploadRecord, "round = ? AND state = ?", (round_number, int(UploadState.RECEIVING))
        ):
            upload.state = UploadState.ABANDONED
            upload.reason = reason
            self.store.put(upload)
