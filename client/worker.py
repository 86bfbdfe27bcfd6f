"""The worker: what a data-holding site runs, round after round.

    join ─> (first contact: fetch the snapshot) ─> loop:
        await a round ─> sync to its base round (apply the global differences)
        ─> train the local steps ─> delta = trained − start ─> encode to disk
        ─> push (resuming after any cut) ─> back to the start state ─> next round

A heartbeat thread reports phase, step and loss all along and obeys the
aggregator's directives (stop, abort the round). Everything needed to resume
lives in the state directory: the state it holds and any upload not yet
acknowledged, so a restarted worker picks up where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from client import optimizer_state
from client.data import Example, batches, read_jsonl, split, tokenize
from client.feedback import UploadFeedback, upload_accepted
from client.local_state import LocalState
from client.model import (
    LoadedModel,
    fingerprint,
    load_model,
    load_trainable,
    pick_device,
    trainable_state,
    training_only,
)
from client.progress import Progress
from client.train import Aborted, evaluate, train_steps
from client.transfer import RETRYABLE, RoundOver, Sync, push
from common.channel import ChannelConfig, auth_metadata, open_channel
from common.codec import encode
from common.delta import DeltaHeader, DeltaKind, UploadMetrics
from common.files import rewrite
from common.lora import slice_state
from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from common.serde import codec_from_proto
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode

logger = logging.getLogger(__name__)
T = TypeVar("T")

PHASE_IDLE, PHASE_SYNCING, PHASE_TRAINING, PHASE_UPLOADING = 1, 2, 3, 4
DIRECTIVE_ABORT_ROUND, DIRECTIVE_STOP = 1, 4


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """How one site runs."""

    aggregator: str
    site_id: str
    token: str
    model: Path
    data: Path
    state_dir: Path
    eval_data: Path | None = None  # default: a held-out part of ``data``
    eval_fraction: float = 0.1
    device: str = "auto"
    lora_rank: int = 0  # the rank this site can afford (FlexLoRA); 0 = the run's
    max_rounds: int = 0  # stop after this many rounds; 0 = until the run ends
    quiet: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    seed: int = 0


@dataclass
class RoundReport:
    """What one round cost and gave this site."""

    round: int
    train_loss: float
    eval_loss: float
    bytes_up: int
    bytes_down: int
    train_seconds: float
    steps: int


@dataclass
class _Status:
    round: int = 0
    phase: int = PHASE_IDLE
    step: int = 0
    total: int = 0
    loss: float = 0.0
    abort_round: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


def training_spec(msg: federation_pb2.TrainingSpec) -> TrainingSpec:
    """The wire TrainingSpec as a domain object."""
    lora = msg.lora
    return TrainingSpec(
        method=Method(msg.method or Method.GRADUALDIFF),
        mode=TrainMode(msg.mode or TrainMode.FULL),
        trainable_patterns=tuple(msg.trainable_patterns),
        lora=LoraSpec(
            rank=lora.rank or 8,
            alpha=lora.alpha or 16.0,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules) or ("q_proj", "v_proj"),
        ),
        local_steps=msg.local_steps or 10,
        batch_size=msg.batch_size or 8,
        learning_rate=msg.learning_rate or 1e-4,
        max_seq_len=msg.max_seq_len or 256,
        upload_codec=codec_from_proto(msg.upload_codec)
        if msg.HasField("upload_codec")
        else TrainingSpec().upload_codec,
        seed=msg.seed,
        prox_mu=msg.prox_mu,
    )


class Worker:
    """One site's worker process."""

    def __init__(
        self, config: WorkerConfig, *, on_round: Callable[[RoundReport], None] = lambda r: None
    ) -> None:
        self.config = config
        self.on_round = on_round
        self.local = LocalState(config.state_dir)
        self.progress = Progress(quiet=config.quiet)
        self._status = _Status()
        # The last upload's difference tensors, kept from its push to the next fetch (the worker is
        # idle between) and decoded into there, then dropped before training: the fetch touches no
        # fresh memory and training's peak is unchanged.
        self._spare: dict[str, torch.Tensor] = {}
        self._channel = open_channel(
            ChannelConfig(
                target=config.aggregator,
                token=config.token,
                ca=config.tls_ca,
                cert=config.tls_cert,
                key=config.tls_key,
            )
        )
        self._stub = federation_pb2_grpc.FederationStub(self._channel)
        self._meta = auth_metadata(config.token)
        self.feedback = UploadFeedback(
            config.state_dir, accepted=upload_accepted(self._stub, self._meta, config.site_id)
        )
        self.reports: list[RoundReport] = []

    # ------------------------------------------------------------ plumbing
    def _call(self, what: str, fn: Callable[[], T], *, patience: float = 600) -> T:
        """A unary call, retried with backoff while the aggregator is unreachable or restarting."""
        deadline = time.monotonic() + patience
        wait = 0.5
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > deadline or self._status.stop.is_set():
                    raise
                logger.warning("[%s] %s: %s; retrying in %.1fs", what, exc.code().name, exc.details(), wait)
                time.sleep(wait)
                wait = min(wait * 2, 15.0)

    def _beat_loop(self, interval: float) -> None:
        while not self._status.stop.wait(interval):
            s = self._status
            try:
                reply = self._stub.Heartbeat(
                    federation_pb2.HeartbeatRequest(
                        site_id=self.config.site_id,
                        round=s.round,
                        phase=federation_pb2.Phase.ValueType(s.phase),
                        step=s.step,
                        total_steps=s.total,
                        loss=s.loss,
                    ),
                    metadata=self._meta,
                    timeout=max(5.0, interval),
                )
            except grpc.RpcError as exc:
                logger.debug("[heartbeat] %s", exc.code().name)
                continue
            if reply.directive == DIRECTIVE_STOP:
                logger.warning("[heartbeat] the aggregator says stop: %s", reply.message)
                s.stop.set()
            elif reply.directive == DIRECTIVE_ABORT_ROUND:
                s.abort_round = s.round

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        """Work until the run ends (or ``max_rounds``, or a stop directive). Returns an exit code."""
        c = self.config
        device = pick_device(c.device)
        # What the aggregator needs to know at Join (samples, base model) comes from the files alone,
        # so the site joins once, before the model is loaded.
        records = read_jsonl(c.data)
        if c.eval_data is not None:
            train_records, eval_records = records, read_jsonl(c.eval_data)
        else:
            train_records, eval_records = split(records, c.eval_fraction, c.seed)
        base = fingerprint(c.model)
        join = self._call(
            "join",
            lambda: self._stub.Join(
                federation_pb2.JoinRequest(
                    site_id=c.site_id,
                    capabilities=federation_pb2.Capabilities(
                        device=federation_pb2.Device.ValueType(2 if device.type == "cuda" else 1),
                        lora_rank=c.lora_rank,
                        num_samples=len(train_records),
                    ),
                    base_model_fingerprint=base,
                    client_version="gdfed-worker",
                ),
                metadata=self._meta,
                timeout=30,
            ),
        )
        run_id = join.run_id
        spec = training_spec(join.current.training)
        loaded = load_model(c.model, spec, device, lora_rank=c.lora_rank)
        train = tokenize(train_records, loaded.tokenizer, spec.max_seq_len)
        held_out = tokenize(eval_records, loaded.tokenizer, spec.max_seq_len)
        beats = threading.Thread(
            target=self._beat_loop, args=(join.heartbeat_interval_ms / 1000,), name="heartbeat", daemon=True
        )
        beats.start()
        # FedCyBGD's compressed download trains against the base model's own values outside the
        # fetched blocks: keep them (only then; it is a copy of the trainable state).
        base_state = trainable_state(loaded) if spec.method is Method.FEDCYBGD else {}
        held = self.local.load_held(run_id)
        if held is None:
            state = trainable_state(loaded)
            # The round-0 state is the base model's own weights when the aggregator names the same
            # model (fingerprint) and whole weights train: then only differences need to travel, not
            # the model. Otherwise (LoRA adapters, an unknown base) the first sync is a snapshot.
            same_base = bool(join.base_model_fingerprint) and join.base_model_fingerprint == base
            synced = self._sync(0, state, snapshot=not (same_base and spec.mode is not TrainMode.LORA))
            held_round = synced.round
            self.local.save_held(run_id, held_round, state)
        else:
            state, held_round = held.state, held.round
            logger.info("[worker] resuming run %s from round %d held on disk", run_id, held_round)
        done, rounds = 0, 0
        try:
            while not self._status.stop.is_set():
                round_spec = self._await(done)
                if round_spec is None:
                    continue
                if round_spec.run_finished:
                    logger.info("[worker] the run is finished")
                    break
                bytes_down = 0
                start = state
                if round_spec.download_blocks:
                    start = {name: tensor.clone() for name, tensor in base_state.items()}
                    synced = self._sync(held_round, start, only=tuple(round_spec.download_blocks))
                    bytes_down = synced.bytes
                elif held_round != round_spec.base_round:
                    synced = self._sync(held_round, state)
                    held_round, bytes_down = synced.round, synced.bytes
                    self.local.save_held(run_id, held_round, state)
                self._spare = {}
                report = self._round(loaded, round_spec, start, train, held_out, run_id)
                if report is not None:
                    report.bytes_down = bytes_down
                    self.reports.append(report)
                    self.on_round(report)
                done = round_spec.round
                rounds += 1
                if c.max_rounds and rounds >= c.max_rounds:
                    break
        finally:
            self._status.stop.set()
            beats.join(timeout=5)
            self._channel.close()
        return 0

    def _await(self, after: int) -> federation_pb2.RoundSpec | None:
        self._status.phase = PHASE_IDLE
        spec: federation_pb2.RoundSpec = self._call(
            "await",
            lambda: self._stub.AwaitRound(
                federation_pb2.AwaitRoundRequest(
                    site_id=self.config.site_id, after_round=after, wait_ms=30_000
                ),
                metadata=self._meta,
                timeout=45,
            ),
        )
        if spec.run_finished or (spec.round > after and spec.state in (1, 2, 3) and not spec.sits_out):
            return spec
        return None

    def _sync(
        self,
        held_round: int,
        state: dict[str, torch.Tensor],
        *,
        snapshot: bool = False,
        only: tuple[str, ...] = (),
    ) -> Any:
        self._status.phase = PHASE_SYNCING
        with self.progress.bytes(f"{self.config.site_id} fetch") as bar:
            # One Sync across retries: after a broken stream it resumes from the round it reached.
            sync = Sync(
                self._stub,
                self._meta,
                self.config.site_id,
                held_round,
                state,
                snapshot=snapshot,
                only_prefixes=only,
                progress=bar,
                spare=self._spare,
            )
            self._spare = {}
            synced = self._call("fetch", sync)
        logger.info(
            "[sync] round %d -> %d: %d delta(s)%s, %d bytes",
            held_round,
            synced.round,
            synced.deltas,
            " (snapshot)" if synced.snapshot else "",
            synced.bytes,
        )
        return synced

    def _round(
        self,
        loaded: LoadedModel,
        spec_msg: federation_pb2.RoundSpec,
        start: dict[str, torch.Tensor],
        train: list[Example],
        held_out: list[Example],
        run_id: str,
    ) -> RoundReport | None:
        c, s = self.config, self._status
        number = spec_msg.round
        spec = training_spec(spec_msg.training)
        s.round = number
        pending = self.local.pending(run_id, number)
        # FlexLoRA: this site's rank-r slice of the run's rank-R adapters. FedCyBGD: one block trains.
        if spec_msg.assigned_lora_rank:
            start = slice_state(start, spec_msg.assigned_lora_rank)
        names = list(spec_msg.trainable_tensors) or loaded.trainable
        params, carried = optimizer_state.split(names)  # FedCyBGD: AdamW state may travel with the block
        optimizer_state.fill_missing(start, carried, loaded)
        load_trainable(loaded, start)
        if pending is None:
            s.phase, s.step, s.total = PHASE_TRAINING, 0, spec.local_steps
            data = batches(
                train, spec.batch_size, loaded.tokenizer.pad_token_id, seed=c.seed * 100_003 + number
            )
            tick = self.progress.steps(f"{c.site_id} round {number}", spec.local_steps)

            def on_step(step: int, loss: float) -> None:
                s.step, s.loss = step, loss
                tick(loss)

            try:
                with training_only(loaded, params) as part:
                    adamw = (
                        optimizer_state.restored_adamw(part, start, carried, spec.learning_rate)
                        if carried
                        else None
                    )
                    result = train_steps(
                        part,
                        data,
                        steps=spec.local_steps,
                        lr=spec.learning_rate,
                        on_step=on_step,
                        should_stop=lambda: s.stop.is_set() or s.abort_round == number,
                        prox_mu=spec.prox_mu,
                        optimizer=adamw,
                    )
                    if adamw is not None:
                        moved = optimizer_state.optimizer_tensors(part, adamw, carried)
            except Aborted as exc:
                logger.warning("[round %d] training aborted: %s", number, exc)
                load_trainable(loaded, start)
                return None
            finally:
                self.progress.close()
            eval_loss = evaluate(loaded, held_out, spec.batch_size) if held_out else 0.0
            trained = trainable_state(loaded)
            if carried:
                trained |= moved
            # trainable_state's tensors are this round's own copies: subtracting in place spares a
            # second copy of the trainable state at the round's peak. (Travelling optimizer tensors
            # may be the optimizer's own; those are subtracted out of place.)
            own = set(loaded.trainable)
            delta = {
                name: trained[name].sub_(start[name]) if name in own else trained[name] - start[name]
                for name in names
            }
            load_trainable(loaded, start)
            upload_id = f"{c.site_id}-r{number}-{uuid.uuid4().hex[:8]}"
            payload = self.local.payload_path(upload_id)
            # Lossy codec: compact forms of e + Δ, the new residual kept on disk (client.feedback).
            tensors = self.feedback.prepare(run_id, upload_id, delta, spec.upload_codec)
            with rewrite(payload, self.local.recycler) as sink:
                layout = encode(tensors, spec.upload_codec, sink)
            self._spare = delta
            header = DeltaHeader(
                layout=layout,
                run_id=run_id,
                round=number,
                site_id=c.site_id,
                upload_id=upload_id,
                sample_count=len(train),
                base_round=spec_msg.base_round,
                kind=DeltaKind.DIFF,
                metrics=UploadMetrics(
                    train_loss=result.mean_loss,
                    eval_loss=eval_loss,
                    steps=result.steps,
                    train_seconds=result.seconds,
                ),
            )
            self.local.save_pending(header)
            train_loss, seconds, steps = result.mean_loss, result.seconds, result.steps
        else:
            header, payload = pending.header, pending.payload
            train_loss, eval_loss = header.metrics.train_loss, header.metrics.eval_loss
            seconds, steps = header.metrics.train_seconds, header.metrics.steps
            logger.info("[round %d] resuming upload %s", number, header.upload_id)
        s.phase = PHASE_UPLOADING
        try:
            with self.progress.bytes(f"{c.site_id} upload", header.layout.total_bytes) as bar:
                receipt = push(self._stub, self._meta, header, payload, progress=bar)
        except RoundOver as exc:
            logger.warning("[round %d] upload not taken: %s", number, exc)
            self.feedback.not_taken(run_id, header, payload)  # nothing was counted: e ← e + Δ
            self.local.clear_pending()
            return None
        self.feedback.acknowledged(run_id, header.upload_id)
        self.local.clear_pending()
        logger.info(
            "[round %d] train loss %.4f, eval loss %.4f, %d steps in %.1fs; sent %d bytes (%s)",
            number,
            train_loss,
            eval_loss,
            steps,
            seconds,
            header.layout.total_bytes,
            "duplicate" if receipt.duplicate else "accepted",
        )
        return RoundReport(number, train_loss, eval_loss, header.layout.total_bytes, 0, seconds, steps)
