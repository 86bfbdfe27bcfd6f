"""The worker: what a data-holding site runs, round after round.

    join ─> (first contact: fetch the snapshot) ─> loop:
        await a round ─> sync to its base round (apply the global differences)
        ─> train the local steps ─> delta = trained − start ─> encode to disk,
           pushed as it is written (resuming after any cut)
        ─> back to the start state ─> next round

A heartbeat thread (client.heartbeat) beats from the moment of Join, the
model's loading included, reporting phase, step, loss, the last problem and
phase timings, and obeys the aggregator's directives (stop, abort the round).
Every call rides out an aggregator that is away or restarting (common.retry,
bounded by ``max_wait_s`` from the first failure). Everything needed to resume
lives in the state directory: the state it holds and any upload not yet
acknowledged, so a restarted worker picks up where it stopped.

``run`` returns an exit code (client.exits): 0 the run finished, 1 evicted,
refused, or the aggregator away for longer than ``max_wait_s``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace

import grpc
import torch

from client import exits, optimizer_state, stats
from client.data import Example, read_jsonl, split, tokenize, training_batches
from client.delta_source import Difference, trained_values
from client.delta_stub import DeltaStub
from client.feedback import UploadFeedback, upload_accepted
from client.heartbeat import Heartbeat, ProblemLog, Status, one_line
from client.local_state import LocalState, Pending
from client.model import (
    LoadedModel,
    fingerprint,
    load_model,
    load_trainable,
    pick_device,
    trainable_state,
)
from client.outgoing import Outgoing, start_encoding
from client.progress import Progress
from client.ranks import SOLO, Ranks
from client.train import Aborted, RoundTraining
from client.transfer import (
    MAX_WAIT_S,
    PUSH,
    RESUMABLE,
    RoundOver,
    StoredPayload,
    Sync,
    Synced,
    push,
)
from client.worker_config import RoundReport, WorkerConfig
from common.channel import ChannelConfig, auth_metadata, open_channel
from common.codec import manifest_of
from common.codec.compact import is_lossy
from common.delta import DeltaHeader, DeltaKind, PayloadSpec, UploadMetrics
from common.errors import GdfedError
from common.lora import slice_state
from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from common.retry import Retrier, RetryPolicy
from common.serde import training_spec_from_proto
from common.spec import Device, Method, Phase, RoundState, TrainingSpec, TrainMode

logger = logging.getLogger(__name__)

# The worker's unary calls and fetches: waits of up to 15 s, for up to max_wait_s (an aggregator
# restarting), given up at once when the worker is told to stop.
CALLS = RetryPolicy(max_delay=15.0, max_elapsed=MAX_WAIT_S, retry_on=RESUMABLE)
# Round states a site may still train and upload in.
TAKES_UPLOADS: frozenset[int] = frozenset(int(s) for s in RoundState if s.accepts_uploads)


class Worker:
    """One site's worker process."""

    ranks: Ranks = SOLO  # a site on several processes: rank 0's hooks for the others (client.ranks)

    def __init__(
        self, config: WorkerConfig, *, on_round: Callable[[RoundReport], None] = lambda r: None
    ) -> None:
        self.config = config
        self.on_round = on_round
        self.local = LocalState(config.state_dir)
        self.progress = Progress(quiet=config.quiet)
        self._status = Status()
        self._beats: Heartbeat | None = None
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
        self._deltas = DeltaStub(self._channel)  # PushDelta, FetchDiff: chunks without protobuf copies
        self._meta = auth_metadata(config.token)
        stop = self._status.stop
        self._retry = Retrier(
            replace(CALLS, max_elapsed=config.max_wait_s), sleep=stop.wait, stopped=stop.is_set
        )
        self._push = replace(PUSH, max_elapsed=config.max_wait_s)
        self.feedback = UploadFeedback(
            config.state_dir,
            accepted=upload_accepted(self._stub, self._meta, config.site_id, retrier=self._retry),
        )
        self.reports: list[RoundReport] = []

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        """Work until the run ends (or ``max_rounds``, or a stop directive). Returns an exit code."""
        c, s = self.config, self._status
        failed: grpc.RpcError | None = None
        with ProblemLog(s):
            try:
                code = self._work()
            except grpc.RpcError as exc:
                failed, code = exc, exits.FAILED
                s.problem = one_line(f"ERROR {exits.describe(exc)}")
            except Exception as exc:
                s.problem = one_line(f"ERROR {type(exc).__name__}: {exc}")
                raise
            finally:
                s.stop.set()
                if self._beats is not None:
                    # A last beat leaves the operator (`gdfed status --site`) the final timings and why
                    # the worker failed, if it did; its answer tells a refused worker it was evicted.
                    self._beats.stop(last_word=not s.evicted)
                self._channel.close()
            if failed is not None:
                code = exits.gave_up(
                    failed, s, site_id=c.site_id, aggregator=c.aggregator, max_wait_s=c.max_wait_s
                )
        return code

    def _work(self) -> int:
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
        join = self._retry.call(
            "join",
            lambda: self._stub.Join(
                federation_pb2.JoinRequest(
                    site_id=c.site_id,
                    capabilities=federation_pb2.Capabilities(
                        device=federation_pb2.Device.ValueType(
                            Device.CUDA if device.type == "cuda" else Device.CPU
                        ),
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
        # Beat from now on, whatever the worker does: the aggregator counts silence from Join.
        self._status.phase = Phase.LOADING
        self._beats = Heartbeat(
            self._stub,
            self._meta,
            c.site_id,
            self._status,
            interval_s=(join.heartbeat_interval_ms or 5000) / 1000,
        )
        self._beats.start()
        run_id = join.run_id
        spec = training_spec_from_proto(join.current.training)
        self.ranks.loading(spec)
        with self._status.timed(Phase.LOADING, "load"):
            loaded = load_model(c.model, spec, device, lora_rank=c.lora_rank)
            train = tokenize(train_records, loaded.tokenizer, spec.max_seq_len)
            held_out = tokenize(eval_records, loaded.tokenizer, spec.max_seq_len)
        logger.info("[worker] model loaded in %.1fs", self._status.timings["load"])
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
        while not self._status.stop.is_set():
            round_spec = self._await(done)
            if round_spec is None:
                continue
            if round_spec.run_finished:
                logger.info("[worker] the run is finished")
                self._final_sync(run_id, held_round, state)
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
            report = self._round(loaded, round_spec, start, train, held_out, run_id)
            if report is not None:
                report.bytes_down = bytes_down
                self.reports.append(report)
                self.on_round(report)
            done = round_spec.round
            rounds += 1
            if c.max_rounds and rounds >= c.max_rounds:
                break
        if self._status.evicted:
            return exits.evicted(c.site_id, c.aggregator, self._status.evicted)
        return exits.FINISHED

    def _await(self, after: int) -> federation_pb2.RoundSpec | None:
        self._status.phase = Phase.IDLE
        spec: federation_pb2.RoundSpec = self._retry.call(
            "await",
            lambda: self._stub.AwaitRound(
                federation_pb2.AwaitRoundRequest(
                    site_id=self.config.site_id, after_round=after, wait_ms=30_000
                ),
                metadata=self._meta,
                timeout=45,
            ),
        )
        if spec.run_finished or (spec.round > after and spec.state in TAKES_UPLOADS and not spec.sits_out):
            return spec
        return None

    def _final_sync(self, run_id: str, held_round: int, state: dict[str, torch.Tensor]) -> None:
        """The site keeps the run's final model: what was published since its last sync.

        Best effort: the run is over whatever happens here, so a failure (an aggregator already
        shut down, say) is logged and the worker still ends as finished, holding ``held_round``.
        """
        try:
            synced = self._sync(held_round, state)
        except (grpc.RpcError, GdfedError) as exc:
            logger.warning(
                "[worker] could not fetch the run's final round; keeping round %d: %s", held_round, exc
            )
            return
        if synced.round != held_round:
            self.local.save_held(run_id, synced.round, state)

    def _sync(
        self,
        held_round: int,
        state: dict[str, torch.Tensor],
        *,
        snapshot: bool = False,
        only: tuple[str, ...] = (),
    ) -> Synced:
        with (
            self._status.timed(Phase.SYNCING, "sync"),
            self.progress.bytes(f"{self.config.site_id} fetch") as bar,
        ):
            # One Sync across retries: after a broken stream it resumes from the round it reached.
            sync = Sync(
                self._deltas,
                self._meta,
                self.config.site_id,
                held_round,
                state,
                snapshot=snapshot,
                only_prefixes=only,
                progress=bar,
                # The held state is the host's one copy: deltas are spooled to disk, then applied.
                spool_dir=self.local.root,
            )
            # Each delta applied is progress: a chain that keeps breaking but moves on is not given up.
            synced: Synced = self._retry.call("fetch", sync, progress=lambda: sync.deltas)
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
        """One round: train, take the difference, encode and keep it while pushing it, settle error feedback.

        An upload already encoded for this round (a restarted worker) is pushed as it is.
        """
        number = spec_msg.round
        spec = training_spec_from_proto(spec_msg.training)
        self._status.round = number
        pending = self.local.pending(run_id, number)
        # FlexLoRA: this site's rank-r slice of the run's rank-R adapters. FedCyBGD: one block trains.
        if spec_msg.assigned_lora_rank:
            start = slice_state(start, spec_msg.assigned_lora_rank)
        names = list(spec_msg.trainable_tensors) or loaded.trainable
        params, carried = optimizer_state.split(names)  # FedCyBGD: AdamW state may travel with the block
        optimizer_state.fill_missing(start, carried, loaded)
        load_trainable(loaded, start)
        if pending is None:
            trained = self._train(loaded, spec, number, start, params, carried, train, held_out)
            if trained is None:
                return None
            # Δ = trained − start, a piece at a time as the encoder reaches it, read from the model's
            # parameters (docs/worker.md: one fp32 copy of the trainable state on the host, the
            # start). Training's own copy of the trained state is dropped before the encoding.
            values = trained_values(loaded.model, loaded.trainable, trained.state)
            trained.state.clear()
            delta = Difference(values, start, names)
            outgoing = self._encode(spec, spec_msg, run_id, delta, trained, samples=len(train))
            del values, delta  # the encoder's thread holds them until it is done
            try:
                return self._upload(run_id, outgoing.header, outgoing)
            finally:
                # The encoder reads the trained values from the model: back to the start only after it.
                outgoing.wait()
                load_trainable(loaded, start)
        logger.info("[round %d] resuming upload %s", number, pending.header.upload_id)
        stored = StoredPayload(pending.payload, pending.layout)
        return self._upload(run_id, pending.header, stored, resume=True)

    def _train(
        self,
        loaded: LoadedModel,
        spec: TrainingSpec,
        number: int,
        start: dict[str, torch.Tensor],
        params: list[str],
        carried: list[str],
        train: list[Example],
        held_out: list[Example],
    ) -> RoundTraining | None:
        """The local steps from ``start`` and the eval loss; ``None`` (model back at ``start``) if aborted."""
        c, s = self.config, self._status
        s.phase, s.step, s.total = Phase.TRAINING, 0, spec.local_steps
        seed = c.seed * 100_003 + number
        data = training_batches(train, spec.batch_size, loaded.tokenizer.pad_token_id, seed=seed)
        tick = self.progress.steps(f"{c.site_id} round {number}", spec.local_steps)

        def on_step(step: int, loss: float, tokens: int) -> None:
            s.step, s.loss, s.training = step, loss, meter.at(step, tokens)  # the beats': the round so far
            tick(loss)

        meter = stats.RoundMeter(loaded.device)  # the round's clock starts
        try:
            with s.timed(Phase.TRAINING, "train"):
                return self.ranks.train_round(
                    loaded,
                    spec,
                    data,
                    start,
                    params,
                    carried,
                    held_out,
                    on_step=on_step,
                    should_stop=lambda: s.stop.is_set() or s.abort_round == number,
                    number=number,  # where the round's steps fall on the run's lr schedule
                    seed=seed,
                )
        except Aborted as exc:
            logger.warning("[round %d] training aborted: %s", number, exc)
            load_trainable(loaded, start)
            return None
        finally:
            self.progress.close()

    def _encode(
        self,
        spec: TrainingSpec,
        spec_msg: federation_pb2.RoundSpec,
        run_id: str,
        delta: Difference,
        trained: RoundTraining,
        *,
        samples: int,
    ) -> Outgoing:
        """Start encoding ``delta`` (through error feedback) to a payload on disk, on a thread.

        The upload is recorded as pending once the payload is whole (client.outgoing).
        """
        c, number, result, codec = self.config, spec_msg.round, trained.result, spec.upload_codec
        upload_id = f"{c.site_id}-r{number}-{uuid.uuid4().hex[:8]}"
        if is_lossy(codec):
            # Compact forms of e + Δ, Δ a tensor at a time; the new residual kept on disk (client.feedback).
            tensors = self.feedback.prepare(run_id, upload_id, delta, codec)
            manifest = manifest_of(tensors)
            source: Mapping[str, torch.Tensor] = tensors
        else:
            manifest, source = delta.manifest, delta
        header = DeltaHeader(
            spec=PayloadSpec(codec, manifest),
            run_id=run_id,
            round=number,
            site_id=c.site_id,
            upload_id=upload_id,
            sample_count=samples,
            base_round=spec_msg.base_round,
            kind=DeltaKind.DIFF,
            metrics=UploadMetrics(
                train_loss=result.mean_loss,
                eval_loss=trained.eval_loss,
                steps=result.steps,
                train_seconds=result.seconds,
                training=self._status.training,  # as of the round's last step (_train's on_step)
            ),
        )
        return start_encoding(header, source, self.local)

    def _upload(
        self, run_id: str, header: DeltaHeader, payload: Outgoing | StoredPayload, *, resume: bool = False
    ) -> RoundReport | None:
        """Push an upload (whole on disk, or still being encoded), then settle its error feedback.

        ``resume``: an earlier process may have sent part of it; ask the aggregator where it stands.
        """
        number, metrics = header.round, header.metrics
        # Known up front only for an upload encoded whole before (a restarted worker's).
        total = payload.layout.total_bytes if payload.layout is not None else None
        try:
            with (
                self._status.timed(Phase.UPLOADING, "upload"),
                self.progress.bytes(f"{self.config.site_id} upload", total) as bar,
            ):
                receipt = push(
                    self._deltas,
                    self._meta,
                    header,
                    payload,
                    retrier=self._retry.with_policy(self._push),
                    progress=bar,
                    resume=resume,
                )
        except RoundOver as exc:
            logger.warning("[round %d] upload not taken: %s", number, exc)
            # Nothing was counted: e ← e + Δ, with what was sent decoded from the whole payload.
            pending = Pending(header, payload.result(), payload.path)
            self.feedback.not_taken(run_id, pending)
            self.local.clear_pending()
            return None
        layout = payload.result()  # the encoder is done: the last chunk left after it
        self.feedback.acknowledged(run_id, header.upload_id)
        self.local.clear_pending()
        logger.info(
            "[round %d] train loss %.4f, eval loss %.4f, %d steps in %.1fs; sent %d bytes (%s)",
            number,
            metrics.train_loss,
            metrics.eval_loss,
            metrics.steps,
            metrics.train_seconds,
            layout.total_bytes,
            "duplicate" if receipt.duplicate else "accepted",
        )
        return RoundReport(
            number,
            metrics.train_loss,
            metrics.eval_loss,
            layout.total_bytes,
            0,
            metrics.train_seconds,
            metrics.steps,
        )
