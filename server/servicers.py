"""The gRPC edge: Federation and Admin servicers.

Each method authenticates, converts the request into domain values, calls
the part of the aggregator that owns the operation (membership, intake,
fetching, the run's admin), and converts the answer back through
``server.wire``. Every GdfedError becomes its gRPC status with its message and,
in the status details, its machine-readable reason (``server.error_status``);
anything else is logged with its traceback and answered INTERNAL, and the
daemon goes on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from common.codec import iter_chunks
from common.delta import Chunk
from common.errors import CATALOG, GdfedError, InvalidArgument, PermissionDenied, RoundClosed
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from common.serde import chunk_to_wire, training_stats_from_proto
from common.spec import Device, Phase, TrainingSpec
from server import wire
from server.auth import Authenticator
from server.error_status import INTERNAL, STORE_UNAVAILABLE, error_status, status
from server.fair_share import CallKind, FairShare
from server.fetching import Fetching
from server.intake import Intake
from server.membership import Membership, PhaseTimings
from server.run_admin import RunAdmin
from server.run_state import EventBus
from server.uploads import disk_full

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def abort(context: grpc.ServicerContext, status: grpc.Status) -> NoReturn:
    context.abort_with_status(status)
    raise AssertionError("context.abort_with_status returned")  # grpc raises inside it


@contextlib.contextmanager
def mapped_errors(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """Answer a domain error with its status and reason (server.error_status), anything unexpected
    with INTERNAL (its traceback in the log, never to the client); never crash."""
    try:
        yield
    except GdfedError as exc:
        logger.info("[%s] %s %s: %s", method, exc.code.name, exc.reason, exc.message)
        abort(context, error_status(exc))
    except grpc.RpcError:
        raise
    except Exception as exc:
        if disk_full(exc):  # the operator's to fix, not a bug: no traceback, a status to retry on
            logger.warning("[%s] the aggregator's disk is full: %s", method, exc)
            abort(
                context,
                status(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the aggregator's disk is full ({exc}); try again once the operator has freed space",
                    STORE_UNAVAILABLE,
                    retry_s=CATALOG[STORE_UNAVAILABLE].retry_s,
                ),
            )
        logger.exception("[%s] internal error", method)
        abort(
            context,
            status(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", INTERNAL),
        )


def rpc(method: F) -> F:
    """A unary or client-streaming method, its errors mapped by ``mapped_errors``."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with mapped_errors(context, method.__name__):
            return method(self, request, context)

    return wrapper  # type: ignore[return-value]


