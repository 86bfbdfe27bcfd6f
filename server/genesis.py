"""The run's record and its round 0: found in the state directory, or created from the initial state.

A state directory holds one run. The first start writes the run's training
spec (``common.state_dir``, for ``gdfed export``), the run record and round 0
(the initial trainable state, published, with its snapshot); every later start
finds them and refuses a ``run_id`` that names another run, or a ``[training]``
section that changes what the state's tensors mean (``STRUCTURAL``). Other
changes (learning rate, steps, precision...) are the operator's to make between
restarts: they are logged, field by field, and the recorded spec follows them,
so ``gdfed export`` reads what the sites last trained with.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import torch

from common.errors import FailedPrecondition
from common.spec import TrainingSpec
from common.state_dir import read_training_spec, write_training_spec
from common.statefile import StateReader, write_state
from server.blobs import BlobStore
from server.config import ServerConfig
from server.methods import plan_of
from server.publish import StoredPayload, store_initial_state
from server.records import RoundRecord, RoundState, RunRecord, check_id
from server.store import Store

logger = logging.getLogger(__name__)


def load_or_create_run(
    config: ServerConfig, store: Store, blobs: BlobStore, now_ms: Callable[[], int]
) -> RunRecord:
    """The run of ``config.state_dir``; created (with round 0) from ``config.init_state`` if there is none."""
    runs = store.select(RunRecord)
    if runs:
        run = runs[0]
        if config.run_id and config.run_id != run.run_id:
            raise FailedPrecondition(
                f"state directory {config.state_dir} holds run {run.run_id!r}, not {config.run_id!r}",
                field="run_id",
            )
        _check_wire_revision(config, store)
        _reconcile_spec(config)
        return run
    if config.init_state is None:
        raise FailedPrecondition(
            f"{config.state_dir} holds no run yet: give --init-state, the trainable state at round 0 "
            "(a safetensors file)",
            field="init_state",
        )
    run_id = config.run_id or f"run-{uuid.uuid4().hex[:12]}"
    check_id(run_id, "run_id")
    init = _initial_state_file(config, blobs)
    state_blob, snapshot, _ = store_initial_state(blobs, init, run_id)
    if init != config.init_state:
        init.unlink(missing_ok=True)
    run = record_new_run(
        config, store, run_id, now_ms(), 0, state_blob, snapshot, close_reason="initial state"
    )
    logger.info("[run] created run=%s from %s", run_id, config.init_state)
    return run


def record_new_run(
    config: ServerConfig,
    store: Store,
    run_id: str,
    created_ms: int,
    number: int,
    state_blob: str,
    snapshot: StoredPayload,
    *,
    close_reason: str,
) -> RunRecord:
    """Record a new run whose first published round is ``number`` (0 for a root; an intermediate
    starts at its parent's round), its state ``state_blob`` and its snapshot, in one transaction.

    A run starting past round 0 also gets a round-0 record standing for that round, so that
    queries for "round 0" (a worker holding nothing) find a published state.
    """
    policy = config.round
    run = RunRecord(
        run_id=run_id,
        created_ms=created_ms,
        current_round=number,
        min_sites=policy.min_sites,
        min_sample_fraction=policy.min_sample_fraction,
        round_deadline_s=policy.deadline_s,
        min_sites_to_open=policy.min_sites_to_open,
    )
    start = RoundRecord(
        round=number,
        state=RoundState.PUBLISHED,
        opened_ms=created_ms,
        published_ms=created_ms,
        close_reason=close_reason,
        state_blob=state_blob,
        snapshot_blob=snapshot.blob,
        snapshot_header=snapshot.header,
        snapshot_bytes=snapshot.nbytes,
        snapshot_layout=snapshot.layout,
    )
    # Before the run record: a run found at a later start always has its spec beside it.
    write_training_spec(config.state_dir, config.training)
    with store.transaction():
        store.put(run)
        store.put(start)
        if number > 0:
            store.put(replace(start, round=0, close_reason=f"stands for round {number}, where this joined"))
    return run


def _check_wire_revision(config: ServerConfig, store: Store) -> None:
    """Refuse a state directory written for wire revision 1 of gradualdiff.v1.

    Revision 1 kept a stored payload's shard specs in its header; revision 2 (issue 19) sends them
    with the chunks and keeps the layout beside the header, which revision 1 did not record. The
    protocol had no outside users then: such a run is not converted, it is refused by name.
    """
    for record in store.select(RoundRecord):
        if (record.snapshot_header and not record.snapshot_layout) or (
            record.diff_header and not record.diff_layout
        ):
            raise FailedPrecondition(
                f"state directory {config.state_dir} was written by an aggregator of wire revision 1 of "
                f"gradualdiff.v1 (round {record.round}'s payload has no recorded layout); this aggregator "
                "speaks wire revision 2 and cannot serve it: start a new run in another --state-dir",
                field="state_dir",
            )


# Fields whose change would make the stored state mean something else (other tensors, another
# method's bookkeeping, another scaling of the LoRA product): refused on a restart.
STRUCTURAL = ("method", "mode", "trainable_patterns", "lora.rank", "lora.alpha", "lora.target_modules")


def spec_changes(recorded: TrainingSpec, configured: TrainingSpec) -> dict[str, tuple[object, object]]:
    """Every field (``lora.*`` and ``upload_codec.*`` one level down) that differs: name -> (was, is)."""
    changes: dict[str, tuple[object, object]] = {}
    for f in fields(TrainingSpec):
        was, now = getattr(recorded, f.name), getattr(configured, f.name)
        if was == now:
            continue
        if f.name in ("lora", "upload_codec"):
            for inner in fields(type(was)):
                a, b = getattr(was, inner.name), getattr(now, inner.name)
                if a != b:
                    changes[f"{f.name}.{inner.name}"] = (a, b)
        else:
            changes[f.name] = (was, now)
    return changes


def _reconcile_spec(config: ServerConfig) -> None:
    recorded = read_training_spec(config.state_dir)
    if recorded is None:  # a directory from before runs recorded their spec: start recording now
        write_training_spec(config.state_dir, config.training)
        return
    changes = spec_changes(recorded, config.training)
    structural = {name: change for name, change in changes.items() if name in STRUCTURAL}
    if structural:
        said = "; ".join(f"training.{n} {was!r} -> {now!r}" for n, (was, now) in structural.items())
        raise FailedPrecondition(
            f"[training] contradicts the run in {config.state_dir}: {said}. These change what the "
            "stored state means; start a new run (another --state-dir) to train that way",
            field=f"training.{next(iter(structural))}",
        )
    if changes:
        for name, (was, now) in changes.items():
            logger.warning("[run] training.%s changed since the last start: %r -> %r", name, was, now)
        write_training_spec(config.state_dir, config.training)


def _initial_state_file(config: ServerConfig, blobs: BlobStore) -> Path:
    """The operator's initial state, or a temporary copy with the tensors the method adds to it
    (FedCyBGD's travelling optimizer state, zero at round 0)."""
    assert config.init_state is not None
    reader = StateReader(config.init_state)
    plan = plan_of(config, reader.manifest)
    manifest = plan.initial_manifest()
    if manifest == plan.manifest:
        return config.init_state
    names = {t.name for t in reader.manifest}
    path = blobs.temp_path(".safetensors")
    write_state(
        path,
        manifest,
        lambda spec: reader.read(spec.name) if spec.name in names else torch.zeros(spec.shape),
    )
    return path
