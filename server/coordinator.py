"""The coordinator: the run's round state machine, behind one lock.

It sets up (or recovers) the run, lets sites join, beat and wait for a round,
and runs the round loop (``tick``): silent sites, quorum and deadlines,
aggregation and publication, the next round. The other operations on the run
live in collaborators that it creates and shares its lock with:
``fetching`` (FetchDiff plans, ``server.fetching``), ``intake`` (uploads,
``server.intake``) and ``admin`` (the Admin service, ``server.run_admin``).
None of them imports grpc; errors are the typed exceptions of
``common.errors``, which the servicers map to status codes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from common.buffers import ReusableBuffer
from common.delta import DeltaHeader, TensorSpec
from common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from common.serde import header_from_bytes
from common.spec import Method
from server import rounds
from server.accumulation import Accumulation
from server.aggregate import ServerOptimizer, make_optimizer
from server.blobs import BlobStore
from server.config import RoundPolicy, ServerConfig
from server.fetching import Fetching, servable_diffs
from server.flexlora_round import FlexUpload
from server.flexlora_round import next_state as flexlora_next_state
from server.folding import FoldWorker
from server.intake import Intake
from server.methods import Assignment, FlexLoraPlan, make_plan, with_optimizer_state
from server.publish import (
    Published,
    publish,
    publish_diff,
    rebuild,
    store_initial_state,
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
    check_id,
)
from server.run_admin import RunAdmin
from server.spool import Spool
from server.statefile import StateReader, write_state
from server.store import Store

logger = logging.getLogger(__name__)


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
class Event:
    unix_ms: int
    round: int
    kind: str
    site_id: str = ""
    state: RoundState | None = None
    detail: str = ""


class Emit(Protocol):
    """``Coordinator._emit``, as the collaborators are given it: send one event to the watchers."""

    def __call__(
        self,
        kind: str,
        *,
        round_number: int = ...,
        site_id: str = ...,
        state: RoundState | None = ...,
        detail: str = ...,
    ) -> None: ...


# Directive values of gradualdiff.v1.Directive; kept here so this module stays free of protobuf enums.
CONTINUE, ABORT_ROUND, RESYNC, SLOW_DOWN, STOP = 0, 1, 2, 3, 4


class Coordinator:
    """Owns the run. Thread-safe; start() launches the round loop, stop() checkpoints and ends it.

    ``fetching``, ``intake`` and ``admin`` carry the other operations on the run (FetchDiff,
    PushDelta and GetUploadOffset, the Admin service) and share this object's lock; ``intake``
    and ``admin`` read and steer the round state through its public methods (``current_round``,
    ``progress``, ``open_next_round``, ``request_close``, ...).
    """

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        # Liveness counts from this process's start at the earliest: sites cannot beat while the
        # aggregator is down, so after a restart each gets its full allowance again.
        self._live_since_ms = self.now_ms()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.state_dir / "state.db")
        self.blobs = BlobStore(config.state_dir)
        self.spool = Spool(config.state_dir / "spool")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._subscribers: list[queue.Queue[Event]] = []
        self._admin_close = False
        self._stop = threading.Event()
        # Set when something a tick acts on has happened (an upload accepted, a round published), so
        # the loop acts now rather than up to tick_s later; it still ticks every tick_s for deadlines.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics_hook: Callable[[str, float], None] = lambda name, value: None
        self.run = self._load_or_create_run()
        latest = self.latest_published()
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
        # Kept from round to round: the running sum's memory, and the buffer publication reads the
        # previous state into (common.buffers: fresh memory costs page faults every round).
        self._sum_memory = ReusableBuffer()
        self._read_memory = ReusableBuffer()
        self._open_round = 0  # the round taking uploads (0: none); read without the lock on every chunk

        # Metrics replaces metrics_hook after construction: look it up on every call.
        def metrics(name: str, value: float) -> None:
            self.metrics_hook(name, value)

        self.fetching = Fetching(
            store=self.store,
            blobs=self.blobs,
            lock=self._lock,
            run_id=self.run.run_id,
            metrics=metrics,
            joined_site=self.joined_site,
            latest_published=self.latest_published,
        )
        self.intake = Intake(
            rounds=self,
            store=self.store,
            spool=self.spool,
            folder=self.folder,
            lock=self._lock,
            changed=self._changed,
            config=config,
            emit=self._emit,
            metrics=metrics,
        )
        self.admin = RunAdmin(
            rounds=self,
            store=self.store,
            lock=self._lock,
            changed=self._changed,
            intake=self.intake,
            emit=self._emit,
        )
        with self._lock:
            self._recover()

    # ---------------------------------------------------------------- setup
    def now_ms(self) -> int:
        """The coordinator's clock, in Unix milliseconds."""
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
            created_ms=self.now_ms(),
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

    def latest_published(self) -> RoundRecord:
        """The record of the latest published round (round 0, the initial state, at the least)."""
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
                self.open_next_round()
            return
        self.acc = Accumulation(
            current.round,
            self.manifest,
            self.config.accumulator,
            summing=self.plan.streaming_fold,
            uniform=self.plan.uniform_weights,
            memory=self._sum_memory,
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
            now = self.now_ms()
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
        current = self.current_round()
        if current is None or not current.state.accepts_uploads:
            return
        if not self.assignment(current.round, site).trains:
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
            site = self.joined_site(site_id)
            interval = int(self.config.heartbeat_interval_s * 1000)
            if site.state is SiteState.EVICTED:
                return BeatReply(STOP, self.run.current_round, interval, "evicted")
            if self.run.finished:
                return BeatReply(STOP, self.run.current_round, interval, "the run is finished")
            was_silent = site.state is SiteState.SILENT
            site = replace(
                site,
                state=SiteState.ALIVE,
                last_beat_ms=self.now_ms(),
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
            current = self.current_round()
            if current is not None and round_number == current.round and phase == 3:  # PHASE_TRAINING
                self.progress(current, RoundState.TRAINING)
            if current is not None and round_number and round_number < current.round and phase == 3:
                return BeatReply(ABORT_ROUND, current.round, interval, f"round {round_number} is over")
            return BeatReply(CONTINUE, self.run.current_round, interval)

    def joined_site(self, site_id: str) -> SiteRecord:
        """The site's record; FailedPrecondition if it never joined (caller holds the lock)."""
        site = self.store.get(SiteRecord, site_id)
        if site is None:
            raise FailedPrecondition(f"site {site_id!r} has not joined; call Join first", field="site_id")
        return site

    def await_round(self, site_id: str, after_round: int, wait_s: float) -> RoundView:
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._lock:
            site = self.joined_site(site_id)
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
    def current_round(self) -> RoundRecord | None:
        """The record of the run's latest round, whatever its state; None before round 1."""
        return self.store.get(RoundRecord, self.run.current_round) if self.run.current_round else None

    def policy(self) -> RoundPolicy:
        """The quorum and deadline in force (the configured ones, as changed by the operator)."""
        return RoundPolicy(
            min_sites=self.run.min_sites,
            min_sample_fraction=self.run.min_sample_fraction,
            deadline_s=self.run.round_deadline_s,
        )

    def assignment(self, round_number: int, site: SiteRecord) -> Assignment:
        """The site's part in the round, by the method's plan."""
        return self.plan.assignment(round_number, site.site_id, site.lora_rank)

    def _round_view(self, site: SiteRecord | None = None) -> RoundView:
        current = self.current_round()
        assignment = self.assignment(current.round, site) if current and site else Assignment()
        return RoundView(
            run_id=self.run.run_id,
            round=current.round if current else 0,
            state=current.state if current else RoundState.PUBLISHED,
            deadline_ms=current.deadline_ms if current else 0,
            policy=self.policy(),
            finished=self.run.finished,
            base_round=self.latest_published().round,
            assignment=assignment,
        )

    def progress(self, record: RoundRecord, target: RoundState) -> None:
        """Move an open round forward to ``target`` if it is not there yet (caller holds the lock)."""
        new_state = rounds.progress(record.state, target)
        if new_state is not record.state:
            record.state = new_state
            self.store.put(record)
            self._emit("round_state", round_number=record.round, state=new_state)

    def open_next_round(self) -> None:
        """Open the next round, unless paused, finished or short of alive sites (caller holds the lock)."""
        if self.run.paused or self.run.finished:
            return
        alive = self.store.select(SiteRecord, "state = ?", (int(SiteState.ALIVE),))
        if len(alive) < self.config.round.min_sites_to_open:
            return
        number = self.run.current_round + 1
        now = self.now_ms()
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
            memory=self._sum_memory,
        )
        self._open_round = number
        self._admin_close = False
        logger.info("[round] round=%d opened with %d site(s)", number, len(alive))
        self._emit("round_opened", round_number=number, state=RoundState.OPEN)
        self._changed.notify_all()

    def participants(self, round_number: int) -> list[ParticipantRecord]:
        """The sites that had a part in the round, dropped ones included."""
        return self.store.select(ParticipantRecord, "round = ?", (round_number,))

    def accepted_records(self, round_number: int) -> list[UploadRecord]:
        """The round's accepted uploads, in the order they were accepted."""
        return self.store.select(
            UploadRecord, "round = ? AND state = ?", (round_number, int(UploadState.ACCEPTED)), order="seq"
        )

    def _accepted_uploads(self, round_number: int) -> list[tuple[str, DeltaHeader]]:
        return [(u.upload_id, header_from_bytes(u.header)) for u in self.accepted_records(round_number)]

    def _tally(self, record: RoundRecord) -> rounds.Tally:
        accepted = self.accepted_records(record.round)
        live = [p for p in self.participants(record.round) if not p.dropped]
        return rounds.Tally(
            accepted=len(accepted),
            accepted_samples=sum(u.sample_count for u in accepted),
            alive_participants=len(live),
            expected_samples=sum(p.num_samples for p in live),
            now_ms=self.now_ms(),
            deadline_ms=record.deadline_ms,
        )

    def round_accepts(self, round_number: int) -> bool:
        """Whether ``round_number`` is open for uploads; no lock and no query (called for every chunk)."""
        return round_number != 0 and round_number == self._open_round

    def request_close(self) -> None:
        """Have the next tick close the open round, quorum or not, paused or not (caller holds the lock)."""
        self._admin_close = True

    def tick(self) -> None:
        """One pass of the round loop: liveness, then close/fail/publish/open as due."""
        close_round = 0
        with self._lock:
            self._check_liveness()
            current = self.current_round()
            if current is None or current.state.is_final or self.run.finished:
                # Also between rounds: the next one may be waiting for min_sites_to_open sites.
                if not self.run.finished and not self.run.paused:
                    self.open_next_round()
                return
            if not current.state.accepts_uploads:
                return
            if self.run.paused and not self._admin_close:
                return
            decision = rounds.decide(self.policy(), self._tally(current), admin_close=self._admin_close)
            if decision.fail:
                self._fail_round(current, decision.reason)
                return
            if not decision.close:
                return
            current.state = rounds.advance(current.state, RoundState.AGGREGATING)
            self._open_round = 0
            current.closed_ms = self.now_ms()
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
        self._wake.set()  # the next round may open now

    def _fail_round(self, record: RoundRecord, reason: str) -> None:
        record.state = rounds.advance(record.state, RoundState.FAILED)
        self._open_round = 0
        record.closed_ms = self.now_ms()
        record.failure_reason = reason
        with self.store.transaction():
            self.store.put(record)
            self._abandon_uploads(record.round, "the round failed")
        if self.acc is not None:
            self.acc.detach()
        logger.warning("[round] round=%d failed: %s", record.round, reason)
        self._emit("round_failed", round_number=record.round, state=RoundState.FAILED, detail=reason)
        self._changed.notify_all()
        self.open_next_round()

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
        accepted = self.accepted_records(round_number)
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
            if acc is not None and acc.round == round_number:
                acc.release()  # replaced by the rebuilt sum, which may reuse its memory
            acc = Accumulation(
                round_number,
                self.manifest,
                self.config.accumulator,
                uniform=self.plan.uniform_weights,
                memory=self._sum_memory,
            )
            rebuild(acc, [(u.upload_id, header_from_bytes(u.header)) for u in accepted], self.spool)
        previous = self.latest_published()
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
                scratch=self._read_memory,
            )
        except Exception as exc:
            acc.release()
            logger.exception("[round] round=%d aggregation failed", round_number)
            with self._lock:
                self.optimizer = self._load_optimizer()  # drop half-applied optimizer steps
                self._fail_round(record, f"aggregation failed: {exc}")
            return
        acc.release()
        self._finish_publish(record, accepted, result)

    def _aggregate_replacing(self, record: RoundRecord, accepted: list[UploadRecord]) -> None:
        """FlexLoRA: the next adapters come from the SVD of the round's full-size ΔW (server.flexlora_round)."""
        assert isinstance(self.plan, FlexLoraPlan)
        previous = self.latest_published()
        sites = {s.site_id: s for s in self.store.select(SiteRecord)}
        uploads = []
        for u in accepted:
            rank = self.plan.rank_of(sites[u.site_id].lora_rank if u.site_id in sites else 0)
            uploads.append(
                FlexUpload(
                    upload_id=u.upload_id,
                    header=header_from_bytes(u.header),
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
            record.published_ms = self.now_ms()
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
                self.open_next_round()
            self._changed.notify_all()

    def _save_optimizer(self) -> str:
        state = self.optimizer.state_dict()
        if not state:
            return ""
        temp = self.blobs.temp_path(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(temp))
        return self.blobs.adopt(temp)

    def _collect_garbage(self) -> None:
        """Keep the last ``keep_states`` published states and snapshots (round 0 always), and the
        differences a FetchDiff may still send (server.fetching.servable_diffs).

        Dropped files go to the blob store's recycler: the next round writes its
        difference and state over their blocks instead of growing the disk and
        the page cache by a payload a round.
        """
        published = self.store.select(RoundRecord, "state = ? AND round > 0", (int(RoundState.PUBLISHED),))
        if not published:
            return
        cut = max(0, len(published) - self.config.keep_states)
        servable = servable_diffs(published, self.fetching.snapshot_estimate(published[-1]))
        # Blobs are named by content: a round whose difference was all zeros has its predecessor's
        # state file (and two such rounds one difference), so a blob still named by a kept round
        # (or round 0) must stay.
        kept = {b for r in published[cut:] for b in (r.state_blob, r.snapshot_blob) if b}
        kept |= {r.diff_blob for r in published if r.round in servable and r.diff_blob}
        kept |= {
            b
            for r in self.store.select(RoundRecord, "round = 0")
            for b in (r.state_blob, r.snapshot_blob)
            if b
        }
        for index, record in enumerate(published):
            dropped = []
            if index < cut and (record.state_blob or record.snapshot_blob):
                dropped += [record.state_blob, record.snapshot_blob]
                record.state_blob = record.snapshot_blob = ""
                record.snapshot_header = b""
            if record.round not in servable and record.diff_blob:
                dropped.append(record.diff_blob)
                record.diff_blob = ""
                record.diff_header = b""
            if not dropped:
                continue
            self.store.put(record)
            for blob in dropped:
                if blob and blob not in kept:
                    self.blobs.delete(blob)

    def _check_liveness(self) -> None:
        limit = int(self.config.heartbeat_interval_s * self.config.missed_beats * 1000)
        now = self.now_ms()
        current = self.current_round()
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
        event = Event(self.now_ms(), round_number, kind, site_id, state, detail)
        for q in list(self._subscribers):
            # A watcher that stopped reading loses events rather than stalling the run.
            with contextlib.suppress(queue.Full):
                q.put_nowait(event)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gdfed-rounds", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.config.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:
                logger.exception("[round] tick failed; the loop goes on")

    def wake(self) -> None:
        """Have the round loop tick now (an upload was accepted: the quorum may be met)."""
        self._wake.set()

    def stop_rounds(self) -> None:
        """Stop the round loop (liveness, quorum, deadlines) and wake long polls; the first step of a shutdown.

        While the server drains its calls it refuses new ones, heartbeats included: the loop
        must not drop the sites, or close their round, for beats they cannot send.
        """
        self._stop.set()
        self._wake.set()
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
            self.intake.cancel_all("the aggregator is shutting down")
            while self.intake.receiving and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
            if self.intake.receiving:
                logger.warning("[serve] %d upload(s) still receiving at shutdown", self.intake.receiving)
            self._changed.notify_all()
        self.folder.stop()
        self.store.close()