def stream_rpc(method: F) -> F:
    """A server-streaming method (a generator), its errors mapped by ``mapped_errors``."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with mapped_errors(context, method.__name__):
            yield from method(self, request, context)

    return wrapper  # type: ignore[return-value]


class FederationServicer(federation_pb2_grpc.FederationServicer):
    """Worker-facing calls."""

    def __init__(
        self,
        *,
        membership: Membership,
        intake: Intake,
        fetching: Fetching,
        training: TrainingSpec,
        max_concurrent_uploads: int,
        auth: Authenticator,
        fair_share: FairShare,
    ) -> None:
        self._membership = membership
        self._intake = intake
        self._fetching = fetching
        self._training = training
        self._auth = auth
        self._share = fair_share
        # Streams beyond this many wait before their first chunk is read: gRPC then keeps their
        # flow-control windows small, so memory does not grow with the number of uploading sites.
        self._upload_slots = threading.BoundedSemaphore(max(1, max_concurrent_uploads))

    @rpc
    def Join(
        self, request: federation_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> federation_pb2.JoinReply:
        site = self._site(context)
        if request.site_id != site:
            raise _mismatch(request.site_id, site)
        caps = request.capabilities
        result = self._membership.join(
            site,
            device=_enum(Device, caps.device, "capabilities.device"),
            memory_bytes=caps.memory_bytes,
            lora_rank=caps.lora_rank,
            num_samples=caps.num_samples,
            fingerprint=request.base_model_fingerprint,
            held_round=request.held_round,
        )
        return federation_pb2.JoinReply(
            run_id=result.run_id,
            base_model_fingerprint=result.fingerprint,
            heartbeat_interval_ms=result.heartbeat_interval_ms,
            missed_beats_allowed=result.missed_beats,
            current=wire.round_spec(result.current, self._training),
            max_upload_bytes=result.max_upload_bytes,
        )

    @rpc
    def Heartbeat(
        self, request: federation_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> federation_pb2.HeartbeatReply:
        site = self._auth.site(context)
        _check_claim(request.site_id, site)
        reply = self._membership.heartbeat(
            site,
            round_number=request.round,
            phase=_enum(Phase, request.phase, "phase"),
            step=request.step,
            total_steps=request.total_steps,
            loss=request.loss,
            last_problem=request.last_problem,
            timings=PhaseTimings(
                load=request.timings.load_seconds,
                sync=request.timings.sync_seconds,
                train=request.timings.train_seconds,
                upload=request.timings.upload_seconds,
            ),
            stats=training_stats_from_proto(request.training),
        )
        return federation_pb2.HeartbeatReply(
            directive=federation_pb2.Directive.ValueType(reply.directive),
            current_round=reply.current_round,
            next_beat_ms=reply.next_beat_ms,
            message=reply.message,
        )

    @rpc
    def AwaitRound(
        self, request: federation_pb2.AwaitRoundRequest, context: grpc.ServicerContext
    ) -> federation_pb2.RoundSpec:
        site = self._site(context, request.site_id)
        if request.wait_ms > 60_000:
            raise InvalidArgument(
                f"wait_ms is {request.wait_ms}; the limit is 60000", field="wait_ms", limit=60_000
            )
        with self._share.slot(site, CallKind.POLL):
            view = self._membership.await_round(
                site, request.after_round, request.wait_ms / 1000, gone=lambda: not context.is_active()
            )
        return wire.round_spec(view, self._training)

    @stream_rpc
    def FetchDiff(  # type: ignore[override]  # serialized DeltaChunks: server.app registers the serializer
        self, request: federation_pb2.FetchDiffRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        site = self._site(context, request.site_id)
        with (
            self._share.slot(site, CallKind.FETCH),
            self._fetching.opened(
                site, request.have_round, request.snapshot, tuple(request.only_prefixes)
            ) as plan,
        ):
            for item, source in plan:
                sent = 0
                for chunk in iter_chunks(item.header, item.layout, source):
                    if not context.is_active():
                        return
                    sent += len(chunk.data)
                    yield chunk_to_wire(chunk)
                self._fetching.count_bytes_out(item.round, sent)
        if plan and not request.only_prefixes:  # a partial snapshot is not a synced state
            self._fetching.mark_synced(site, plan[-1][0].round)

    @rpc
    def PushDelta(  # type: ignore[override]  # parsed chunks: server.app registers chunk_from_wire
        self, request_iterator: Iterator[Chunk], context: grpc.ServicerContext
    ) -> federation_pb2.PushReceipt:
        site = self._site(context)
        with self._share.slot(site, CallKind.PUSH):
            while not self._upload_slots.acquire(timeout=0.5):
                if not context.is_active():
                    raise RoundClosed(  # nobody reads it: the client is gone
                        "the client went away while its upload waited for a slot",
                        field="upload_id",
                        reason="UPLOAD_CANCELLED",
                    )
            try:
                return wire.receipt(self._intake.receive(site, request_iterator))
            finally:
                self._upload_slots.release()

    @rpc
    def GetUploadOffset(
        self, request: federation_pb2.UploadOffsetRequest, context: grpc.ServicerContext
    ) -> federation_pb2.UploadOffsetReply:
        site = self._site(context, request.site_id)
        offset, complete = self._intake.upload_offset(site, request.upload_id)
        return federation_pb2.UploadOffsetReply(committed_offset=offset, complete=complete)

    def _site(self, context: grpc.ServicerContext, claimed: str = "") -> str:
        """The calling site, refused if an operator evicted it (every call but Heartbeat: that one
        answers STOP "evicted", so a worker exits with the word instead of an error) or if the
        request's ``site_id`` (``claimed``) names another site."""
        site = self._auth.site(context)
        self._membership.refuse_if_evicted(site)
        _check_claim(claimed, site)
        return site


def _check_claim(claimed: str, site: str) -> None:
    """Refuse a request whose ``site_id`` is another site's than the token's.

    An empty ``site_id`` is accepted (the token alone names the site) everywhere but Join, so
    clients written before the field was checked keep working; a wrong one is always refused,
    since a worker answered for a site it did not ask about would act on another site's state.
    """
    if claimed and claimed != site:
        raise _mismatch(claimed, site)


