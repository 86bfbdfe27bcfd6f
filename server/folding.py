"""The fold worker: decodes complete shards from the upload spools and folds them into the round's sum.

One thread serves every upload, in the order their shards complete, so the
aggregator's memory stays flat however many sites upload at once: uploads
wait on disk (the spool), not in RAM. While one shard's pieces are folded
the next shard is already decoding on the codec pool.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.codec.decoder import PendingShard, ShardDecoder
from common.delta import PayloadSpec, ShardSpec
from common.errors import GdfedError
from server.accumulation import Accumulation
from server.spool import Spool

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FoldJob:
    """Shard ``shard`` of upload ``upload_id`` (its spec ``spec``, accepted with the chunk that
    ended it), ready in the spool at ``[begin, begin + spec.compressed_bytes)``."""

    upload_id: str
    round: int
    shard: int
    spec: ShardSpec
    begin: int
    weight: int
    payload: PayloadSpec
    decoder: ShardDecoder
    acc: Accumulation
    done: Callable[[int, GdfedError | None], None]  # called with (shard, error) once folded or failed


class FoldWorker:
    """A single thread folding shards in arrival order."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        # Two sets of buffers: one shard decodes while the previous one folds.
        self._data = [bytearray(), bytearray()]
        self._scratch = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        self._turn = 0
        self._queue: queue.Queue[FoldJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gdfed-fold", daemon=True)
        self._thread.start()

    def submit(self, job: FoldJob) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        pending: tuple[FoldJob, PendingShard] | None = None
        while True:
            if pending is None:
                job = self._queue.get()
            else:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    self._finish(*pending)
                    pending = None
                    continue
            if job is None:
                if pending is not None:
                    self._finish(*pending)
                return
            started = self._start(job)
            if pending is not None:
                self._finish(*pending)
            pending = started

    def _start(self, job: FoldJob) -> tuple[FoldJob, PendingShard] | None:
        try:
            if job.acc.detached or job.acc.check_refold(job.upload_id, job.shard, job.spec.digest):
                job.done(job.shard, None)
                return None
            # Reused buffers: fresh ones would cost a page fault per 4 KiB on every shard.
            turn = self._turn = 1 - self._turn
            size = job.spec.compressed_bytes
            if len(self._data[turn]) < size:
                self._data[turn] = bytearray(size)
            data = memoryview(self._data[turn])[:size]
            self._spool.read_into(job.upload_id, job.begin, data)
            need = job.decoder.scratch_bytes(job.spec)
            if self._scratch[turn].size < need:
                self._scratch[turn] = np.empty(need, dtype=np.uint8)
            return job, job.decoder.start(job.shard, job.spec, data, scratch=self._scratch[turn])
        except GdfedError as exc:
            job.done(job.shard, exc)
        except Exception as exc:  # a bug or an I/O error must not kill the worker
            logger.exception("[fold] round=%d upload=%s shard=%d failed", job.round, job.upload_id, job.shard)
            job.done(job.shard, GdfedError(f"shard {job.shard} could not be read back: {exc}"))
        return None

    def _finish(self, job: FoldJob, pending: PendingShard) -> None:
        try:
            pieces = pending.result()
            job.acc.fold(job.upload_id, job.shard, pieces, job.weight, job.payload, digest=job.spec.digest)
            job.done(job.shard, None)
        except GdfedError as exc:
            job.done(job.shard, exc)
        except Exception as exc:
            logger.exception("[fold] round=%d upload=%s shard=%d failed", job.round, job.upload_id, job.shard)
            job.done(job.shard, GdfedError(f"shard {job.shard} failed to fold: {exc}"))
