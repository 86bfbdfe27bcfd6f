"""The coordinator: the run's state and every operation on it, behind one lock.

Servicers call into this class with domain objects; it validates, updates
the records in SQLite, hands shards to the fold worker, and runs the round
loop (``tick``): silent sites, quorum and deadlines, aggregation and
publication, the next round. It never imports grpc; errors are the typed
exceptions of ``common.errors``, which the servicers map to status codes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.codec import encode, validate_layout
from common.codec.compact import wire_manifest
from common.delta import Codec, DeltaHeader, DeltaKind, TensorSpec
from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    GdfedError,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RoundClosed,
)
from common.pb.gradualdiff.v1 import delta_pb2
from common.serde import header_from_proto, header_to_proto
from common.spec import Method
from server import rounds
from server.accumulation import Accumulation
from server.aggregate import ServerOptimizer, make_optimizer
from server.blobs import BlobStore
from server.config import RoundPolicy, ServerConfig
from server.flexlora_round import FlexUpload
from server.flexlora_round import next_state as flexlora_next_state
from server.folding import FoldWorker
from server.methods import Assignment, FlexLoraPlan, make_plan, with_optimizer_state
from server.publish import (
    Published,
    publish,
    publish_diff,
    rebuild,
    store_initial_state,
    store_snapshot,
)
from server.records import (
    ParticipantRecord,
    RoundRecord,
    RoundState,
    RunRecord,
    SiteRecord,
    SiteState,
    UploadRecord,
    UploadState,
)
from server.spool import Spool
from server.statefile import StateReader, write_state
from server.store import Store
from server.uploads import UploadSession

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_SAMPLES = 1 << 29  # keeps n·Δ exact in the fp64 accumulator
MAX_PREFIXES = 4096


def check_id(value: str, field: str) -> None:
    """Raise InvalidArgument unless ``value`` is 1..64 chars of [A-Za-z0-9._-]."""
    if not _ID.match(value):
        raise InvalidArgument(
            f"{field} {value!r} must be 1..64 characters of [A-Za-z0-9._-]", field=field, limit=64
        )


@dataclass(frozen=True, slots=True)
class RoundView:
    """What a worker learns about the round it may train in."""

    run_id: str
    round: int
    state: RoundState
    deadline_ms: int
    policy: RoundPolicy
    finished: bool
    base_round: int  # the published round this round's uploads are deltas against
    assignment: Assignment = field(
        default_factory=Assignment
    )  # this site's part (who trains what, at which rank)


@dataclass(frozen=True, slots=True)
class JoinResult:
    run_id: str
    fingerprint: str
    heartbeat_interval_ms: int
    missed_beats: int
    current: RoundView
    max_upload_bytes: int


@dataclass(frozen=True, slots=True)
class BeatReply:
    directive: int  # gradualdiff.v1.Directive value
    current_round: int
    next_beat_ms: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One delta to stream to a worker: its header and the payload file."""

    header: DeltaHeader
    path: Path
    round: int
    temporary: bool = False  # encoded for this request only: delete once streamed


@dataclass(frozen=True, slots=True)
class Receipt:
    upload_id: str
    round: int
    bytes_received: int
    accepted: bool
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StatusView:
    run: RunRecord
    current: RoundRecord | None
    sites_alive: int
    sites_known: int
    policy: RoundPolicy


@dataclass(frozen=True, slots=True)
class Event:
    unix_ms: int
    round: int
    kind: str
    site_id: str = ""
    state: RoundState | None = None
    detail: str = ""


# Directive values of gradualdiff.v1.Directive; kept here so this module stays free of protobuf enums.
CONTINUE, ABORT_ROUND, RESYNC, SLOW_DOWN, STOP = 0, 1, 2, 3, 4


