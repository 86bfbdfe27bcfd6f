"""Upload intake: PushDelta's header checks, the live upload sessions, and acceptance.

``open_upload`` validates a header against the open round and starts (or
resumes) an ``UploadSession``; the session reports back here as it commits
offsets and as it is accepted, rejected or ends. Acceptance is durable and
happens at most once per upload id.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence

from common.codec.compact import wire_manifest
from common.codec.layout import validate_codec, validate_spec
from common.delta import Cast, Chunk, Codec, DeltaHeader, Lossy, ShardSpec
from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    GdfedError,
    InvalidArgument,
    PermissionDenied,
    RoundClosed,
)
from common.serde import (
    header_from_bytes,
    header_to_proto,
    layout_to_bytes,
    shards_from_bytes,
    shards_to_bytes,
)
from server.config import ServerConfig
from server.folding import FoldWorker
from server.partial_sums import check_kind, check_partial_codec, is_partial
from server.reasons import refusal_reason
from server.records import RoundState, SiteState, UploadRecord, UploadState, check_id, training_fields
from server.run_state import RunState
from server.spool import Spool
from server.uploads import Receipt, UploadSession

logger = logging.getLogger(__name__)

MAX_SAMPLES = 1 << 29  # keeps n·Δ exact in the fp64 accumulator

__all__ = ["MAX_SAMPLES", "Intake", "Receipt"]


class Intake:
    """Takes uploads into the open round.

    Given the run's ``state`` (the open round and its accumulation, the method's plan, the
    published rounds; its ``changed`` condition is notified when an upload is accepted or a
    session ends, which ``drain`` waits for); the run's ``spool`` and fold worker (``folder``);
    ``config`` for the limits. The live sessions, one per upload id, are kept here, under the
    state's lock.
    """

    def __init__(self, *, state: RunState, spool: Spool, folder: FoldWorker, config: ServerConfig) -> None:
        self._state = state
        self._store = state.store
        self._spool = spool
        self._folder = folder
        self._lock = state.lock
        self._changed = state.changed
        self._config = config
        self._emit = state.emit
        self._metrics = state.observe
        self._sessions: dict[str, UploadSession] = {}

    def receive(self, site_id: str, chunks: Iterator[Chunk]) -> Receipt:
        """Take one PushDelta stream: its header, then its chunks, to acceptance, rejection, or an
        interruption that keeps what arrived for a resume."""
        first = next(chunks, None)
        if first is None:
            raise InvalidArgument("the stream carried no chunk", field="header")
        if first.header is None:
            raise InvalidArgument("the first chunk must carry the header", field="header")
        try:
            opened = self.open_upload(site_id, first.header, first.offset)
        except GdfedError as exc:
            self._metrics("upload_refused", 1, refusal_reason(exc))
            raise
        if isinstance(opened, Receipt):
            return opened
        session = opened
        try:
            try:
                session.receive(first)
                del first  # its data may be a view of the whole message: not kept past the spool
                for chunk in chunks:
                    session.receive(chunk)
            except GdfedError as exc:
                if session.failed and not isinstance(exc, RoundClosed):
                    session.fail(exc)
                else:
                    session.interrupt()
                raise
            except BaseException:
                session.interrupt()  # the client went away: keep what arrived, for a resume
                raise
            return session.complete()
        except GdfedError as exc:
            self._note_resume(site_id, session.upload_id, exc)
            raise

    def _note_resume(self, site_id: str, upload_id: str, error: GdfedError) -> None:
        """Add to ``error`` the offset the upload resumes from (ErrorInfo ``offset``), if it can.

        What GetUploadOffset would answer, so a client resumes without asking; none when the round
        closed or the upload was rejected (its id is spent), so that its absence says "do not resume".
        """
        if error.reason == RoundClosed.reason:
            return
        try:
            with self._lock:
                record = self._store.get(UploadRecord, upload_id)
        except (OSError, sqlite3.Error) as exc:  # a hint only: the error itself must still go out
            logger.warning("[upload] upload=%s: no resume offset for the refusal (%s)", upload_id, exc)
            return
        if record is not None and record.site_id == site_id and record.state is UploadState.RECEIVING:
            error.metadata.setdefault("offset", str(record.committed_offset))

    def upload_offset(self, site_id: str, upload_id: str) -> tuple[int, bool]:
        """GetUploadOffset: the committed offset of ``upload_id`` and whether it is accepted."""
        check_id(upload_id, "upload_id")
        with self._lock:
            upload = self._store.get(UploadRecord, upload_id)
            if upload is None:
                return 0, False
            if upload.site_id != site_id:
                raise _foreign(upload_id)
            return upload.committed_offset, upload.state is UploadState.ACCEPTED

    def open_upload(self, site_id: str, header: DeltaHeader, first_offset: int) -> UploadSession | Receipt:
        """Validate an upload's header and start (or resume) receiving it."""
        check_id(header.upload_id, "upload_id")
        if header.site_id != site_id:
            raise PermissionDenied(
                f"header.site_id is {header.site_id!r} but the token belongs to {site_id!r}: a site uploads only for itself",
                field="header.site_id",
                reason="SITE_ID_MISMATCH",
                metadata={"expected": site_id, "got": header.site_id},
            )
        with self._lock:
            existing = self._store.get(UploadRecord, header.upload_id)
            if existing is not None and existing.site_id != site_id:
                raise _foreign(header.upload_id)
            if existing is not None and existing.state is UploadState.ACCEPTED:
                return Receipt(header.upload_id, existing.round, existing.total_bytes, True, True)
            self._check_upload(site_id, header)
            if existing is not None and existing.state is not UploadState.RECEIVING:
                raise FailedPrecondition(
                    f"upload {header.upload_id!r} was {existing.state.name.lower()} ({existing.reason}); "
                    "send it again under a new upload id",
                    field="upload_id",
                    reason="UPLOAD_ID_SPENT",
                )
            if existing is not None and header_from_bytes(existing.header) != header:
                raise InvalidArgument(
                    f"upload id {header.upload_id!r} was started with a different header; use a new id",
                    field="upload_id",
                    reason="UPLOAD_ID_REUSED",
                )
            committed = existing.committed_offset if existing else 0
            if first_offset not in (0, committed):
                raise FailedPrecondition(
                    f"stream starts at offset {first_offset}; resume at the committed offset {committed} or at 0",
                    field="offset",
                    reason="WRONG_OFFSET",
                    metadata={"offset": str(committed)},
                )
            other = self._sessions.get(header.upload_id)
            if other is not None:
                other.cancel("superseded by a new stream of the same upload")
            record = existing or UploadRecord(
                upload_id=header.upload_id,
                round=header.round,
                site_id=site_id,
                sample_count=header.sample_count,
                header=header_to_proto(header).SerializeToString(),
                started_ms=self._state.now_ms(),
                train_loss=header.metrics.train_loss,
                eval_loss=header.metrics.eval_loss,
                kind=int(header.kind),
                sites=header.sites,
                **training_fields(header.metrics.training),
            )
            # A resume at the committed offset continues after the shards recorded with it; one
            # from 0 starts over.
            shards: Sequence[ShardSpec] = shards_from_bytes(record.shards) if first_offset else ()
            record.committed_offset = first_offset
            record.shards = shards_to_bytes(shards)
            with self._store.transaction():
                self._store.put(record)
            current = self._state.current_round()
            acc = self._state.acc
            assert current is not None and acc is not None
            if is_partial(header):
                acc.mark_partial(header.upload_id)  # weight 1 in the fold, its Σ n_i at acceptance
            self._state.progress(current, RoundState.COLLECTING)
            session = UploadSession(
                intake=self,
                record=record,
                header=header,
                acc=acc,
                spool=self._spool,
                folder=self._folder,
                start=first_offset,
                shards=shards,
                limits=self._config.limits,
            )
            self._sessions[header.upload_id] = session
            logger.info(
                "[upload] round=%d site=%s upload=%s %s at %d (%d shard(s) before it)",
                header.round,
                site_id,
                header.upload_id,
                "resumed" if first_offset else "started",
                first_offset,
                len(shards),
            )
            return session

    def _check_upload(self, site_id: str, header: DeltaHeader) -> None:
        state = self._state
        site = state.joined_site(site_id)
        if site.state is SiteState.EVICTED:
            raise PermissionDenied(f"site {site_id!r} was evicted", field="site_id", reason="SITE_EVICTED")
        if header.run_id != state.run.run_id:
            raise FailedPrecondition(
                f"header.run_id is {header.run_id!r}; this run is {state.run.run_id!r}",
                field="run_id",
                reason="WRONG_RUN",
                metadata={"run_id": state.run.run_id},
            )
        current = state.current_round()
        if current is None or header.round != current.round:
            now = current.round if current else 0
            raise FailedPrecondition(
                f"header.round is {header.round}; the open round is {now}",
                field="round",
                reason="WRONG_ROUND",
                metadata={"round": str(now)},
            )
        if not current.state.accepts_uploads:
            raise RoundClosed(
                f"round {current.round} is {current.state.name.lower()}; it takes no more uploads",
                field="round",
                metadata={"round": str(current.round)},
            )
        if state.run.finished:
            raise FailedPrecondition("the run is finished", field="round", reason="RUN_FINISHED")
        if not 1 <= header.sample_count <= MAX_SAMPLES:
            raise InvalidArgument(
                f"header.sample_count is {header.sample_count}; must be 1..{MAX_SAMPLES}",
                field="sample_count",
                limit=MAX_SAMPLES,
            )
        check_kind(site_id, header, self._config.tree.intermediates)  # DIFF, or an intermediate's PARTIAL_SUM
        latest = state.latest_published()
        if header.base_round != latest.round:
            raise FailedPrecondition(
                f"header.base_round is {header.base_round}; deltas of round {current.round} are taken against round "
                f"{latest.round} (fetch it first)",
                field="base_round",
                reason="WRONG_BASE_ROUND",
                metadata={"base_round": str(latest.round)},
            )
        assignment = state.assignment(current.round, site)
        if not assignment.trains:
            raise FailedPrecondition(
                f"site {site_id!r} has no part in round {current.round} ({state.plan.describe()})",
                field="site_id",
                reason="NOT_ASSIGNED",
                metadata={"round": str(current.round)},
            )
        # The payload's size is not announced (wire revision 2): max_upload_bytes is enforced as
        # its chunks arrive (UploadSession.receive), the manifest bounding every shard.
        codec = header.spec.codec
        validate_codec(codec)  # before the manifest: it derives from the codec (top-k); names codec.digest
        if is_partial(header):
            check_partial_codec(codec)
        else:
            _check_round_codec(codec, self._config.training.upload_codec)
        expected = wire_manifest(state.plan.upload_manifest(assignment), codec)  # lossy: compact names
        validate_spec(header.spec, self._config.limits, expected=expected)
        for upload in self._store.select(
            UploadRecord,
            "round = ? AND site_id = ? AND state = ?",
            (current.round, site_id, int(UploadState.ACCEPTED)),
        ):
            if upload.upload_id != header.upload_id:
                raise AlreadyExists(
                    f"site {site_id!r} already has upload {upload.upload_id!r} accepted in round {current.round}",
                    field="upload_id",
                    reason="ALREADY_UPLOADED",
                )

    def commit_offset(self, session: UploadSession, offset: int, shards: Sequence[ShardSpec]) -> None:
        """Record a durable offset with the specs of the shards ending at or before it (one row, one
        write: a restart never finds one without the other), unless a newer stream of the same
        upload has replaced ``session``."""
        with self._lock:
            current = self._sessions.get(session.upload_id)
            if current is not None and current is not session:
                return
            upload = self._store.get(UploadRecord, session.upload_id)
            if upload is not None and upload.state is UploadState.RECEIVING:
                upload.committed_offset = offset
                upload.shards = shards_to_bytes(shards)
                with self._store.transaction():
                    self._store.put(upload)

    def round_accepts(self, round_number: int) -> bool:
        """``RunState.round_accepts``, for the sessions: no lock and no query (called for every chunk)."""
        return self._state.round_accepts(round_number)

    def accept_upload(self, session: UploadSession, seconds: float) -> Receipt:
        """Count a fully received and folded upload, durably, exactly once."""
        with self._lock:
            self._forget(session)
            record = self._store.get(UploadRecord, session.upload_id)
            assert record is not None
            if record.state is UploadState.ACCEPTED:
                return Receipt(record.upload_id, record.round, record.total_bytes, True, True)
            if not self._state.round_accepts(record.round) or not session.acc.accept(
                record.upload_id, record.sample_count
            ):
                raise RoundClosed(
                    f"round {record.round} closed before upload {record.upload_id!r} finished",
                    field="round",
                    metadata={"round": str(record.round)},
                )
            seq = len(self._state.accepted_records(record.round)) + 1
            layout = session.layout
            record.state = UploadState.ACCEPTED
            record.seq = seq
            # What the close reads the spool back by (server.spooled): the robust rules, a rebuild.
            record.layout = layout_to_bytes(layout)
            record.shards = b""  # the layout holds them
            record.total_bytes = layout.total_bytes
            record.committed_offset = record.total_bytes
            record.accepted_ms = self._state.now_ms()
            record.upload_seconds = seconds
            current = self._state.current_round()
            assert current is not None
            current.bytes_in += record.total_bytes
            with self._store.transaction():
                self._store.put(record)
                self._store.put(current)
            logger.info(
                "[upload] round=%d site=%s upload=%s accepted (#%d, %d samples, %d bytes, %.2fs)",
                record.round,
                record.site_id,
                record.upload_id,
                seq,
                record.sample_count,
                record.total_bytes,
                seconds,
            )
            self._metrics("bytes_in", record.total_bytes)
            self._metrics("upload_seconds", seconds)
            self._emit(
                "upload_accepted", round_number=record.round, site_id=record.site_id, detail=record.upload_id
            )
            self._changed.notify_all()
            self._state.wake()
            return Receipt(record.upload_id, record.round, record.total_bytes, True, False)

    def reject_upload(self, session: UploadSession, error: GdfedError) -> None:
        with self._lock:
            self._forget(session)
            record = self._store.get(UploadRecord, session.upload_id)
            if record is not None and record.state is UploadState.RECEIVING:
                record.state = UploadState.REJECTED
                record.reason = error.message
                self._store.put(record)
            logger.warning(
                "[upload] round=%d site=%s upload=%s rejected: %s",
                session.round,
                session.site_id,
                session.upload_id,
                error.message,
            )
            self._emit(
                "upload_rejected", round_number=session.round, site_id=session.site_id, detail=error.message
            )
            self._metrics("upload_refused", 1, refusal_reason(error))

    def end_session(self, session: UploadSession) -> None:
        with self._lock:
            self._forget(session)

    def _forget(self, session: UploadSession) -> None:
        # Only the current stream of an upload may remove it; a superseded one must not.
        if self._sessions.get(session.upload_id) is session:
            del self._sessions[session.upload_id]
            self._changed.notify_all()  # stop() waits for the sessions to end

    @property
    def receiving(self) -> int:
        """How many uploads are being received now (read under the lock)."""
        return len(self._sessions)

    def session(self, upload_id: str) -> UploadSession | None:
        """The stream receiving ``upload_id`` now, if any."""
        with self._lock:
            return self._sessions.get(upload_id)

    def drain(self, reason: str, timeout_s: float) -> None:
        """Stop every upload and wait up to ``timeout_s`` for their handlers to commit and end."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self.cancel_all(reason)
            while self._sessions and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
            if self._sessions:
                logger.warning("[serve] %d upload(s) still receiving at shutdown", len(self._sessions))
            self._changed.notify_all()

    def cancel_site(self, site_id: str, reason: str) -> None:
        """Stop the uploads of ``site_id`` that are being received (caller holds the lock)."""
        for session in list(self._sessions.values()):
            if session.site_id == site_id:
                session.cancel(reason)

    def cancel_all(self, reason: str) -> None:
        """Stop every upload being received (caller holds the lock)."""
        for session in list(self._sessions.values()):
            session.cancel(reason)


def _foreign(upload_id: str) -> GdfedError:
    return PermissionDenied(
        f"upload {upload_id!r} belongs to another site", field="upload_id", reason="UPLOAD_OWNER_MISMATCH"
    )


def _check_round_codec(sent: Codec, round_codec: Codec) -> None:
    """Refuse an upload whose lossy stages differ from the round's ``TrainingSpec.upload_codec``.

    The cast, the lossy form and the top-k fraction decide what the aggregate is made of, so they
    are the round's; a site that picked its own would silently send a lossier update. Block size,
    byte shuffle and zstd level change only how the same values are packed (``validate_codec``
    bounds them), so they are the sender's to choose.
    """
    for field, got, expected in (
        ("codec.cast", sent.cast, round_codec.cast),
        ("codec.lossy", sent.lossy, round_codec.lossy),
        ("codec.topk_fraction", sent.topk_fraction, round_codec.topk_fraction),
    ):
        if got != expected:
            raise InvalidArgument(
                f"{field} is {_codec_value(got)}; the round's upload codec "
                f"(RoundSpec.training.upload_codec) says {_codec_value(expected)}",
                field=field,
                reason="CODEC_MISMATCH",
                metadata={"expected": _codec_value(expected), "got": _codec_value(got)},
            )


def _codec_value(value: Cast | Lossy | float) -> str:
    return value.name.lower() if isinstance(value, Cast | Lossy) else repr(value)
