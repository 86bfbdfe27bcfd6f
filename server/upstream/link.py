"""The intermediate's end of the link to its parent: a worker's calls, made by an aggregator.

Every call goes through ``common.retry`` as a worker's do (full-jitter backoff, bounded by
``[upstream] max_wait_s``, each wait logged), so a parent that restarts or is briefly away costs
a wait, not the round. Deltas move through the worker's own code: ``client.delta_stub`` frames
FetchDiff and PushDelta without protobuf copies, ``client.transfer.push`` resumes an upload at
the parent's committed offset. ``ParentBeats`` heartbeats the parent from Join on, its phase
saying what the subtree does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from client.delta_stub import DeltaStub
from client.transfer import PUSH, RESUMABLE, StoredPayload, push
from common.channel import ChannelConfig, auth_metadata, open_channel
from common.delta import Chunk, DeltaHeader
from common.errors import reason_of, status_of
from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from common.retry import Retrier, RetryPolicy
from common.serde import training_spec_from_proto
from common.spec import Directive, Phase, RoundState, TrainingSpec
from server.upstream.settings import UpstreamConfig

logger = logging.getLogger(__name__)

# AwaitRound's long poll, as the parent allows it (server.membership.MAX_AWAIT_S).
MAX_POLL_S = 60.0


@dataclass(frozen=True, slots=True)
class ParentRound:
    """The parent's round as an AwaitRound or Join reply describes it."""

    run_id: str
    round: int
    state: RoundState
    deadline_ms: int  # 0 = none
    base_round: int  # the parent's latest published round
    finished: bool
    sits_out: bool
    training: TrainingSpec

    @property
    def accepts(self) -> bool:
        """Whether the parent takes uploads for ``round`` now."""
        return self.round > 0 and self.state.accepts_uploads and not self.finished and not self.sits_out


def parent_round(msg: federation_pb2.RoundSpec) -> ParentRound:
    """A RoundSpec from the parent as a ParentRound."""
    return ParentRound(
        run_id=msg.run_id,
        round=msg.round,
        state=RoundState(msg.state) if msg.state else RoundState.PUBLISHED,
        deadline_ms=msg.deadline_unix_ms,
        base_round=msg.base_round,
        finished=msg.run_finished,
        sits_out=msg.sits_out,
        training=training_spec_from_proto(msg.training),
    )


@dataclass(frozen=True, slots=True)
class Joined:
    """What Join at the parent answered."""

    run_id: str
    heartbeat_interval_s: float
    current: ParentRound