class Coordinator:
    """Owns the run. Thread-safe; start() launches the round loop, stop() checkpoints and ends it."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        # Liveness counts from this process's start at the earliest: sites cannot beat while the
        # aggregator is down, so after a restart each gets its full allowance again.
        self._live_since_ms = self._now_ms()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.state_dir / "state.db")
        self.blobs = BlobStore(config.state_dir)
        self.spool = Spool(config.state_dir / "spool")
        self._lock = threading.RLock()
        self._snapshot_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._subscribers: list[queue.Queue[Event]] = []
        self._sessions: dict[str, UploadSession] = {}
        self._admin_close = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics_hook: Callable[[str, float], None] = lambda name, value: None
        self.run = self._load_or_create_run()
        latest = self._latest_published()
        self.manifest = self._manifest_of(latest)
        self.full_model_bytes = sum(t.numel * 4 for t in self.manifest)
        self.plan = make_plan(
            config.training,
            self.manifest,
            list(config.site_tokens),
            cybgd_mode=config.cybgd.mode,
            download_fraction=config.cybgd.download_fraction,
        )
        if config.cybgd.optimizer_state not in ("reset", "travel"):
            raise FailedPrecondition(
                f"cybgd.optimizer_state is {config.cybgd.optimizer_state!r}; must be reset or travel",
                field="cybgd.optimizer_state",
            )
        if config.training.method is not Method.GRADUALDIFF and (
            config.optimizer.name != "fedavg" or config.optimizer.lr != 1.0
        ):
            # FlexLoRA replaces the adapters with the SVD's; FedCyBGD's latest writer sets its block.
            raise FailedPrecondition(
                f"training.method {config.training.method.name.lower()} takes the new state as it comes: "
                f"the server optimizer must be fedavg with lr 1, not {config.optimizer.name} with lr "
                f"{config.optimizer.lr}",
                field="optimizer",
            )
        self.optimizer = self._load_optimizer()
        self.folder = FoldWorker(self.spool)
        self.acc: Accumulation | None = None
        self._open_round = 0  # the round taking uploads (0: none); read without the lock on every chunk
        with self._lock:
            self._recover()

    # ---------------------------------------------------------------- setup
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _load_or_create_run(self) -> RunRecord:
        runs = self.store.select(RunRecord)
        if runs:
            run = runs[0]
            if self.config.run_id and self.config.run_id != run.run_id:
                raise FailedPrecondition(
                    f"state directory {self.config.state_dir} holds run {run.run_id!r}, not {self.config.run_id!r}",
                    field="run_id",
                )
            return run
        if self.config.init_state is None:
            raise FailedPrecondition(
                f"{self.config.state_dir} holds no run yet: give --init-state, the trainable state at round 0 "
                "(a safetensors file)",
                field="init_state",
            )
        run_id = self.config.run_id or f"run-{uuid.uuid4().hex[:12]}"
        check_id(run_id, "run_id")
        init = self.config.init_state
        cy = self.config.cybgd
        if self.config.training.method is Method.FEDCYBGD and cy.optimizer_state == "travel":
            init = self._init_with_optimizer_state(init)
        state_blob, snapshot, _ = store_initial_state(self.blobs, init, run_id)
        if init != self.config.init_state:
            init.unlink(missing_ok=True)
        policy = self.config.round
        run = RunRecord(
            run_id=run_id,
            created_ms=self._now_ms(),
            min_sites=policy.min_sites,
            min_sample_fraction=policy.min_sample_fraction,
            round_deadline_s=policy.deadline_s,
        )
        genesis = RoundRecord(
            round=0,
            state=RoundState.PUBLISHED,
            opened_ms=run.created_ms,
            published_ms=run.created_ms,
            close_reason="initial state",
            state_blob=state_blob,
            snapshot_blob=snapshot.blob,
            snapshot_header=snapshot.header,
            snapshot_bytes=snapshot.nbytes,
        )
        with self.store.transaction():
            self.store.put(run)
            self.store.put(genesis)
        logger.info("[run] created run=%s from %s", run_id, self.config.init_state)
        return run

    def _init_with_optimizer_state(self, init: Path) -> Path:
        reader = StateReader(init)
        manifest = with_optimizer_state(reader.manifest)
        names = {t.name for t in reader.manifest}
        path = self.blobs.temp_path(".safetensors")
        write_state(
            path,
            manifest,
            lambda spec: reader.read(spec.name) if spec.name in names else torch.zeros(spec.shape),
        )
        return path

    def _latest_published(self) -> RoundRecord:
        rows = self.store.select(RoundRecord, "state = ?", (int(RoundState.PUBLISHED),), order="round DESC")
        return rows[0]

    def _manifest_of(self, record: RoundRecord) -> tuple[TensorSpec, ...]:
        return StateReader(self.blobs.path(record.state_blob)).manifest

    def _load_optimizer(self) -> ServerOptimizer:
        opt = self.config.optimizer
        params: dict[str, float] = {"lr": opt.lr}
        if opt.name == "fedavgm":
            params["momentum"] = opt.momentum
        elif opt.name in ("fedadam", "fedyogi", "fedadagrad"):
            params |= {"tau": opt.tau}
            if opt.name != "fedadagrad":
                params |= {"beta1": opt.beta1, "beta2": opt.beta2}
        optimizer = make_optimizer(opt.name, **params)
        if self.run.optimizer_blob:
            optimizer.load_state_dict(load_file(self.blobs.path(self.run.optimizer_blob)))
        return optimizer

    def _recover(self) -> None:
        """After a restart: reopen the current round where it was, or run the aggregation it was in."""
        current = self.store.get(RoundRecord, self.run.current_round) if self.run.current_round else None
        if current is None or current.state.is_final:
            if not self.run.finished:
                self._open_next_round()
            return
        self.acc = Accumulation(
            current.round,
            self.manifest,
            self.config.accumulator,
            summing=self.plan.streaming_fold,
            uniform=self.plan.uniform_weights,
        )
        if current.state.accepts_uploads:
            self._open_round = current.round
        accepted = self._accepted_uploads(current.round)
        if accepted:
            logger.info("[recover] round=%d replaying %d accepted upload(s)", current.round, len(accepted))
            rebuild(self.acc, accepted, self.spool)
        if current.state is RoundState.AGGREGATING:
            logger.info("[recover] round=%d was aggregating; aggregating again", current.round)
            self._aggregate(current.round)

    # ---------------------------------------------------------------- sites
    def join(self, site_id: str, *, device: int, memory_bytes: int, lora_rank: int, num_samples: int,
             fingerprint: str, held_round: int) -> JoinResult:  # fmt: skip
        check_id(site_id, "site_id")
        expected = self.config.base_model_fingerprint
        if expected and fingerprint and fingerprint != expected:
            raise FailedPrecondition(
                f"base model fingerprint {fingerprint[:16]}… differs from the run's {expected[:16]}…: "
                "the site loaded a different model",
                field="base_model_fingerprint",
            )
        if isinstance(self.plan, FlexLoraPlan) and lora_rank > self.plan.max_rank:
            raise InvalidArgument(
                f"capabilities.lora_rank is {lora_rank}; this run's adapters have rank {self.plan.max_rank} "
                "(training.lora.rank), the most a site may train",
                field="capabilities.lora_rank",
                limit=self.plan.max_rank,
            )
        with self._lock:
            site = self.store.get(SiteRecord, site_id)
            if site is not None and site.state is SiteState.EVICTED:
                raise PermissionDenied(f"site {site_id!r} was evicted from this run", field="site_id")
            now = self._now_ms()
            site = replace(
                site or SiteRecord(site_id=site_id, joined_ms=now),
                state=SiteState.ALIVE,
                last_beat_ms=now,
                device=device,
                memory_bytes=memory_bytes,
                lora_rank=lora_rank,
                num_samples=num_samples,
                held_round=held_round,
            )
            with self.store.transaction():
                self.store.put(site)
                self._add_participant(site)
            self._emit("site_joined", site_id=site_id, detail=f"samples={num_samples}")
            self._changed.notify_all()
            return JoinResult(
                run_id=self.run.run_id,
                fingerprint=expected,
                heartbeat_interval_ms=int(self.config.heartbeat_interval_s * 1000),
                missed_beats=self.config.missed_beats,
                current=self._round_view(),
                max_upload_bytes=self.config.max_upload_bytes,
            )

    def _add_participant(self, site: SiteRecord) -> None:
        current = self._current_round()
        if current is None or not current.state.accepts_uploads:
            return
        if not self._assignment(current.round, site).trains:
            return
        existing = self.store.get(ParticipantRecord, current.round, site.site_id)
        if existing is None:
            site.rounds_joined += 1
            self.store.put(site)
        self.store.put(
            ParticipantRecord(
                round=current.round, site_id=site.site_id, num_samples=site.num_samples, dropped=False
            )
        )

    def heartbeat(self, site_id: str, *, round_number: int, phase: int, step: int, total_steps: int,
                  loss: float) -> BeatReply:  # fmt: skip
        if not math.isfinite(loss):
            raise InvalidArgument(f"loss is {loss}; must be finite", field="loss")
        with self._lock:
            site = self._site(site_id)
            interval = int(self.config.heartbeat_interval_s * 1000)
            if site.state is SiteState.EVICTED:
                return BeatReply(STOP, self.run.current_round, interval, "evicted")
            if self.run.finished:
                return BeatReply(STOP, self.run.current_round, interval, "the run is finished")
            was_silent = site.state is SiteState.SILENT
            site = replace(
                site,
                state=SiteState.ALIVE,
                last_beat_ms=self._now_ms(),
                phase=phase,
                step=step,
                total_steps=total_steps,
                loss=loss,
                beat_round=round_number,
            )
            with self.store.transaction():
                self.store.put(site)
                if was_silent:
                    self._add_participant(site)
            current = self._current_round()
            if current is not None and round_number == current.round and phase == 3:  # PHASE_TRAINING
                self._progress(current, RoundState.TRAINING)
            if current is not None and round_number and round_number < current.round and phase == 3:
                return BeatReply(ABORT_ROUND, current.round, interval, f"round {round_number} is over")
            return BeatReply(CONTINUE, self.run.current_round, interval)

    def _site(self, site_id: str) -> SiteRecord:
        site = self.store.get(SiteRecord, site_id)
        if site is None:
            raise FailedPrecondition(f"site {site_id!r} has not joined; call Join first", field="site_id")
        return site

    def await_round(self, site_id: str, after_round: int, wait_s: float) -> RoundView:
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._lock:
            site = self._site(site_id)
            while True:
                view = self._round_view(site)
                if view.finished or (
                    view.round > after_round and view.state.accepts_uploads and view.assignment.trains
                ):
                    return view
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return view
                self._changed.wait(remaining)

    # ---------------------------------------------------------------- rounds
    def _current_round(self) -> RoundRecord | None:
        return self.store.get(RoundRecord, self.run.current_round) if self.run.current_round else None

    def _policy(self) -> RoundPolicy:
        return RoundPolicy(
            min_sites=self.run.min_sites,
            min_sample_fraction=self.run.min_sample_fraction,
            deadline_s=self.run.round_deadline_s,
        )

    def _assignment(self, round_number: int, site: SiteRecord) -> Assignment:
        return self.plan.assignment(round_number, site.site_id, site.lora_rank)

    def _round_view(self, site: SiteRecord | None = None) -> RoundView:
        current = self._current_round()
        assignment = self._assignment(current.round, site) if current and site else Assignment()
        return RoundView(
            run_id=self.run.run_id,
            round=current.round if current else 0,
            state=current.state if current else RoundState.PUBLISHED,
            deadline_ms=current.deadline_ms if current else 0,
            policy=self._policy(),
            finished=self.run.finished,
            base_round=self._latest_published().round,
            assignment=assignment,
        )

    def _progress(self, record: RoundRecord, target: RoundState) -> None:
        new_state = rounds.progress(record.state, target)
        if new_state is not record.state:
            record.state = new_state
            self.store.put(record)
            self._emit("round_state", round_number=record.round, state=new_state)

    def _open_next_round(self) -> None:
        if self.run.paused or self.run.finished:
            return
        alive = self.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),))
        if len(alive) < self.config.round.min_sites_to_open:
            return
        number = self.run.current_round + 1
        now = self._now_ms()
        deadline = now + self.run.round_deadline_s * 1000 if self.run.round_deadline_s else 0
        record = RoundRecord(round=number, state=RoundState.OPEN, opened_ms=now, deadline_ms=deadline)
        with self.store.transaction():
            self.run.current_round = number
            self.store.put(self.run)
            self.store.put(record)
            for site in alive:
                self._add_participant(site)
        self.acc = Accumulation(
            number,
            self.manifest,
            self.config.accumulator,
            summing=self.plan.streaming_fold,
            uniform=self.plan.uniform_weights,
        )
        self._open_round = number
        self._admin_close = False
        logger.info("[round] round=%d opened with %d site(s)", number, len(alive))
        self._emit("round_opened", round_number=number, state=RoundState.OPEN)
        self._changed.notify_all()

    def _participants(self, round_number: int) -> list[ParticipantRecord]:
        return self.store.select(ParticipantRecord, "round = ?", (round_number,))

    def _accepted_records(self, round_number: int) -> list[UploadRecord]:
        return self.store.select(
            UploadRecord, "round = ? AND state = ?", (round_number, int(UploadState.ACCEPTED)), order="seq"
        )

    def _accepted_uploads(self, round_number: int) -> list[tuple[str, DeltaHeader]]:
        return [(u.upload_id, _parse_header(u.header)) for u in self._accepted_records(round_number)]

    def _tally(self, record: RoundRecord) -> rounds.Tally:
        accepted = self._accepted_records(record.round)
        live = [p for p in self._participants(record.round) if not p.dropped]
        return rounds.Tally(
            accepted=len(accepted),
            accepted_samples=sum(u.sample_count for u in accepted),
            alive_participants=len(live),
            expected_samples=sum(p.num_samples for p in live),
            now_ms=self._now_ms(),
            deadline_ms=record.deadline_ms,
        )

    def tick(self) -> None:
        """One pass of the round loop: liveness, then close/fail/publish/open as due."""
        close_round = 0
        with self._lock:
            self._check_liveness()
            current = self._current_round()
            if current is None or current.state.is_final or self.run.finished:
                # Also between rounds: the next one may be waiting for min_sites_to_open sites.
                if not self.run.finished and not self.run.paused:
                    self._open_next_round()
                return
            if not current.state.accepts_uploads:
                return
            if self.run.paused and not self._admin_close:
                return
            decision = rounds.decide(self._policy(), self._tally(current), admin_close=self._admin_close)
            if decision.fail:
                self._fail_round(current, decision.reason)
                return
            if not decision.close:
                return
            current.state = rounds.advance(current.state, RoundState.AGGREGATING)
            self._open_round = 0
            current.closed_ms = self._now_ms()
            current.close_reason = decision.reason
            self.store.put(current)
            if self.acc is not None:
                self.acc.detach()
            logger.info("[round] round=%d closed (%s)", current.round, decision.reason)
            self._emit(
                "round_closed", round_number=current.round, state=current.state, detail=decision.reason
            )
            self._changed.notify_all()
            close_round = current.round
        self._aggregate(close_round)

    def _fail_round(self, record: RoundRecord, reason: str) -> None:
        record.state = rounds.advance(record.state, RoundState.FAILED)
        self._open_round = 0
        record.closed_ms = self._now_ms()
        record.failure_reason = reason
        with self.store.transaction():
            self.store.put(record)
            self._abandon_uploads(record.round, "the round failed")
        if self.acc is not None:
            self.acc.detach()
        logger.warning("[round] round=%d failed: %s", record.round, reason)
        self._emit("round_failed", round_number=record.round, state=RoundState.FAILED, detail=reason)
        self._changed.notify_all()
        self._open_next_round()

    def _abandon_uploads(self, round_number: int, reason: str) -> None:
        for upload in self.store.select(
            UploadRecord, "round = ? AND state = ?", (round_number, int(UploadState.RECEIVING))
        ):
            upload.state = UploadState.ABANDONED
            upload.reason = reason
            self.store.put(upload)

    def _aggregate(self, round_number: int) -> None:
        """Turn the closed round into a published one (outside the lock: this takes a while)."""
        record = self.store.get(RoundRecord, round_number)
        assert record is not None and record.state is RoundState.AGGREGATING
        accepted = self._accepted_records(round_number)
        if not accepted:
            with self._lock:
                self._fail_round(record, "no accepted uploads when the round closed")
            return
        if not self.plan.streaming_fold:
            self._aggregate_replacing(record, accepted)
            return
        acc = self.acc
        accepted_ids = [u.upload_id for u in accepted]
        if acc is None or acc.round != round_number or acc.dirty or acc.accepted != accepted_ids:
            logger.info(
                "[round] round=%d rebuilding the sum from %d accepted spool(s)", round_number, len(accepted)
            )
            acc = Accumulation(
                round_number, self.manifest, self.config.accumulator, uniform=self.plan.uniform_weights
            )
            rebuild(acc, [(u.upload_id, _parse_header(u.header)) for u in accepted], self.spool)
        previous = self._latest_published()
        try:
            result = publish(
                acc=acc,
                optimizer=self.optimizer,
                blobs=self.blobs,
                previous_state=previous.state_blob,
                run_id=self.run.run_id,
                round_number=round_number,
                base_round=previous.round,
                broadcast=self.config.broadcast_codec,
            )
        except Exception as exc:
            logger.exception("[round] round=%d aggregation failed", round_number)
            with self._lock:
                self.optimizer = self._load_optimizer()  # drop half-applied optimizer steps
                self._fail_round(record, f"aggregation failed: {exc}")
            return
        self._finish_publish(record, accepted, result)

    def _aggregate_replacing(self, record: RoundRecord, accepted: list[UploadRecord]) -> None:
        """FlexLoRA: the next adapters come from the SVD of the round's full-size ΔW (server.flexlora_round)."""
        assert isinstance(self.plan, FlexLoraPlan)
        previous = self._latest_published()
        sites = {s.site_id: s for s in self.store.select(SiteRecord)}
        uploads = []
        for u in accepted:
            rank = self.plan.rank_of(sites[u.site_id].lora_rank if u.site_id in sites else 0)
            uploads.append(
                FlexUpload(
                    upload_id=u.upload_id,
                    header=_parse_header(u.header),
                    rank=rank,
                    weight=float(u.sample_count),
                    manifest=self.plan.upload_manifest(Assignment(lora_rank=rank)),
                )
            )
        try:
            start = time.perf_counter()
            reader = StateReader(self.blobs.path(previous.state_blob))
            state = flexlora_next_state(reader, uploads, self.spool, alpha=self.config.training.lora.alpha)
            diff = {name: tensor.sub_(reader.read(name)) for name, tensor in state.items()}
            result = publish_diff(
                diff,
                blobs=self.blobs,
                previous_state=previous.state_blob,
                run_id=self.run.run_id,
                round_number=record.round,
                base_round=previous.round,
                broadcast=self.config.broadcast_codec,
                started=start,
            )
        except Exception as exc:
            logger.exception("[round] round=%d FlexLoRA aggregation failed", record.round)
            with self._lock:
                self._fail_round(record, f"aggregation failed: {exc}")
            return
        self._finish_publish(record, accepted, result)

    def _finish_publish(self, record: RoundRecord, accepted: list[UploadRecord], result: Published) -> None:
        optimizer_blob = self._save_optimizer()
        samples = sum(u.sample_count for u in accepted)
        with self._lock:
            record.state = rounds.advance(record.state, RoundState.PUBLISHED)
            record.published_ms = self._now_ms()
            record.samples = samples
            record.diff_blob = result.diff.blob
            record.diff_header = result.diff.header
            record.diff_bytes = result.diff.nbytes
            record.state_blob = result.state_blob
            record.aggregate_seconds = result.seconds
            record.mean_train_loss = sum(u.train_loss * u.sample_count for u in accepted) / samples
            record.mean_eval_loss = sum(u.eval_loss * u.sample_count for u in accepted) / samples
            with self.store.transaction():
                self.store.put(record)
                self.run.optimizer_blob = optimizer_blob
                if self.config.rounds and record.round >= self.config.rounds:
                    self.run.finished = True
                self.store.put(self.run)
                self._abandon_uploads(record.round, "the round closed before this upload finished")
            self.acc = None
            for upload in self.store.select(UploadRecord, "round = ?", (record.round,)):
                self.spool.delete(upload.upload_id)
            self._collect_garbage()
            logger.info(
                "[round] round=%d published: %d upload(s), %d samples, diff %d bytes (%.3f of fp32), %.2fs",
                record.round,
                len(accepted),
                samples,
                record.diff_bytes,
                record.diff_bytes / max(1, self.full_model_bytes),
                result.seconds,
            )
            self.metrics_hook("aggregate_seconds", result.seconds)
            self._emit("round_published", round_number=record.round, state=RoundState.PUBLISHED)
            if self.run.finished:
                logger.info("[run] run=%s finished after %d rounds", self.run.run_id, record.round)
                self._emit("run_finished", round_number=record.round)
            else:
                self._open_next_round()
            self._changed.notify_all()

    def _save_optimizer(self) -> str:
        state = self.optimizer.state_dict()
        if not state:
            return ""
        temp = self.blobs.temp_path(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(temp))
        return self.blobs.adopt(temp)

    def _collect_garbage(self) -> None:
        """Keep the last ``keep_states`` published states and snapshots (round 0 always)."""
        published = self.store.select(RoundRecord, "state = ? AND round > 0", (int(RoundState.PUBLISHED),))
        for record in published[: max(0, len(published) - self.config.keep_states)]:
            if record.state_blob or record.snapshot_blob:
                self.blobs.delete(record.state_blob) if record.state_blob else None
                self.blobs.delete(record.snapshot_blob) if record.snapshot_blob else None
                record.state_blob = record.snapshot_blob = ""
                record.snapshot_header = b""
                self.store.put(record)

    def _check_liveness(self) -> None:
        limit = int(self.config.heartbeat_interval_s * self.config.missed_beats * 1000)
        now = self._now_ms()
        current = self._current_round()
        for site in self.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),)):
            if now - max(site.last_beat_ms, self._live_since_ms) <= limit:
                continue
            site.state = SiteState.SILENT
            with self.store.transaction():
                self.store.put(site)
                if current is not None and current.state.accepts_uploads:
                    part = self.store.get(ParticipantRecord, current.round, site.site_id)
                    if part is not None and not part.dropped:
                        part.dropped = True
                        self.store.put(part)
            logger.warning("[site] site=%s silent for %d ms: dropped from round %d", site.site_id, now - site.last_beat_ms,
                           current.round if current else 0)  # fmt: skip
            self._emit("site_dropped", round_number=current.round if current else 0, site_id=site.site_id)

    # ---------------------------------------------------------------- fetch
    def fetch_plan(
        self, site_id: str, have_round: int, snapshot: bool, only_prefixes: Sequence[str] = ()
    ) -> list[FetchItem]:
        """The deltas that bring a worker from ``have_round`` to the latest published state."""
        if only_prefixes:
            return [self._partial_snapshot(site_id, tuple(only_prefixes))]
        with self._lock:
            self._site(site_id)
            latest = self._latest_published()
            if have_round > latest.round:
                raise FailedPrecondition(
                    f"have_round is {have_round}, but the latest published round is {latest.round}",
                    field="have_round",
                )
            if have_round == latest.round and not snapshot:
                return []
            chain = self.store.select(
                RoundRecord,
                "round > ? AND round <= ? AND state = ?",
                (have_round, latest.round, int(RoundState.PUBLISHED)),
            )
            chain_bytes = sum(r.diff_bytes for r in chain)
            complete = all(r.diff_blob and self.blobs.exists(r.diff_blob) for r in chain)
            estimate = latest.snapshot_bytes or self._genesis_snapshot_bytes()
            if not (snapshot or not complete or chain_bytes > estimate):
                return [
                    FetchItem(_parse_header(r.diff_header), self.blobs.path(r.diff_blob), r.round)
                    for r in chain
                ]
        record = self._ensure_snapshot(latest.round)
        return [
            FetchItem(
                _parse_header(record.snapshot_header), self.blobs.path(record.snapshot_blob), record.round
            )
        ]

    def _partial_snapshot(self, site_id: str, prefixes: tuple[str, ...]) -> FetchItem:
        """The latest state's tensors under ``prefixes``, encoded for this request (FedCyBGD's compressed download)."""
        if len(prefixes) > MAX_PREFIXES:
            raise LimitExceeded(
                f"only_prefixes has {len(prefixes)} entries; the limit is {MAX_PREFIXES}",
                field="only_prefixes",
                limit=MAX_PREFIXES,
            )
        with self._lock:
            self._site(site_id)
            latest = self._latest_published()
        reader = StateReader(self.blobs.path(latest.state_blob))
        manifest = tuple(t for t in reader.manifest if t.name.startswith(prefixes))
        if not manifest:
            raise InvalidArgument(
                f"only_prefixes {list(prefixes)[:3]} name no tensor of the state", field="only_prefixes"
            )
        temp = self.blobs.temp_path(".payload")
        with temp.open("wb") as sink:
            layout = encode({t.name: reader.read(t.name) for t in manifest}, Codec(), sink, manifest=manifest)
        header = DeltaHeader(
            layout=layout, run_id=self.run.run_id, round=latest.round, kind=DeltaKind.SNAPSHOT
        )
        return FetchItem(header, temp, latest.round, temporary=True)

    def _genesis_snapshot_bytes(self) -> int:
        genesis = self.store.get(RoundRecord, 0)
        return genesis.snapshot_bytes if genesis else 0

    def _ensure_snapshot(self, round_number: int) -> RoundRecord:
        """The round's record with its snapshot encoded (on first request: most sites only fetch diffs)."""
        with self._snapshot_lock:
            with self._lock:
                record = self.store.get(RoundRecord, round_number)
                assert record is not None
                if record.snapshot_blob and self.blobs.exists(record.snapshot_blob):
                    return record
                if not record.state_blob:
                    raise FailedPrecondition(
                        f"the state of round {round_number} is no longer kept", field="have_round"
                    )
            stored = store_snapshot(self.blobs, record.state_blob, self.run.run_id, round_number)
            with self._lock:
                record = self.store.get(RoundRecord, round_number)
                assert record is not None
                record.snapshot_blob = stored.blob
                record.snapshot_header = stored.header
                record.snapshot_bytes = stored.nbytes
                self.store.put(record)
                return record

    def count_bytes_out(self, round_number: int, nbytes: int) -> None:
        with self._lock:
            record = self.store.get(RoundRecord, round_number)
            if record is not None:
                record.bytes_out += nbytes
                self.store.put(record)
        self.metrics_hook("bytes_out", nbytes)

    def mark_synced(self, site_id: str, round_number: int) -> None:
        with self._lock:
            site = self.store.get(SiteRecord, site_id)
            if site is not None:
                site.held_round = round_number
                self.store.put(site)

    # ---------------------------------------------------------------- uploads
    def upload_offset(self, site_id: str, upload_id: str) -> tuple[int, bool]:
        check_id(upload_id, "upload_id")
        with self._lock:
            upload = self.store.get(UploadRecord, upload_id)
            if upload is None:
                return 0, False
            if upload.site_id != site_id:
                raise PermissionDenied(f"upload {upload_id!r} belongs to another site", field="upload_id")
            return upload.committed_offset, upload.state is UploadState.ACCEPTED

    def open_upload(self, site_id: str, header: DeltaHeader, first_offset: int) -> UploadSession | Receipt:
        """Validate an upload's header and start (or resume) receiving it."""
        check_id(header.upload_id, "upload_id")
        if header.site_id != site_id:
            raise PermissionDenied(
                f"header.site_id is {header.site_id!r} but the token belongs to {site_id!r}: a site uploads only for itself",
                field="site_id",
            )
        with self._lock:
            existing = self.store.get(UploadRecord, header.upload_id)
            if existing is not None and existing.site_id != site_id:
                raise PermissionDenied(
                    f"upload {header.upload_id!r} belongs to another site", field="upload_id"
                )
            if existing is not None and existing.state is UploadState.ACCEPTED:
                return Receipt(header.upload_id, existing.round, existing.total_bytes, True, True)
            self._check_upload(site_id, header)
            if existing is not None and existing.state is not UploadState.RECEIVING:
                raise FailedPrecondition(
                    f"upload {header.upload_id!r} was {existing.state.name.lower()} ({existing.reason}); "
                    "send it again under a new upload id",
                    field="upload_id",
                )
            if existing is not None and _parse_header(existing.header) != header:
                raise InvalidArgument(
                    f"upload id {header.upload_id!r} was started with a different header; use a new id",
                    field="upload_id",
                )
            committed = existing.committed_offset if existing else 0
            if first_offset not in (0, committed):
                raise FailedPrecondition(
                    f"stream starts at offset {first_offset}; resume at the committed offset {committed} or at 0",
                    field="offset",
                )
            other = self._sessions.get(header.upload_id)
            if other is not None:
                other.cancel("superseded by a new stream of the same upload")
            record = existing or UploadRecord(
                upload_id=header.upload_id,
                round=header.round,
                site_id=site_id,
                sample_count=header.sample_count,
                total_bytes=header.layout.total_bytes,
                header=header_to_proto(header).SerializeToString(),
                started_ms=self._now_ms(),
                train_loss=header.metrics.train_loss,
                eval_loss=header.metrics.eval_loss,
            )
            record.committed_offset = first_offset
            with self.store.transaction():
                self.store.put(record)
            current = self._current_round()
            assert current is not None and self.acc is not None
            self._progress(current, RoundState.COLLECTING)
            session = UploadSession(
                coordinator=self,
                record=record,
                header=header,
                acc=self.acc,
                spool=self.spool,
                folder=self.folder,
                start=first_offset,
                max_chunk_bytes=self.config.limits.max_chunk_bytes,
            )
            self._sessions[header.upload_id] = session
            logger.info(
                "[upload] round=%d site=%s upload=%s %s at %d of %d bytes",
                header.round,
                site_id,
                header.upload_id,
                "resumed" if first_offset else "started",
                first_offset,
                header.layout.total_bytes,
            )
            return session

    def _check_upload(self, site_id: str, header: DeltaHeader) -> None:
        site = self._site(site_id)
        if site.state is SiteState.EVICTED:
            raise PermissionDenied(f"site {site_id!r} was evicted", field="site_id")
        if header.run_id != self.run.run_id:
            raise FailedPrecondition(
                f"header.run_id is {header.run_id!r}; this run is {self.run.run_id!r}", field="run_id"
            )
        current = self._current_round()
        if current is None or header.round != current.round:
            now = current.round if current else 0
            raise FailedPrecondition(
                f"header.round is {header.round}; the open round is {now}", field="round"
            )
        if not current.state.accepts_uploads:
            raise RoundClosed(
                f"round {current.round} is {current.state.name.lower()}; it takes no more uploads",
                field="round",
            )
        if self.run.finished:
            raise FailedPrecondition("the run is finished", field="round")
        if header.kind is not DeltaKind.DIFF:
            raise InvalidArgument(f"header.kind is {header.kind.name}; uploads are DIFF", field="kind")
        if not 1 <= header.sample_count <= MAX_SAMPLES:
            raise InvalidArgument(
                f"header.sample_count is {header.sample_count}; must be 1..{MAX_SAMPLES}",
                field="sample_count",
                limit=MAX_SAMPLES,
            )
        latest = self._latest_published()
        if header.base_round != latest.round:
            raise FailedPrecondition(
                f"header.base_round is {header.base_round}; deltas of round {current.round} are taken against round "
                f"{latest.round} (fetch it first)",
                field="base_round",
            )
        assignment = self._assignment(current.round, site)
        if not assignment.trains:
            raise FailedPrecondition(
                f"site {site_id!r} has no part in round {current.round} ({self.plan.describe()})",
                field="site_id",
            )
        expected = wire_manifest(
            self.plan.upload_manifest(assignment), header.layout.codec
        )  # lossy: compact names
        validate_layout(header.layout, self.config.limits, expected=expected)
        for upload in self.store.select(
            UploadRecord,
            "round = ? AND site_id = ? AND state = ?",
            (current.round, site_id, int(UploadState.ACCEPTED)),
        ):
            if upload.upload_id != header.upload_id:
                raise AlreadyExists(
                    f"site {site_id!r} already has upload {upload.upload_id!r} accepted in round {current.round}",
                    field="upload_id",
                )

    def commit_offset(self, session: UploadSession, offset: int) -> None:
        """Record a durable offset, unless a newer stream of the same upload has replaced ``session``."""
        with self._lock:
            current = self._sessions.get(session.upload_id)
            if current is not None and current is not session:
                return
            upload = self.store.get(UploadRecord, session.upload_id)
            if upload is not None and upload.state is UploadState.RECEIVING:
                upload.committed_offset = offset
                self.store.put(upload)

    def round_accepts(self, round_number: int) -> bool:
        """Whether ``round_number`` is open for uploads; no lock and no query (called for every chunk)."""
        return round_number != 0 and round_number == self._open_round

    def accept_upload(self, session: UploadSession, seconds: float) -> Receipt:
        """Count a fully received and folded upload, durably, exactly once."""
        with self._lock:
            self._forget(session)
            record = self.store.get(UploadRecord, session.upload_id)
            assert record is not None
            if record.state is UploadState.ACCEPTED:
                return Receipt(record.upload_id, record.round, record.total_bytes, True, True)
            if not self.round_accepts(record.round) or not session.acc.accept(
                record.upload_id, record.sample_count
            ):
                raise RoundClosed(
                    f"round {record.round} closed before upload {record.upload_id!r} finished", field="round"
                )
            seq = len(self._accepted_records(record.round)) + 1
            record.state = UploadState.ACCEPTED
            record.seq = seq
            record.committed_offset = record.total_bytes
            record.accepted_ms = self._now_ms()
            record.upload_seconds = seconds
            current = self._current_round()
            assert current is not None
            current.bytes_in += record.total_bytes
            with self.store.transaction():
                self.store.put(record)
                self.store.put(current)
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
            self.metrics_hook("bytes_in", record.total_bytes)
            self.metrics_hook("upload_seconds", seconds)
            self._emit(
                "upload_accepted", round_number=record.round, site_id=record.site_id, detail=record.upload_id
            )
            self._changed.notify_all()
            return Receipt(record.upload_id, record.round, record.total_bytes, True, False)

    def reject_upload(self, session: UploadSession, error: GdfedError) -> None:
        with self._lock:
            self._forget(session)
            record = self.store.get(UploadRecord, session.upload_id)
            if record is not None and record.state is UploadState.RECEIVING:
                record.state = UploadState.REJECTED
                record.reason = error.message
                self.store.put(record)
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

    def end_session(self, session: UploadSession) -> None:
        with self._lock:
            self._forget(session)

    def _forget(self, session: UploadSession) -> None:
        # Only the current stream of an upload may remove it; a superseded one must not.
        if self._sessions.get(session.upload_id) is session:
            del self._sessions[session.upload_id]
            self._changed.notify_all()  # stop() waits for the sessions to end

    # ---------------------------------------------------------------- admin
    def status(self) -> StatusView:
        with self._lock:
            sites = self.store.select(SiteRecord)
            return StatusView(
                run=replace(self.run),
                current=self._current_round(),
                sites_alive=sum(s.state is SiteState.ALIVE for s in sites),
                sites_known=len(sites),
                policy=self._policy(),
            )

    def rounds_page(self, limit: int, before: int) -> list[RoundRecord]:
        with self._lock:
            if before:
                rows = self.store.select(
                    RoundRecord, "round < ? AND round > 0", (before,), order="round DESC"
                )
            else:
                rows = self.store.select(RoundRecord, "round > 0", order="round DESC")
            return rows[:limit]

    def round_detail(
        self, round_number: int
    ) -> tuple[RoundRecord, list[ParticipantRecord], list[UploadRecord]]:
        with self._lock:
            record = self.store.get(RoundRecord, round_number)
            if record is None:
                raise NotFound(f"round {round_number} does not exist", field="round")
            uploads = self.store.select(UploadRecord, "round = ?", (round_number,))
            return record, self._participants(round_number), uploads

    def sites(self) -> list[SiteRecord]:
        with self._lock:
            return self.store.select(SiteRecord)

    def pause(self, reason: str) -> None:
        with self._lock:
            self.run.paused = True
            self.store.put(self.run)
            logger.info("[admin] paused: %s", reason or "(no reason)")
            self._emit("paused", round_number=self.run.current_round, detail=reason)

    def resume(self, reason: str) -> None:
        with self._lock:
            self.run.paused = False
            self.store.put(self.run)
            logger.info("[admin] resumed: %s", reason or "(no reason)")
            self._emit("resumed", round_number=self.run.current_round, detail=reason)
            current = self._current_round()
            if current is None or current.state.is_final:
                self._open_next_round()
            self._changed.notify_all()

    def close_round(self, reason: str) -> None:
        with self._lock:
            current = self._current_round()
            if current is None or not current.state.accepts_uploads:
                raise FailedPrecondition("no round is open", field="round")
            logger.info("[admin] round=%d close requested: %s", current.round, reason or "(no reason)")
            self._admin_close = True
        self.tick()

    def evict(self, site_id: str, reason: str) -> None:
        with self._lock:
            site = self.store.get(SiteRecord, site_id)
            if site is None:
                raise NotFound(f"site {site_id!r} is not known", field="site_id")
            site.state = SiteState.EVICTED
            current = self._current_round()
            with self.store.transaction():
                self.store.put(site)
                if current is not None:
                    part = self.store.get(ParticipantRecord, current.round, site_id)
                    if part is not None:
                        part.dropped = True
                        self.store.put(part)
            for session in list(self._sessions.values()):
                if session.site_id == site_id:
                    session.cancel("the site was evicted")
            logger.warning("[admin] site=%s evicted: %s", site_id, reason or "(no reason)")
            self._emit("site_evicted", round_number=self.run.current_round, site_id=site_id, detail=reason)

    def set_policy(
        self, *, min_sites: int | None, min_sample_fraction: float | None, deadline_s: int | None
    ) -> None:
        # Validate everything before changing anything: a refused request leaves the policy as it was.
        if min_sample_fraction is not None and not 0.0 <= min_sample_fraction <= 1.0:
            raise InvalidArgument(
                f"min_sample_fraction is {min_sample_fraction}; must be 0..1", field="min_sample_fraction"
            )
        with self._lock:
            if min_sites is not None:
                self.run.min_sites = min_sites
            if min_sample_fraction is not None:
                self.run.min_sample_fraction = min_sample_fraction
            current = self._current_round()
            with self.store.transaction():
                if deadline_s is not None:
                    self.run.round_deadline_s = deadline_s
                    if current is not None and current.state.accepts_uploads:
                        current.deadline_ms = current.opened_ms + deadline_s * 1000 if deadline_s else 0
                        self.store.put(current)
                self.store.put(self.run)
            logger.info("[admin] policy now %s", self._policy())
            self._emit("policy_changed", round_number=self.run.current_round, detail=str(self._policy()))

    # ---------------------------------------------------------------- events
    def subscribe(self) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue(maxsize=1000)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[Event]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def _emit(self, kind: str, *, round_number: int = 0, site_id: str = "", state: RoundState | None = None,
              detail: str = "") -> None:  # fmt: skip
        event = Event(self._now_ms(), round_number, kind, site_id, state, detail)
        for q in list(self._subscribers):
            # A watcher that stopped reading loses events rather than stalling the run.
            with contextlib.suppress(queue.Full):
                q.put_nowait(event)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gdfed-rounds", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:
                logger.exception("[round] tick failed; the loop goes on")

    def stop_rounds(self) -> None:
        """Stop the round loop (liveness, quorum, deadlines) and wake long polls; the first step of a shutdown.

        While the server drains its calls it refuses new ones, heartbeats included: the loop
        must not drop the sites, or close their round, for beats they cannot send.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._changed.notify_all()

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop the loop, commit what every upload has received, close the store.

        Each live upload's handler commits its received bytes (``UploadSession.interrupt``) as its
        call ends, which may be after the server reports its calls stopped: wait up to ``drain_s``
        for them, so the store is still open for those commits.
        """
        self.stop_rounds()
        deadline = time.monotonic() + drain_s
        with self._lock:
            for session in list(self._sessions.values()):
                session.cancel("the aggregator is shutting down")
            while self._sessions and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
            if self._sessions:
                logger.warning("[serve] %d upload(s) still receiving at shutdown", len(self._sessions))
            self._changed.notify_all()
        self.folder.stop()
        self.store.close()


def _parse_header(raw: bytes) -> DeltaHeader:
    msg = delta_pb2.DeltaHeader()
    msg.ParseFromString(raw)
    return header_from_proto(msg)
