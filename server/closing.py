"""Closing a round: stop its intake, turn its uploads into the next global state, record it.

    close(record, reason)   OPEN/TRAINING/COLLECTING -> AGGREGATING   (under the lock)
    aggregate(round)        AGGREGATING -> PUBLISHED, or FAILED        (outside it: this takes a while)
    fail(record, reason)    any open state -> FAILED                   (under the lock)

Methods whose uploads fold as they stream in (GradualDiff-Fed, FedCyBGD) have
their sum rebuilt from the accepted spools if it is not exactly theirs, then
published through the server optimizer; the others (FlexLoRA) hand the round
to their plan's ``next_state`` hook. Opening the next round is the round
loop's job, not this module's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from safetensors.torch import load_file, save_file

from common.buffers import ReusableBuffer
from common.delta import TensorSpec
from common.serde import header_from_bytes
from common.statefile import StateReader
from server import rounds
from server.accumulation import Accumulation
from server.blobs import BlobStore
from server.collector import collect_garbage
from server.config import ServerConfig
from server.methods import RoundUpload
from server.optimizers import ServerOptimizer, make_optimizer
from server.publish import Published, publish, publish_diff, rebuild
from server.records import RoundRecord, RoundState, SiteRecord, UploadRecord
from server.run_state import RunState
from server.spool import Spool

logger = logging.getLogger(__name__)


class Closing:
    """Ends rounds: to AGGREGATING, then PUBLISHED or FAILED; owns the server optimizer's state.

    Given the ``state``; the ``config`` (accumulator precision, broadcast codec, rounds to run,
    states to keep); the run's ``blobs`` and ``spool``; the ``manifest`` of the trainable state;
    and ``snapshot_estimate`` (``Fetching.snapshot_estimate``), which the collector judges
    chains of differences against.
    """

    def __init__(
        self,
        *,
        state: RunState,
        config: ServerConfig,
        blobs: BlobStore,
        spool: Spool,
        manifest: Sequence[TensorSpec],
        snapshot_estimate: Callable[[RoundRecord], int],
    ) -> None:
        self._state = state
        self._config = config
        self._blobs = blobs
        self._spool = spool
        self.manifest = tuple(manifest)
        self._snapshot_estimate = snapshot_estimate
        # Kept from round to round: the running sum's memory, and the buffer publication reads the
        # previous state into (common.buffers: fresh memory costs page faults every round).
        self._sum_memory = ReusableBuffer()
        self._read_memory = ReusableBuffer()
        self.optimizer = self._load_optimizer()

    def start_sum(self, round_number: int) -> Accumulation:
        """An empty running sum for ``round_number``, in the memory the last round's sum used."""
        plan = self._state.plan
        return Accumulation(
            round_number,
            self.manifest,
            self._config.accumulator,
            summing=plan.streaming_fold,
            uniform=plan.uniform_weights,
            memory=self._sum_memory,
        )

    def close(self, record: RoundRecord, reason: str) -> None:
        """Stop the round's intake and move it to AGGREGATING (caller holds the lock)."""
        state = self._state
        record.state = rounds.advance(record.state, RoundState.AGGREGATING)
        state.set_open_round(0)
        record.closed_ms = state.now_ms()
        record.close_reason = reason
        state.store.put(record)
        if state.acc is not None:
            state.acc.detach()
        logger.info("[round] round=%d closed (%s)", record.round, reason)
        state.emit("round_closed", round_number=record.round, state=record.state, detail=reason)
        state.changed.notify_all()

    def fail(self, record: RoundRecord, reason: str, *, kind: str) -> None:
        """End the round without aggregating it (caller holds the lock); ``kind`` is its word in
        ``server.reasons.FAILURE_REASONS``, for the metrics."""
        state = self._state
        record.state = rounds.advance(record.state, RoundState.FAILED)
        state.set_open_round(0)
        record.closed_ms = state.now_ms()
        record.failure_reason = reason
        with state.store.transaction():
            state.store.put(record)
            state.abandon_uploads(record.round, "the round failed")
        if state.acc is not None:
            state.acc.detach()
        logger.warning("[round] round=%d failed: %s", record.round, reason)
        state.observe("round_failed", 1, kind)
        state.emit("round_failed", round_number=record.round, state=RoundState.FAILED, detail=reason)
        state.changed.notify_all()

    def aggregate(self, round_number: int) -> None:
        """Turn the closed round into a published one, or a failed one (not under the lock)."""
        state = self._state
        record = state.store.get(RoundRecord, round_number)
        assert record is not None and record.state is RoundState.AGGREGATING
        accepted = state.accepted_records(round_number)
        if not accepted:
            with state.lock:
                self.fail(record, "no accepted uploads when the round closed", kind="no_uploads")
            return
        try:
            result = (
                self._publish_folded(accepted) if state.plan.streaming_fold else self._publish_next(accepted)
            )
        except Exception as exc:
            logger.exception("[round] round=%d aggregation failed", round_number)
            with state.lock:
                self.optimizer = self._load_optimizer()  # drop half-applied optimizer steps
                self.fail(record, f"aggregation failed: {exc}", kind="aggregation")
            return
        self._record_published(record, accepted, result)

    def _publish_folded(self, accepted: list[UploadRecord]) -> Published:
        """The round's running sum (rebuilt from the spools if it is not exactly the accepted
        uploads'), averaged and stepped by the server optimizer."""
        state = self._state
        round_number = accepted[0].round
        acc = state.acc
        accepted_ids = [u.upload_id for u in accepted]
        if acc is None or acc.round != round_number or acc.dirty or acc.accepted != accepted_ids:
            logger.info(
                "[round] round=%d rebuilding the sum from %d accepted spool(s)", round_number, len(accepted)
            )
            if acc is not None and acc.round == round_number:
                acc.release()  # replaced by the rebuilt sum, which may reuse its memory
            acc = Accumulation(
                round_number,
                self.manifest,
                self._config.accumulator,
                uniform=state.plan.uniform_weights,
                memory=self._sum_memory,
            )
            rebuild(acc, [(u.upload_id, header_from_bytes(u.header)) for u in accepted], self._spool)
        previous = state.latest_published()
        try:
            return publish(
                acc=acc,
                optimizer=self.optimizer,
                blobs=self._blobs,
                previous_state=previous.state_blob,
                run_id=state.run.run_id,
                round_number=round_number,
                base_round=previous.round,
                broadcast=self._config.broadcast_codec,
                scratch=self._read_memory,
            )
        finally:
            acc.release()

    def _publish_next(self, accepted: list[UploadRecord]) -> Published:
        """The plan's next state from the round's uploads (FlexLoRA: the SVD of the full-size ΔW)."""
        state = self._state
        start = time.perf_counter()
        previous = state.latest_published()
        ranks = {s.site_id: s.lora_rank for s in state.store.select(SiteRecord)}
        uploads = [
            RoundUpload(
                upload_id=u.upload_id,
                header=header_from_bytes(u.header),
                sample_count=u.sample_count,
                declared_rank=ranks.get(u.site_id, 0),
            )
            for u in accepted
        ]
        reader = StateReader(self._blobs.path(previous.state_blob))
        next_state = state.plan.next_state(reader, uploads, self._spool)
        diff = {name: tensor.sub_(reader.read(name)) for name, tensor in next_state.items()}
        return publish_diff(
            diff,
            blobs=self._blobs,
            previous_state=previous.state_blob,
            run_id=state.run.run_id,
            round_number=accepted[0].round,
            base_round=previous.round,
            broadcast=self._config.broadcast_codec,
            started=start,
        )

    def _record_published(self, record: RoundRecord, accepted: list[UploadRecord], result: Published) -> None:
        state = self._state
        optimizer_blob = self._save_optimizer()
        samples = sum(u.sample_count for u in accepted)
        with state.lock:
            record.state = rounds.advance(record.state, RoundState.PUBLISHED)
            record.published_ms = state.now_ms()
            record.samples = samples
            record.diff_blob = result.diff.blob
            record.diff_header = result.diff.header
            record.diff_bytes = result.diff.nbytes
            record.state_blob = result.state_blob
            record.aggregate_seconds = result.seconds
            record.mean_train_loss = sum(u.train_loss * u.sample_count for u in accepted) / samples
            record.mean_eval_loss = sum(u.eval_loss * u.sample_count for u in accepted) / samples
            run = state.run
            with state.store.transaction():
                state.store.put(record)
                run.optimizer_blob = optimizer_blob
                if self._config.rounds and record.round >= self._config.rounds:
                    run.finished = True
                state.store.put(run)
                state.abandon_uploads(record.round, "the round closed before this upload finished")
            state.acc = None
            for upload in state.store.select(UploadRecord, "round = ?", (record.round,)):
                self._spool.delete(upload.upload_id)
            collect_garbage(
                store=state.store,
                blobs=self._blobs,
                keep_states=self._config.keep_states,
                snapshot_estimate=self._snapshot_estimate,
            )
            full_bytes = sum(t.numel * 4 for t in self.manifest)
            logger.info(
                "[round] round=%d published: %d upload(s), %d samples, diff %d bytes (%.3f of fp32), %.2fs",
                record.round,
                len(accepted),
                samples,
                record.diff_bytes,
                record.diff_bytes / max(1, full_bytes),
                result.seconds,
            )
            state.observe("aggregate_seconds", result.seconds)
            state.emit("round_published", round_number=record.round, state=RoundState.PUBLISHED)
            if run.finished:
                logger.info("[run] run=%s finished after %d rounds", run.run_id, record.round)
                state.emit("run_finished", round_number=record.round)
            state.changed.notify_all()

    def _load_optimizer(self) -> ServerOptimizer:
        opt = self._config.optimizer
        optimizer = make_optimizer(opt.name, **opt.params())
        if self._state.run.optimizer_blob:
            optimizer.load_state_dict(load_file(self._blobs.path(self._state.run.optimizer_blob)))
        return optimizer

    def _save_optimizer(self) -> str:
        state = self.optimizer.state_dict()
        if not state:
            return ""
        temp = self._blobs.temp_path(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(temp))
        return self._blobs.adopt(temp)