def _mismatch(claimed: str, site: str) -> GdfedError:
    return PermissionDenied(
        f"site_id is {claimed!r} but the token belongs to {site!r}",
        field="site_id",
        reason="SITE_ID_MISMATCH",
        metadata={"expected": site, "got": claimed},
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Operator-facing calls."""

    def __init__(self, *, admin: RunAdmin, events: EventBus, auth: Authenticator, version: str) -> None:
        self._admin = admin
        self._events = events
        self._auth = auth
        self._version = version

    def _status(self) -> admin_pb2.RunStatus:
        return wire.run_status(self._admin.status(), self._version)

    @rpc
    def GetStatus(
        self, request: admin_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RunStatus:
        self._auth.admin(context)
        return self._status()

    @rpc
    def ListRounds(
        self, request: admin_pb2.ListRoundsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListRoundsReply:
        self._auth.admin(context)
        if request.limit > 1000:
            raise InvalidArgument(f"limit is {request.limit}; the maximum is 1000", field="limit", limit=1000)
        records = self._admin.rounds_page(request.limit or 50, request.before)
        return admin_pb2.ListRoundsReply(rounds=[wire.round_status(r) for r in records])

    @rpc
    def GetRound(
        self, request: admin_pb2.GetRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RoundStatus:
        self._auth.admin(context)
        return wire.round_status(self._admin.round_report(request.round))

    @rpc
    def ListSites(
        self, request: admin_pb2.ListSitesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListSitesReply:
        self._auth.admin(context)
        return admin_pb2.ListSitesReply(sites=[wire.site_status(s) for s in self._admin.sites()])

    @stream_rpc
    def Watch(
        self, request: admin_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.RunEvent]:
        self._auth.admin(context)
        events = self._events.subscribe()
        try:
            while context.is_active():
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield wire.run_event(event)
        finally:
            self._events.unsubscribe(events)

    def _control(self, action: Callable[[], list[str] | None]) -> admin_pb2.ControlReply:
        """Do ``action``; its warnings (settings taken that cannot hold yet) go back in ``message``."""
        warnings = action() or []
        message = "\n".join(f"warning: {w}" for w in warnings)
        return admin_pb2.ControlReply(ok=True, message=message, status=self._status())

    @rpc
    def Pause(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._admin.pause(_reason(request.reason)))

    @rpc
    def Resume(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._admin.resume(_reason(request.reason)))

    @rpc
    def CloseRound(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._admin.close_round(_reason(request.reason)))

    @rpc
    def EvictSite(
        self, request: admin_pb2.EvictSiteRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._admin.evict(request.site_id, _reason(request.reason)))

    @rpc
    def ReloadTokens(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        reason = _reason(request.reason)
        report = self._auth.reload()  # ConfigError (FAILED_PRECONDITION, the line named): old tokens stay
        logger.warning(
            "[admin] site tokens reloaded: %s%s", report.describe(), f" ({reason})" if reason else ""
        )
        return admin_pb2.ControlReply(ok=True, message=report.describe(), status=self._status())

    @rpc
    def RetryRound(
        self, request: admin_pb2.RetryRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._admin.retry_round(request.round, _reason(request.reason)))

    @rpc
    def SetRoundPolicy(
        self, request: admin_pb2.SetRoundPolicyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        has_quorum = request.HasField("quorum")
        return self._control(
            lambda: self._admin.set_policy(
                min_sites=request.quorum.min_sites if has_quorum else None,
                min_sample_fraction=request.quorum.min_sample_fraction if has_quorum else None,
                deadline_s=request.round_deadline_s if request.HasField("round_deadline_s") else None,
                min_sites_to_open=request.min_sites_to_open
                if request.HasField("min_sites_to_open")
                else None,
            )
        )


def _reason(text: str) -> str:
    if len(text.encode()) > 512:
        raise InvalidArgument(
            f"reason is {len(text.encode())} bytes; the limit is 512", field="reason", limit=512
        )
    return text


E = TypeVar("E", Device, Phase)


def _enum(kind: type[E], value: int, field: str) -> E | None:
    """A wire enum value as its mirror (None: left unspecified); INVALID_ARGUMENT naming the field
    for a value the contract does not have."""
    if value == 0:
        return None
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in kind)
        raise InvalidArgument(f"{field} is {value}; must be one of {allowed}", field=field) from None