class UpstreamLink:
    """The calls an intermediate makes to its parent, as the site ``settings.site_id``.

    ``stop`` ends every wait between retries (the daemon is shutting down).
    """

    def __init__(self, settings: UpstreamConfig, stop: threading.Event) -> None:
        self.settings = settings
        self.site_id = settings.site_id
        self._channel = open_channel(
            ChannelConfig(
                target=settings.address,
                token=settings.token,
                ca=settings.ca,
                cert=settings.cert,
                key=settings.key,
            )
        )
        self._stub = federation_pb2_grpc.FederationStub(self._channel)
        self._deltas = DeltaStub(self._channel)
        self._meta = auth_metadata(settings.token)
        self.retrier = Retrier(
            RetryPolicy(max_delay=10.0, max_elapsed=settings.max_wait_s, retry_on=RESUMABLE),
            sleep=stop.wait,
            stopped=stop.is_set,
        )
        self._push_retrier = self.retrier.with_policy(
            RetryPolicy(max_delay=PUSH.max_delay, max_elapsed=settings.max_wait_s, retry_on=RESUMABLE)
        )

    def close(self) -> None:
        self._channel.close()

    def join(self, *, num_samples: int, held_round: int) -> Joined:
        """Join the parent (again: it updates the samples this subtree declares)."""
        request = federation_pb2.JoinRequest(
            site_id=self.site_id,
            capabilities=federation_pb2.Capabilities(num_samples=num_samples),
            held_round=held_round,
            client_version="gdfed-intermediate",
        )
        reply = self.retrier.call(
            "upstream join", lambda: self._stub.Join(request, metadata=self._meta, timeout=30)
        )
        return Joined(
            run_id=reply.run_id,
            heartbeat_interval_s=(reply.heartbeat_interval_ms or 5000) / 1000,
            current=parent_round(reply.current),
        )

    def await_round(self, *, after: int, wait_s: float) -> ParentRound:
        """The parent's round after ``after`` once it opens, or its current one after ``wait_s``."""
        wait_ms = int(max(0.0, min(wait_s, MAX_POLL_S)) * 1000)
        request = federation_pb2.AwaitRoundRequest(site_id=self.site_id, after_round=after, wait_ms=wait_ms)
        reply = self.retrier.call(
            "upstream await",
            lambda: self._stub.AwaitRound(request, metadata=self._meta, timeout=wait_ms / 1000 + 15),
        )
        return parent_round(reply)

    def beat(self, *, round_number: int, phase: Phase) -> federation_pb2.HeartbeatReply:
        """One heartbeat, not retried (the next one follows soon)."""
        request = federation_pb2.HeartbeatRequest(
            site_id=self.site_id, round=round_number, phase=federation_pb2.Phase.ValueType(phase)
        )
        reply: federation_pb2.HeartbeatReply = self._stub.Heartbeat(request, metadata=self._meta, timeout=10)
        return reply

    def fetch(self, have_round: int, *, snapshot: bool = False) -> Iterator[Chunk]:
        """The parent's FetchDiff stream from ``have_round`` (one try: the caller retries, resuming)."""
        request = federation_pb2.FetchDiffRequest(
            site_id=self.site_id, have_round=have_round, snapshot=snapshot
        )
        return iter(self._deltas.FetchDiff(request, metadata=self._meta, timeout=3600))

    def push(self, header: DeltaHeader, payload: StoredPayload) -> federation_pb2.PushReceipt:
        """Send an upload whole, resuming where the parent stands with it (complete: a duplicate receipt).

        Raises:
            client.transfer.RoundOver: the parent's round closed, or it takes no upload from us in it.
            grpc.RpcError: what the retries did not get past.
        """
        return push(self._deltas, self._meta, header, payload, retrier=self._push_retrier, resume=True)


def said(exc: grpc.RpcError) -> str:
    """A failed call's code and details, on one line (for the log and errors)."""
    code = status_of(exc)
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return f"{code.name if code is not None else 'error'}: {' '.join(str(details or '').split())[:200]}"


class ParentBeats:
    """Heartbeats to the parent from Join on, on a thread of its own.

    ``now`` says (round, phase) for each beat. A beat the parent refuses because it does not
    know this site (NOT_JOINED: it lost its records) sets ``rejoin``; a STOP is logged.
    """

    def __init__(
        self, link: UpstreamLink, now: Callable[[], tuple[int, Phase]], stop: threading.Event
    ) -> None:
        self._link = link
        self._now = now
        self._stop = stop
        self.interval_s = 5.0
        self.rejoin = threading.Event()
        self.last_directive = Directive.CONTINUE
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self, interval_s: float) -> None:
        self.interval_s = interval_s
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gdfed-upstream-beats", daemon=True)
            self._thread.start()

    def join(self) -> None:
        """Wait for the thread (after ``stop`` is set)."""
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            round_number, phase = self._now()
            try:
                reply = self._link.beat(round_number=round_number, phase=phase)
            except ValueError:  # the channel was closed: the daemon is stopping
                return
            except grpc.RpcError as exc:
                if reason_of(exc) == "NOT_JOINED":
                    self.rejoin.set()
                if not self._failing:  # one line when the parent goes away, one when it is back
                    logger.warning(
                        "[upstream] heartbeat to the parent failed: %s", exc.details() or exc.code()
                    )
                self._failing = True
                continue
            if self._failing:
                logger.info("[upstream] heartbeats reach the parent again")
            self._failing = False
            directive = Directive(reply.directive)
            if directive is Directive.STOP and self.last_directive is not Directive.STOP:
                logger.warning("[upstream] the parent says stop: %s", reply.message or "(no message)")
            self.last_directive = directive
