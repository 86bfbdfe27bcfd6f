"""Closing a round: stop its intake, turn its uploads into the next global state, record it.

    close(record, reason)   OPEN/TRAINING/COLLECTING -> AGGREGATING   (under the lock)
    aggregate(round)        AGGREGATING -> PUBLISHED, or FAILED        (outside it: this takes a while)
    fail(record, reason)    any open state -> FAILED                   (under the lock)
    retry(round)            FAILED (latest round, uploads kept) -> AGGREGATING   (under the lock)

A publication that raises (an I/O error, a full disk) leaves the round
AGGREGATING, its accepted uploads recorded and spooled: the round loop tries
again after a backoff (``retry_due``), across restarts too. Only the
``[publish] max_attempts`` policy fails it, and then its uploads are kept and
the run paused, so that ``gdfed admin retry-round`` can aggregate it again.

Methods whose uploads fold as they stream in (GradualDiff-Fed, FedCyBGD) have
their sum rebuilt from the accepted spools if it is not exactly theirs, then
published through the server optimizer, with client-level DP noise added to the
mean when ``[privacy]`` asks (server.privacy); under a robust rule
(``[aggregation]``, server.robust) the mean delta is computed from the spools
instead. The others (FlexLoRA) hand the round to their plan's ``next_state``
hook. Opening the next round is the round loop's job, not this module's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from safetensors.torch import load_file, save_file

from common.buffers import ReusableBuffer
from common.delta import TensorSpec
from common.errors import FailedPrecondition, NotFound
from common.statefile import StateReader
from server import rounds
from server.accumulation import Accumulation
from server.blobs import BlobStore
from server.collector import collect_garbage
from server.config import AggregationRule, ServerConfig
from server.influence import RoundBounds, recent_norms, round_bounds
from server.methods import RoundUpload
from server.optimizers import ServerOptimizer, make_optimizer
from server.privacy import RoundNoise, load_secret, noised, round_privacy
from server.publish import Published, publish_diff, rebuild
from server.records import RoundRecord, RoundState, SiteRecord, UploadRecord
from server.robust import Combined, ranked_uploads, robust_means, trim_per_side
from server.run_state import RunState
from server.spool import Spool
from server.spooled import spooled_upload

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
        self._optimizer_stale = False  # a failed publication may have stepped it part way
        self._busy = threading.Lock()  # one publication at a time (the loop, close-round's tick)
        self._attempts: dict[int, int] = {}  # failed publications per round (since the start)
        self._next_try: dict[int, float] = {}  # monotonic time of a round's next attempt
        self._secret = load_secret(config.state_dir) if config.privacy.enabled else b""
        # The round's sum is the mean rule's; DP gives each clipped upload the same weight.
        self._summing = state.plan.streaming_fold and config.aggregation.rule is AggregationRule.MEAN
        self._uniform = state.plan.uniform_weights or config.privacy.enabled

    def bounds(self, round_number: int) -> RoundBounds:
        """The round's bounds on an upload's norm, from the config and the earlier rounds' norms."""
        cfg = self._config.influence
        wanted = cfg.adaptive > 0 or cfg.outlier_factor > 0
        history = recent_norms(self._state.store, round_number, cfg.history) if wanted else []
        return round_bounds(cfg, history)

    def start_sum(self, round_number: int) -> Accumulation:
        """An empty running sum for ``round_number``, in the memory the last round's sum used."""
        plan = self._state.plan
        return Accumulation(
            round_number,
            self.manifest,
            self._config.accumulator,
            summing=self._summing,
            checked=plan.streaming_fold,
            uniform=self._uniform,
            memory=self._sum_memory,
            bounds=self.bounds(round_number),
        )

    def retry_due(self, round_number: int) -> bool:
        """Whether the aggregating round may be tried (again) now: no attempt running, backoff over."""
        return not self._busy.locked() and time.monotonic() >= self._next_try.get(round_number, 0.0)

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
        """Try to publish the closed round (not under the lock): PUBLISHED; still AGGREGATING, to be
        tried again after a backoff; or FAILED (no uploads, or the attempts policy spent)."""
        if not self._busy.acquire(blocking=False):
            return  # another thread is publishing it
        try:
            self._aggregate(round_number)
        finally:
            self._busy.release()

    def _aggregate(self, round_number: int) -> None:
        state = self._state
        record = state.store.get(RoundRecord, round_number)
        if record is None or record.state is not RoundState.AGGREGATING:
            return  # published or failed meanwhile
        accepted = state.accepted_records(round_number)
        if not accepted:
            with state.lock:
                self.fail(record, "no accepted uploads when the round closed", kind="no_uploads")
            return
        try:
            if self._optimizer_stale:
                self.optimizer = self._load_optimizer()  # drop half-applied optimizer steps
                self._optimizer_stale = False
            if not state.plan.streaming_fold:
                norms, result, combined = self._publish_next(accepted)
            elif self._summing:
                norms, result, combined = self._publish_folded(accepted)
            else:
                norms, result, combined = self._publish_robust(accepted)
            self._record_published(record, accepted, result, norms, combined)
        except Exception as exc:
            self._optimizer_stale = True
            self._publication_failed(round_number, len(accepted), exc)
            return
        self._attempts.pop(round_number, None)
        self._next_try.pop(round_number, None)

    def _publication_failed(self, round_number: int, uploads: int, exc: Exception) -> None:
        """Log the cause; schedule the next attempt, or fail the round if the policy says so."""
        state = self._state
        policy = self._config.publish
        attempt = self._attempts[round_number] = self._attempts.get(round_number, 0) + 1
        cause = f"{type(exc).__name__}: {exc}"
        with state.lock:
            if state.acc is not None and state.acc.round == round_number:
                state.acc = None  # spent or part-built: the next attempt rebuilds it from the spools
        if policy.max_attempts and attempt >= policy.max_attempts:
            logger.error(
                "[round] round=%d publication failed %d time(s), the policy's limit: %s",
                round_number,
                attempt,
                cause,
                exc_info=exc,
            )
            with state.lock:
                self._give_up(round_number, attempt, uploads, cause)
            return
        wait = min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s)
        self._next_try[round_number] = time.monotonic() + wait
        # The traceback once; the cause every time, so the log shows whether it changed.
        logger.error(
            "[round] round=%d publication attempt %d failed (%s); its %d accepted upload(s) are kept, "
            "trying again in %.1fs",
            round_number,
            attempt,
            cause,
            uploads,
            wait,
            exc_info=exc if attempt == 1 else None,
        )
        try:
            with state.lock:
                record = state.store.get(RoundRecord, round_number)
                if record is not None and record.state is RoundState.AGGREGATING:
                    record.failure_reason = f"publication attempt {attempt} failed ({cause}); retrying"
                    state.store.put(record)
        except Exception as again:  # the store may be on the same full disk
            logger.warning("[round] round=%d could not record the failure: %s", round_number, again)

    def _give_up(self, round_number: int, attempts: int, uploads: int, cause: str) -> None:
        """FAILED by the attempts policy (caller holds the lock): uploads kept, the run paused."""
        state = self._state
        record = state.store.get(RoundRecord, round_number)
        if record is None or record.state is not RoundState.AGGREGATING:
            return
        record.state = rounds.advance(record.state, RoundState.FAILED)
        record.failure_reason = (
            f"publication failed {attempts} time(s), last: {cause}; its {uploads} accepted upload(s) "
            f"are kept: `gdfed admin retry-round {round_number}` aggregates them again"
        )
        run = replace(
            state.run,
            paused=True,
            pause_reason=f"round {round_number} failed to publish; retry-round {round_number}, "
            "or resume to go on without it",
        )
        with state.store.transaction():
            state.store.put(record)
            state.store.put(run)
            state.abandon_uploads(round_number, "the round failed")
        state.run.paused, state.run.pause_reason = run.paused, run.pause_reason
        state.observe("round_failed", 1, "aggregation")
        state.emit("round_failed", round_number=round_number, state=RoundState.FAILED, detail=cause)
        state.changed.notify_all()

    def retry(self, round_number: int) -> int:
        """Aggregate the failed round again from its accepted uploads (caller holds the lock); the
        number of uploads. Only the run's latest round: a later one was built on another state."""
        state = self._state
        record = state.store.get(RoundRecord, round_number)
        if record is None:
            raise NotFound(f"round {round_number} does not exist", field="round")
        if record.state is RoundState.AGGREGATING:
            self._next_try.pop(round_number, None)  # try now, not after the backoff
            return len(state.accepted_records(round_number))
        if record.state is not RoundState.FAILED:
            raise FailedPrecondition(
                f"round {round_number} is {record.state.name.lower()}; only a failed round can be retried",
                field="round",
            )
        if round_number != state.run.current_round:
            raise FailedPrecondition(
                f"round {round_number} is not the latest round ({state.run.current_round}): a later "
                "round started from the state before it, so it can no longer be published",
                field="round",
            )
        accepted = state.accepted_records(round_number)
        if not accepted:
            raise FailedPrecondition(
                f"round {round_number} has no accepted uploads to aggregate", field="round"
            )
        missing = [u.upload_id for u in accepted if not self._spool.path(u.upload_id).exists()]
        if missing:
            raise FailedPrecondition(
                f"round {round_number}: the spools of {len(missing)} accepted upload(s) are gone "
                f"(first: {missing[0]!r}); it cannot be aggregated again",
                field="round",
            )
        # FAILED is final to the round loop (server.rounds); only the operator brings a round back.
        record.state = RoundState.AGGREGATING
        record.failure_reason = ""
        run = state.run
        resume = run.paused and run.pause_reason.startswith(f"round {round_number} failed to publish")
        with state.store.transaction():
            state.store.put(record)
            if resume:
                state.store.put(replace(run, paused=False, pause_reason=""))
        if resume:
            run.paused, run.pause_reason = False, ""
        self._attempts.pop(round_number, None)
        self._next_try.pop(round_number, None)
        logger.info(
            "[round] round=%d aggregating again, from %d accepted upload(s)", round_number, len(accepted)
        )
        state.changed.notify_all()
        state.wake()
        return len(accepted)

    def _publish_folded(self, accepted: list[UploadRecord]) -> tuple[dict[str, float], Published, Combined]:
        """The round's running sum (rebuilt from the spools if it is not exactly the accepted
        uploads', or an upload must be clipped), averaged, noised (DP), stepped by the server
        optimizer; with the uploads' norms."""
        state = self._state
        round_number = accepted[0].round
        acc = state.acc
        accepted_ids = [u.upload_id for u in accepted]
        if acc is None or acc.round != round_number or acc.dirty or acc.accepted != accepted_ids:
            logger.info(
                "[round] round=%d rebuilding the sum from %d accepted spool(s)", round_number, len(accepted)
            )
            norms: dict[str, float] = {}
            if acc is not None and acc.round == round_number:
                norms = {u: acc.norm(u) for u in acc.accepted}  # complete: no need to measure again
                acc.release()  # replaced by the rebuilt sum, which may reuse its memory
            acc = Accumulation(
                round_number,
                self.manifest,
                self._config.accumulator,
                uniform=self._uniform,
                memory=self._sum_memory,
                bounds=self.bounds(round_number),
            )
            with state.lock:
                state.acc = acc  # so that a failure below drops it (_publication_failed)
            rebuild(acc, [spooled_upload(u) for u in accepted], self._spool, norms)
        norms = acc.norms()
        privacy, noise = None, None
        if self._config.privacy.enabled:
            clip = self._config.influence.clip_norm
            privacy = round_privacy(self._config.privacy, clip, state.store, round_number, len(accepted))
            noise = RoundNoise(self._secret, state.run.run_id, round_number, privacy.noise_std)
        start = time.perf_counter()
        try:
            diff = {name: self.optimizer.step(name, mean) for name, mean in noised(acc.sum.mean(), noise)}
            published = publish_diff(
                diff, **self._target(round_number), started=start, scratch=self._read_memory
            )
            return norms, published, Combined(AggregationRule.MEAN.value, privacy=privacy)
        finally:
            acc.release()

    def _publish_robust(self, accepted: list[UploadRecord]) -> tuple[dict[str, float], Published, Combined]:
        """A robust rule's mean delta (server.robust) from the accepted spools, stepped by the server
        optimizer; with the uploads' norms (measured while they streamed in, or now)."""
        state = self._state
        round_number = accepted[0].round
        acc = state.acc
        norms = acc.norms() if acc is not None and acc.round == round_number else {}
        uploads = ranked_uploads(accepted, norms, self.bounds(round_number), self._spool, self.manifest)
        rule = self._config.aggregation
        start = time.perf_counter()
        means = robust_means(uploads, self._spool, self.manifest, rule)
        diff = {name: self.optimizer.step(name, mean) for name, mean in means}
        published = publish_diff(diff, **self._target(round_number), started=start, scratch=self._read_memory)
        return norms, published, Combined(rule.rule.value, trimmed=trim_per_side(rule, len(uploads)))

    def _target(self, round_number: int) -> dict[str, Any]:
        """Where round ``round_number``'s difference goes: publish_diff's arguments but the diff."""
        previous = self._state.latest_published()
        return {
            "blobs": self._blobs,
            "previous_state": previous.state_blob,
            "run_id": self._state.run.run_id,
            "round_number": round_number,
            "base_round": previous.round,
            "broadcast": self._config.broadcast_codec,
        }

    def _publish_next(self, accepted: list[UploadRecord]) -> tuple[dict[str, float], Published, Combined]:
        """The plan's next state from the round's uploads (FlexLoRA: the SVD of the full-size ΔW)."""
        state = self._state
        start = time.perf_counter()
        previous = state.latest_published()
        ranks = {s.site_id: s.lora_rank for s in state.store.select(SiteRecord)}
        uploads = [
            RoundUpload(
                upload_id=u.upload_id,
                layout=spooled_upload(u).layout,
                sample_count=u.sample_count,
                declared_rank=ranks.get(u.site_id, 0),
            )
            for u in accepted
        ]
        reader = StateReader(self._blobs.path(previous.state_blob))
        next_state = state.plan.next_state(reader, uploads, self._spool)
        diff = {name: tensor.sub_(reader.read(name)) for name, tensor in next_state.items()}
        acc = state.acc
        norms = acc.norms() if acc is not None and acc.round == accepted[0].round else {}
        return norms, publish_diff(diff, **self._target(accepted[0].round), started=start), Combined("svd")

    def _record_published(
        self,
        record: RoundRecord,
        accepted: list[UploadRecord],
        result: Published,
        norms: dict[str, float],
        combined: Combined,
    ) -> None:
        """Record the round as published, all at once or not at all: a failure here (the store's disk
        is full) leaves it AGGREGATING, in memory as on disk, to be tried again."""
        state = self._state
        optimizer_blob = self._save_optimizer()
        samples = sum(u.sample_count for u in accepted)
        bounds = self.bounds(record.round)
        with state.lock:
            record.state = rounds.advance(record.state, RoundState.PUBLISHED)
            record.published_ms = state.now_ms()
            record.samples = samples
            record.diff_blob = result.diff.blob
            record.diff_header = result.diff.header
            record.diff_layout = result.diff.layout
            record.diff_bytes = result.diff.nbytes
            record.state_blob = result.state_blob
            record.aggregate_seconds = result.seconds
            record.failure_reason = ""
            record.mean_train_loss = sum(u.train_loss * u.sample_count for u in accepted) / samples
            record.mean_eval_loss = sum(u.eval_loss * u.sample_count for u in accepted) / samples
            finished = state.run.finished or bool(self._config.rounds and record.round >= self._config.rounds)
            run = replace(state.run, optimizer_blob=optimizer_blob, finished=finished)
            combined.note(record, run)
            with state.store.transaction():
                state.store.put(record)
                state.store.put(run)
                for upload in accepted:
                    self._note_influence(upload, bounds, norms.get(upload.upload_id, 0.0))
                state.abandon_uploads(record.round, "the round closed before this upload finished")
            state.run.optimizer_blob, state.run.finished = run.optimizer_blob, run.finished
            combined.note_run(state.run)
            run = state.run
            state.acc = None
            try:  # published: what is left is housekeeping, and must not undo that
                for upload in state.store.select(UploadRecord, "round = ?", (record.round,)):
                    self._spool.delete(upload.upload_id)
                collect_garbage(
                    store=state.store,
                    blobs=self._blobs,
                    keep_states=self._config.keep_states,
                    snapshot_estimate=self._snapshot_estimate,
                )
            except Exception:
                logger.exception("[round] round=%d published; cleaning up after it failed", record.round)
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

    def _note_influence(self, upload: UploadRecord, bounds: RoundBounds, norm: float) -> None:
        """Store an accepted upload's norm, clip factor and outlier flag (inside the transaction)."""
        upload.norm = norm
        per_site = upload.sites == 0  # a partial sum's norm is of Σ n_i·Δ_i: never clipped, no outlier
        scaled = self._state.plan.streaming_fold and norm > 0 and per_site
        upload.clip_scale = bounds.scale(norm) if scaled else 1.0
        upload.outlier = per_site and bounds.is_outlier(norm)
        self._state.store.put(upload)

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
