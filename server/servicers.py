"""The gRPC edge: Federation and Admin servicers.

Each method authenticates, converts the request into domain values, calls
the coordinator, and converts the answer back. Every GdfedError becomes its
gRPC status with its message; anything else is logged with its traceback
and answered INTERNAL, and the daemon goes on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from common.codec import iter_chunks
from common.errors import GdfedError, InvalidArgument, PermissionDenied, RoundClosed
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, delta_pb2, federation_pb2, federation_pb2_grpc
from common.serde import chunk_from_proto, chunk_to_proto, codec_to_proto
from server.auth import Authenticator
from server.coordinator import Coordinator, RoundView
from server.intake import Receipt
from server.records import RoundRecord, SiteRecord, UploadState

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def abort(context: grpc.ServicerContext, error: GdfedError) -> NoReturn:
    context.abort(error.code, error.message)
    raise AssertionError("context.abort returned")  # grpc raises inside abort


def rpc(method: F) -> F:
    """Map domain errors to statuses; never let an exception escape as a crash."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except GdfedError as exc:
            logger.info("[%s] %s: %s", method.__name__, exc.code.name, exc.message)
            abort(context, exc)
        except grpc.RpcError:
            raise
        except Exception as exc:
            if _is_abort(exc):
                raise
            logger.exception("[%s] internal error", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


def stream_rpc(method: F) -> F:
    """``rpc`` for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except GdfedError as exc:
            logger.info("[%s] %s: %s", method.__name__, exc.code.name, exc.message)
            abort(context, exc)
        except Exception as exc:
            if _is_abort(exc):
                raise
            logger.exception("[%s] internal error", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


def _is_abort(exc: Exception) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through.
    return type(exc).__module__.startswith("grpc")


def round_spec(view: RoundView, coordinator: Coordinator) -> federation_pb2.RoundSpec:
    training = coordinator.config.training
    return federation_pb2.RoundSpec(
        run_id=view.run_id,
        round=view.round,
        state=federation_pb2.RoundState.ValueType(int(view.state)),
        training=federation_pb2.TrainingSpec(
            method=federation_pb2.Method.ValueType(int(training.method)),
            mode=federation_pb2.TrainMode.ValueType(int(training.mode)),
            trainable_patterns=list(training.trainable_patterns),
            lora=federation_pb2.LoraSpec(
                rank=training.lora.rank,
                alpha=training.lora.alpha,
                dropout=training.lora.dropout,
                target_modules=list(training.lora.target_modules),
            ),
            local_steps=training.local_steps,
            batch_size=training.batch_size,
            learning_rate=training.learning_rate,
            max_seq_len=training.max_seq_len,
            upload_codec=codec_to_proto(training.upload_codec),
            seed=training.seed,
            prox_mu=training.prox_mu,
        ),
        deadline_unix_ms=view.deadline_ms,
        quorum=federation_pb2.Quorum(
            min_sites=view.policy.min_sites, min_sample_fraction=view.policy.min_sample_fraction
        ),
        run_finished=view.finished,
        base_round=view.base_round,
        trainable_tensors=list(view.assignment.tensors),
        assigned_lora_rank=view.assignment.lora_rank,
        sits_out=not view.assignment.trains,
        download_blocks=list(view.assignment.download_blocks),
    )


class FederationServicer(federation_pb2_grpc.FederationServicer):
    """Worker-facing calls."""

    def __init__(self, coordinator: Coordinator, auth: Authenticator) -> None:
        self._c = coordinator
        self._auth = auth
        # Streams beyond this many wait before their first chunk is read: gRPC then keeps their
        # flow-control windows small, so memory does not grow with the number of uploading sites.
        self._upload_slots = threading.BoundedSemaphore(max(1, coordinator.config.max_concurrent_uploads))

    @rpc
    def Join(
        self, request: federation_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> federation_pb2.JoinReply:
        site = self._auth.site(context)
        if request.site_id != site:
            raise _permission(f"site_id is {request.site_id!r} but the token belongs to {site!r}")
        caps = request.capabilities
        result = self._c.join(
            site,
            device=caps.device,
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
            current=round_spec(result.current, self._c),
            max_upload_bytes=result.max_upload_bytes,
        )

    @rpc
    def Heartbeat(
        self, request: federation_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> federation_pb2.HeartbeatReply:
        site = self._auth.site(context)
        if request.site_id and request.site_id != site:
            raise _permission(f"site_id is {request.site_id!r} but the token belongs to {site!r}")
        reply = self._c.heartbeat(
            site,
            round_number=request.round,
            phase=request.phase,
            step=request.step,
            total_steps=request.total_steps,
            loss=request.loss,
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
        site = self._auth.site(context)
        if request.wait_ms > 60_000:
            raise InvalidArgument(
                f"wait_ms is {request.wait_ms}; the limit is 60000", field="wait_ms", limit=60_000
            )
        view = self._c.await_round(site, request.after_round, request.wait_ms / 1000)
        return round_spec(view, self._c)

    @stream_rpc
    def FetchDiff(
        self, request: federation_pb2.FetchDiffRequest, context: grpc.ServicerContext
    ) -> Iterator[delta_pb2.DeltaChunk]:
        site = self._auth.site(context)
        plan = self._c.fetching.open(site, request.have_round, request.snapshot, tuple(request.only_prefixes))
        try:
            for item, source in plan:
                sent = 0
                for chunk in iter_chunks(item.header, source):
                    if not context.is_active():
                        return
                    sent += len(chunk.data)
                    yield chunk_to_proto(chunk)
                self._c.fetching.count_bytes_out(item.round, sent)
        finally:
            for item, source in plan:
                source.close()
                if item.temporary:
                    item.path.unlink(missing_ok=True)
        if plan and not request.only_prefixes:  # a partial snapshot is not a synced state
            self._c.fetching.mark_synced(site, plan[-1][0].round)

    @rpc
    def PushDelta(
        self, request_iterator: Iterator[delta_pb2.DeltaChunk], context: grpc.ServicerContext
    ) -> federation_pb2.PushReceipt:
        site = self._auth.site(context)
        while not self._upload_slots.acquire(timeout=0.5):
            if not context.is_active():
                raise RoundClosed(
                    "the client went away while its upload waited for a slot", field="upload_id"
                )
        try:
            return self._push(site, request_iterator)
        finally:
            self._upload_slots.release()

    def _push(
        self, site: str, request_iterator: Iterator[delta_pb2.DeltaChunk]
    ) -> federation_pb2.PushReceipt:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("the stream carried no chunk", field="header")
        chunk = chunk_from_proto(first)
        if chunk.header is None:
            raise InvalidArgument("the first chunk must carry the header", field="header")
        opened = self._c.intake.open_upload(site, chunk.header, chunk.offset)
        if isinstance(opened, Receipt):
            return _receipt(opened)
        session = opened
        try:
            session.receive(chunk)
            for message in request_iterator:
                session.receive(chunk_from_proto(message))
        except GdfedError as exc:
            if session.failed and not isinstance(exc, RoundClosed):
                session.fail(exc)
            else:
                session.interrupt()
            raise
        except BaseException:
            session.interrupt()  # the client went away: keep what arrived, for a resume
            raise
        return _receipt(session.complete())

    @rpc
    def GetUploadOffset(
        self, request: federation_pb2.UploadOffsetRequest, context: grpc.ServicerContext
    ) -> federation_pb2.UploadOffsetReply:
        site = self._auth.site(context)
        offset, complete = self._c.intake.upload_offset(site, request.upload_id)
        return federation_pb2.UploadOffsetReply(committed_offset=offset, complete=complete)


def _permission(message: str) -> GdfedError:
    return PermissionDenied(message, field="site_id")


def _receipt(receipt: Receipt) -> federation_pb2.PushReceipt:
    return federation_pb2.PushReceipt(
        upload_id=receipt.upload_id,
        round=receipt.round,
        bytes_received=receipt.bytes_received,
        accepted=receipt.accepted,
        duplicate=receipt.duplicate,
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Operator-facing calls."""

    def __init__(self, coordinator: Coordinator, auth: Authenticator, version: str) -> None:
        self._c = coordinator
        self._auth = auth
        self._version = version

    def _status(self) -> admin_pb2.RunStatus:
        status = self._c.admin.status()
        run, current, policy = status.run, status.current, status.policy
        return admin_pb2.RunStatus(
            run_id=run.run_id,
            paused=run.paused,
            finished=run.finished,
            current_round=run.current_round,
            total_rounds=self._c.config.rounds,
            current_state=_round_state(int(current.state) if current else 0),
            sites_alive=status.sites_alive,
            sites_known=status.sites_known,
            full_model_bytes=self._c.full_model_bytes,
            quorum=federation_pb2.Quorum(
                min_sites=policy.min_sites, min_sample_fraction=policy.min_sample_fraction
            ),
            round_deadline_s=policy.deadline_s,
            started_unix_ms=run.created_ms,
            server_version=self._version,
        )

    def _round(self, record: RoundRecord) -> admin_pb2.RoundStatus:
        msg = admin_pb2.RoundStatus(
            round=record.round,
            state=_round_state(int(record.state)),
            samples=record.samples,
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            diff_bytes=record.diff_bytes,
            opened_unix_ms=record.opened_ms,
            closed_unix_ms=record.closed_ms,
            published_unix_ms=record.published_ms,
            aggregate_seconds=record.aggregate_seconds,
            mean_train_loss=record.mean_train_loss,
            mean_eval_loss=record.mean_eval_loss,
            failure_reason=record.failure_reason,
            close_reason=record.close_reason,
        )
        _, participants, uploads = self._c.admin.round_detail(record.round)
        by_site = {u.site_id: u for u in uploads if u.state is UploadState.ACCEPTED}
        by_site |= {u.site_id: u for u in uploads if u.site_id not in by_site}
        accepted = [u for u in uploads if u.state is UploadState.ACCEPTED]
        if accepted and self._c.full_model_bytes:
            msg.ratio_to_full_model = (
                sum(u.total_bytes for u in accepted) / len(accepted) / self._c.full_model_bytes
            )
        sites = {p.site_id for p in participants} | set(by_site)
        for site_id in sorted(sites):
            part = next((p for p in participants if p.site_id == site_id), None)
            upload = by_site.get(site_id)
            msg.participants.append(
                admin_pb2.SiteRoundStatus(
                    site_id=site_id,
                    sample_count=upload.sample_count if upload else (part.num_samples if part else 0),
                    bytes_in=upload.total_bytes if upload and upload.state is UploadState.ACCEPTED else 0,
                    accepted=bool(upload and upload.state is UploadState.ACCEPTED),
                    dropped=bool(part and part.dropped),
                    train_loss=upload.train_loss if upload else 0.0,
                    eval_loss=upload.eval_loss if upload else 0.0,
                    upload_seconds=upload.upload_seconds if upload else 0.0,
                )
            )
        return msg

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
        records = self._c.admin.rounds_page(request.limit or 50, request.before)
        return admin_pb2.ListRoundsReply(rounds=[self._round(r) for r in records])

    @rpc
    def GetRound(
        self, request: admin_pb2.GetRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RoundStatus:
        self._auth.admin(context)
        record, _, _ = self._c.admin.round_detail(request.round)
        return self._round(record)

    @rpc
    def ListSites(
        self, request: admin_pb2.ListSitesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListSitesReply:
        self._auth.admin(context)
        return admin_pb2.ListSitesReply(sites=[_site(s) for s in self._c.admin.sites()])

    @stream_rpc
    def Watch(
        self, request: admin_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.RunEvent]:
        self._auth.admin(context)
        events = self._c.subscribe()
        try:
            while context.is_active():
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield admin_pb2.RunEvent(
                    unix_ms=event.unix_ms,
                    round=event.round,
                    kind=event.kind,
                    site_id=event.site_id,
                    state=_round_state(int(event.state) if event.state else 0),
                    detail=event.detail,
                )
        finally:
            self._c.unsubscribe(events)

    def _control(self, action: Callable[[], None]) -> admin_pb2.ControlReply:
        action()
        return admin_pb2.ControlReply(ok=True, status=self._status())

    @rpc
    def Pause(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._c.admin.pause(_reason(request.reason)))

    @rpc
    def Resume(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._c.admin.resume(_reason(request.reason)))

    @rpc
    def CloseRound(
        self, request: admin_pb2.ControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._c.admin.close_round(_reason(request.reason)))

    @rpc
    def EvictSite(
        self, request: admin_pb2.EvictSiteRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        return self._control(lambda: self._c.admin.evict(request.site_id, _reason(request.reason)))

    @rpc
    def SetRoundPolicy(
        self, request: admin_pb2.SetRoundPolicyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ControlReply:
        self._auth.admin(context)
        has_quorum = request.HasField("quorum")
        return self._control(
            lambda: self._c.admin.set_policy(
                min_sites=request.quorum.min_sites if has_quorum else None,
                min_sample_fraction=request.quorum.min_sample_fraction if has_quorum else None,
                deadline_s=request.round_deadline_s or None,
            )
        )


def _round_state(value: int) -> federation_pb2.RoundState.ValueType:
    return federation_pb2.RoundState.ValueType(value)


def _reason(text: str) -> str:
    if len(text.encode()) > 512:
        raise InvalidArgument(
            f"reason is {len(text.encode())} bytes; the limit is 512", field="reason", limit=512
        )
    return text


def _site(site: SiteRecord) -> admin_pb2.SiteStatus:
    return admin_pb2.SiteStatus(
        site_id=site.site_id,
        state=admin_pb2.SiteState.ValueType(int(site.state)),
        last_beat_unix_ms=site.last_beat_ms,
        rounds_joined=site.rounds_joined,
        held_round=site.held_round,
        phase=federation_pb2.Phase.ValueType(site.phase),
        step=site.step,
        loss=site.loss,
        capabilities=federation_pb2.Capabilities(
            device=federation_pb2.Device.ValueType(site.device),
            memory_bytes=site.memory_bytes,
            lora_rank=site.lora_rank,
            num_samples=site.num_samples,
        ),
    )
