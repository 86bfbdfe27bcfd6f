"""One upload being received: chunks checked and spooled, shards handed to the fold worker.

The session is driven by the PushDelta handler thread: ``receive`` for each
chunk, then ``complete`` (wait for the folds, then accept) or ``interrupt``
(the stream broke: make what arrived durable so the worker can resume).
Memory per session is one chunk: the spool on disk is the buffer.

Wire revision 2 sends each shard's spec with the chunk that ends it: the
``ChunkVerifier`` accepts it there, and that shard's fold job is submitted.
The specs accepted so far are recorded with every committed offset (those of
shards ending at or before it), so that a resume, after an aggregator restart
too, verifies the rest against them and folds each earlier shard once.

A full disk (the spool's or the store's) is answered RESOURCE_EXHAUSTED, with
what was received kept for a resume once there is room again.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Protocol, TypeVar

from common.codec.chunks import ChunkVerifier
from common.codec.decoder import ShardDecoder
from common.codec.layout import DecodeLimits
from common.delta import MIB, Chunk, DeltaHeader, PayloadLayout, ShardSpec
from common.errors import (
    GdfedError,
    LimitExceeded,
    MalformedShard,
    ManifestMismatch,
    RoundClosed,
    TruncatedStream,
)
from server.accumulation import Accumulation
from server.folding import FoldJob, FoldWorker
from server.records import UploadRecord
from server.spool import Spool

# fsync and record the resume offset at the end of a shard once this much is unsynced (a shard's
# end makes its spec durable with it, so a resume re-sends no part of it), and mid-shard at the
# latest after MAX_UNSYNCED: each commit costs an fsync and a SQLite transaction (0.21 CPU-s per
# decoded GB at 8 MiB commits, issue 19's profile).
COMMIT_EVERY = 8 * MIB
MAX_UNSYNCED = 64 * MIB

logger = logging.getLogger(__name__)
T = TypeVar("T")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full: a file's write, or the store's."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """A full disk as RESOURCE_EXHAUSTED (the sender retries later), not INTERNAL with a traceback."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc):
            raise
        logger.warning("[upload] %s: the aggregator's disk is full (%s)", what, exc)
        raise LimitExceeded(
            f"{what}: the aggregator's disk is full; what was received is kept, resume the upload "
            "later (the operator must free space)",
            field="disk",
            reason="DISK_FULL",
        ) from None


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the aggregator answers an upload with once it is counted (or found counted already)."""

    upload_id: str
    round: int
    bytes_received: int
    accepted: bool
    duplicate: bool


class SessionOwner(Protocol):
    """What a session reports to (``server.intake.Intake``): offsets, acceptance, rejection, its end."""

    def round_accepts(self, round_number: int) -> bool: ...
    def commit_offset(self, session: UploadSession, offset: int, shards: Sequence[ShardSpec]) -> None: ...
    def accept_upload(self, session: UploadSession, seconds: float) -> Receipt: ...
    def reject_upload(self, session: UploadSession, error: GdfedError) -> None: ...
    def end_session(self, session: UploadSession) -> None: ...


class UploadSession:
    """Receives one upload stream (or the resumed rest of one)."""

    def __init__(
        self,
        *,
        intake: SessionOwner,
        record: UploadRecord,
        header: DeltaHeader,
        acc: Accumulation,
        spool: Spool,
        folder: FoldWorker,
        start: int,
        shards: Sequence[ShardSpec],
        limits: DecodeLimits,
    ) -> None:
        """``shards``: the specs of the shards that end at or before ``start`` (recorded with it);
        ``limits.max_total_bytes`` is the aggregator's max_upload_bytes."""
        self.upload_id = record.upload_id
        self.site_id = record.site_id
        self.round = record.round
        self.acc = acc
        self._intake = intake
        self._header = header
        self._spool = spool
        self._folder = folder
        self._max_bytes = limits.max_total_bytes
        self._decoder = ShardDecoder(header.spec)
        self._verifier = ChunkVerifier(header.spec, limits=limits, start=start, shards=shards)
        self._writer = spool.open_at(record.upload_id, start)
        self._cond = threading.Condition()
        self._outstanding = 0
        self._failure: GdfedError | None = None
        self._cancelled = ""
        self._started = time.monotonic()
        self.bytes_received = 0
        # The shards before ``start`` are in the spool: folded now (the fold worker skips those
        # this round's sum already holds, so a resume without a restart folds none twice).
        for index in range(len(self._verifier.shards)):
            self._submit(index)

    def receive(self, chunk: Chunk) -> None:
        """Check, spool and (when a shard completes) hand on one chunk; raise on any problem.

        ``chunk.data`` may be a view of the received message: it is written and not kept.
        """
        self._raise_if_stopped()
        end = chunk.offset + len(chunk.data)
        if chunk.offset == self._verifier.offset and end > self._max_bytes:
            raise LimitExceeded(
                f"the upload reaches {end} bytes at offset {chunk.offset}; the limit is {self._max_bytes} "
                "(max_upload_bytes, JoinReply.max_upload_bytes)",
                field="offset",
                limit=self._max_bytes,
                reason="UPLOAD_TOO_LARGE",
            )
        try:
            completed = self._verifier.check(chunk)
        except (MalformedShard, ManifestMismatch) as exc:
            # The sender's own account of its payload (a shard spec, the manifest's coverage) does
            # not add up: sending the same upload again cannot mend it, so it is rejected, not resumed.
            with self._cond:
                if self._failure is None:
                    self._failure = exc
            raise
        with storage_errors(f"upload {self.upload_id!r}"):
            self._writer.write(chunk.data)
            self.bytes_received += len(chunk.data)
            unsynced = self._writer.offset - self._writer.synced
            if unsynced >= MAX_UNSYNCED or (completed is not None and unsynced >= COMMIT_EVERY):
                self._commit()
            if completed is not None:
                self._writer.flush()  # the fold worker reads the shard back from the file
                self._submit(completed)

    @property
    def layout(self) -> PayloadLayout:
        """The upload's full layout, once its last chunk has been received."""
        layout = self._verifier.layout
        assert layout is not None, "the upload is not complete"
        return layout

    def complete(self) -> Receipt:
        """The stream ended: wait for every shard to fold, then have the upload accepted."""
        if not self._verifier.done:
            self.interrupt()
            raise TruncatedStream(
                f"the stream ended at offset {self._verifier.offset} before its last chunk; "
                f"resume from {self._writer.synced}",
                field="offset",
            )
        try:
            with storage_errors(f"upload {self.upload_id!r}"):
                self._writer.finish()
        except GdfedError:
            self.interrupt()
            raise
        self._writer.close()
        with self._cond:
            while self._outstanding and not self._failure and not self._cancelled:
                self._cond.wait(0.5)
                if not self._intake.round_accepts(self.round):
                    break
        try:
            self._raise_if_stopped()
        except GdfedError as exc:
            self._intake.end_session(self)
            if not isinstance(exc, RoundClosed):
                self._intake.reject_upload(self, exc)
            raise
        self._note_influence()
        return self._guarded(lambda: self._intake.accept_upload(self, time.monotonic() - self._started))

    def _note_influence(self) -> None:
        """Log an upload the round's bounds clip or flag (server.influence)."""
        norm, bounds = self.acc.norm(self.upload_id), self.acc.bounds
        if bounds.is_outlier(norm):
            logger.warning(
                "[upload] round=%d site=%s upload=%s is an outlier: norm %.4g is %.1fx the median %.4g "
                "of recent uploads (influence.outlier_factor %.4g)",
                self.round,
                self.site_id,
                self.upload_id,
                norm,
                norm / bounds.median,
                bounds.median,
                bounds.outlier_factor,
            )
        if self.acc.summing and bounds.scale(norm) < 1.0:
            logger.info(
                "[upload] round=%d site=%s upload=%s clipped: norm %.4g scaled to the bound %.4g",
                self.round,
                self.site_id,
                self.upload_id,
                norm,
                bounds.clip,
            )

    def _guarded(self, call: Callable[[], T]) -> T:
        with storage_errors(f"upload {self.upload_id!r}"):
            return call()

    def interrupt(self) -> None:
        """The stream broke off: make the received bytes durable and record where to resume."""
        try:
            self._commit()
            self._writer.close()
        except Exception as exc:
            if not disk_full(exc):
                raise
            # Resumed from the last offset recorded: what is past it is received again.
            logger.warning("[upload] upload=%s: could not commit on a full disk (%s)", self.upload_id, exc)
            with suppress(OSError):  # closing flushes the same unwritable buffer
                self._writer.close()
        finally:
            self._intake.end_session(self)

    def fail(self, error: GdfedError) -> None:
        """A chunk was refused: the upload is rejected for good."""
        self._writer.close()
        self._intake.reject_upload(self, error)

    @property
    def failed(self) -> bool:
        """Whether a shard failed to decode: the upload itself is bad, not just its stream."""
        return self._failure is not None

    def cancel(self, reason: str) -> None:
        with self._cond:
            self._cancelled = reason
            self._cond.notify_all()

    def _commit(self) -> None:
        offset = self._writer.sync()
        # A shard past the durable offset is received again, its spec with it.
        shards = self._verifier.shards
        durable = [
            s for i, s in enumerate(shards) if self._verifier.shard_begin(i) + s.compressed_bytes <= offset
        ]
        self._intake.commit_offset(self, offset, durable)

    def _raise_if_stopped(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._cancelled:
            raise RoundClosed(
                f"upload {self.upload_id!r} stopped: {self._cancelled}",
                field="upload_id",
                reason="UPLOAD_CANCELLED",
            )
        if not self._intake.round_accepts(self.round):
            raise RoundClosed(
                f"round {self.round} closed before upload {self.upload_id!r} finished",
                field="round",
                metadata={"round": str(self.round)},
            )

    def _submit(self, index: int) -> None:
        with self._cond:
            self._outstanding += 1
        self._folder.submit(
            FoldJob(
                upload_id=self.upload_id,
                round=self.round,
                shard=index,
                spec=self._verifier.shards[index],
                begin=self._verifier.shard_begin(index),
                weight=self._header.sample_count,
                payload=self._header.spec,
                decoder=self._decoder,
                acc=self.acc,
                done=self._folded,
            )
        )

    def _folded(self, shard: int, error: GdfedError | None) -> None:
        with self._cond:
            self._outstanding -= 1
            if error is not None and self._failure is None:
                self._failure = error
            self._cond.notify_all()
