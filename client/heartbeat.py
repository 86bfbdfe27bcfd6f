"""The worker's heartbeat and what it carries: phase, progress, its last problem, its phase timings.

    Join ─> Heartbeat.start() ─> a beat at once, then one every interval (the JoinReply's, or
            the last reply's next_beat_ms):
        HeartbeatRequest(round, phase, step, loss, last_problem, timings, training) ─> the directive
            STOP "evicted..."  -> Status.evicted, Status.stop (the worker exits 1)
            STOP otherwise     -> Status.finished, Status.stop (the run is over: exit 0)
            ABORT_ROUND        -> Status.abort_round = the round being trained
    ─> Heartbeat.stop() when the worker exits (with a last beat: the final timings, or why it failed)

Beats go out from Join on, whatever the worker does: loading the model,
syncing, training, uploading, or waiting out an aggregator that is away. The
aggregator drops a site silent for ``missed_beats`` intervals, and an 8B model
takes minutes to load. A beat that fails (the aggregator away) is logged at
debug level and the next one goes out on time.

``ProblemLog`` keeps the last warning or error of the worker's own loggers
(``client``, ``common``) as one line of at most ``MAX_PROBLEM_BYTES``, sent in
every beat, so an operator sees why a site is slow or failing (``gdfed status
--site``) without a shell on it.

``Status.training`` holds the figures of the round being trained (tokens/s, step time, peak
memory, ranks: ``client.stats``), updated each step, then those of the last round trained until
the next one starts: every beat carries them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from common.delta import TrainingStats
from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from common.serde import training_stats_to_proto
from common.spec import Directive, Phase

logger = logging.getLogger(__name__)

MAX_PROBLEM_BYTES = 512  # HeartbeatRequest.last_problem's limit; the aggregator refuses more
TIMED = ("load", "sync", "train", "upload")  # the phases whose latest duration each beat reports


def one_line(text: str, limit: int = MAX_PROBLEM_BYTES) -> str:
    """``text`` on one line (runs of white space, newlines included, become one space), cut to at
    most ``limit`` bytes of UTF-8 at a character boundary, an ellipsis marking the cut."""
    line = " ".join(text.split())
    data = line.encode()
    if len(data) <= limit:
        return line
    return data[: limit - len("…".encode())].decode(errors="ignore") + "…"


@dataclass
class Status:
    """What the worker is doing: written by its main thread, read by the beats.

    Plain attribute writes, each atomic under the GIL; a beat that reads
    fields of two moments reports a step of one round with the phase of the
    next, which the next beat corrects.
    """

    round: int = 0
    phase: Phase = Phase.IDLE
    step: int = 0
    total: int = 0
    loss: float = 0.0
    abort_round: int = 0
    problem: str = ""  # the last warning or error, one line (ProblemLog)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMED, 0.0))
    training: TrainingStats = field(default_factory=TrainingStats)  # this round so far, or the last
    evicted: str = ""  # the aggregator's word when it evicted this site ("" = not evicted)
    finished: bool = False  # the aggregator said stop for another reason: the run is over
    stop: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def timed(self, phase: Phase, name: str) -> Iterator[None]:
        """Be in ``phase`` for the block, and keep how long it took as the latest ``name`` timing
        (also when it fails: an upload that gave up after ten minutes says so)."""
        if name not in self.timings:
            raise ValueError(f"{name!r} is not a timed phase; those are {', '.join(TIMED)}")
        self.phase = phase
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - started


class ProblemLog(logging.Handler):
    """Keeps the last WARNING-or-worse record of the worker's loggers in ``status.problem``.

    A context manager: attached to the loggers on entry, detached on exit.
    """

    def __init__(self, status: Status, loggers: tuple[str, ...] = ("client", "common")) -> None:
        super().__init__(logging.WARNING)
        self._status = status
        self._loggers = [logging.getLogger(name) for name in loggers]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            error = record.exc_info[1] if record.exc_info else None
            if error is not None and str(error) not in text:
                text = f"{text}: {type(error).__name__}: {error}"
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            self._status.problem = one_line(f"{stamp} {record.levelname} {text}")
        except Exception:
            self.handleError(record)

    def __enter__(self) -> ProblemLog:
        for each in self._loggers:
            each.addHandler(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for each in self._loggers:
            each.removeHandler(self)


class Heartbeat:
    """The beating thread of one worker, from ``start`` (right after Join) to ``stop``."""

    def __init__(
        self,
        stub: federation_pb2_grpc.FederationStub,
        metadata: tuple[tuple[str, str], ...],
        site_id: str,
        status: Status,
        *,
        interval_s: float,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s is {interval_s}; must be > 0")
        self._stub = stub
        self._metadata = metadata
        self._site_id = site_id
        self._status = status
        self._interval = interval_s
        self._notice = ""  # the last CONTINUE message logged
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, last_word: bool = False) -> None:
        """End the beats; ``last_word``: send one more, the worker's final word (best effort)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if last_word:
            with contextlib.suppress(grpc.RpcError):  # the aggregator away: the worker's log says it all
                self.beat(timeout=2.0)

    def request(self) -> federation_pb2.HeartbeatRequest:
        """The beat that says what the worker does now."""
        s, t = self._status, self._status.timings
        return federation_pb2.HeartbeatRequest(
            site_id=self._site_id,
            round=s.round,
            phase=federation_pb2.Phase.ValueType(s.phase),
            step=s.step,
            total_steps=s.total,
            loss=s.loss,
            last_problem=s.problem,
            timings=federation_pb2.PhaseTimings(
                load_seconds=t["load"],
                sync_seconds=t["sync"],
                train_seconds=t["train"],
                upload_seconds=t["upload"],
            ),
            training=training_stats_to_proto(s.training),
        )

    def beat(self, *, timeout: float) -> federation_pb2.HeartbeatReply:
        """One beat, its directive obeyed; raises the call's error."""
        reply: federation_pb2.HeartbeatReply = self._stub.Heartbeat(
            self.request(), metadata=self._metadata, timeout=timeout
        )
        s = self._status
        directive = int(reply.directive)
        if directive == Directive.STOP:
            # The wire has one STOP for "evicted" and "the run is over"; the aggregator's message says which.
            if reply.message.startswith("evicted"):
                s.evicted = reply.message
            else:
                if not s.stop.is_set():  # a worker on its way out already said why
                    logger.info("[heartbeat] the aggregator says stop: %s", reply.message)
                s.finished = True
            s.stop.set()
        elif directive == Directive.ABORT_ROUND:
            s.abort_round = s.round
        elif reply.message and reply.message != self._notice:
            # An intermediate aggregator says here why a round was lost upstream (the root closed it
            # before the partial sum arrived): logged once per new message, not on every beat.
            logger.info("[heartbeat] the aggregator says: %s", reply.message)
        if directive != Directive.STOP:
            self._notice = reply.message
        return reply

    def _loop(self) -> None:
        interval = self._interval
        due = time.monotonic()
        while not self._done.is_set() and not self._status.stop.is_set():
            try:
                reply = self.beat(timeout=max(5.0, interval))
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else None
                logger.debug("[heartbeat] %s", code.name if code is not None else exc)
            else:
                if reply.next_beat_ms:
                    interval = reply.next_beat_ms / 1000
            # On a fixed schedule: a slow beat does not push the next ones back (one late goes out at once).
            due = max(due + interval, time.monotonic())
            self._done.wait(max(0.0, due - time.monotonic()))
