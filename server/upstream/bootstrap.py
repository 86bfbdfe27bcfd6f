"""An intermediate's start: the parent's run id and training spec, and on the first start its state.

The first start (no run in the state directory) joins the parent, takes its
run id and training spec, fetches a snapshot of its latest published round k
and creates the run here *at round k*: round k published with that state,
``current_round`` k, so that every round number here is the parent's (a site
may move between the aggregators of a tree and keep its held round). A round-0
record names the same state, only so that the chains of differences sites
fetch are weighed against a snapshot's size (server.fetching) as in any run.
A later start takes the run id and the spec recorded then, and needs no
parent: it serves its sites at once and finds the parent in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import grpc
import torch

from common.delta import DeltaHeader, DeltaKind
from common.errors import FailedPrecondition
from common.spec import TrainingSpec
from common.state_dir import read_training_spec
from common.statefile import write_state
from server.blobs import BlobStore
from server.config import ConfigError, ServerConfig
from server.genesis import record_new_run
from server.publish import store_snapshot
from server.records import RunRecord
from server.store import Store
from server.upstream.adopt import Delta, decoded_deltas
from server.upstream.link import UpstreamLink, said

logger = logging.getLogger(__name__)


def prepare(config: ServerConfig, stop: threading.Event | None = None) -> ServerConfig:
    """``config`` with the parent's run id and training spec; the run created here on the first start.

    Raises:
        ConfigError: the configured run id is not the parent's; the parent's spec is one a tree
            cannot run (``server.upstream.settings.check_upstream``, by ``ServerConfig``'s checks).
        grpc.RpcError: the parent could not be reached within ``[upstream] max_wait_s`` (first start).
    """
    recorded = _recorded(config)
    if recorded is not None:
        run_id, spec = recorded
        return replace(config, run_id=run_id, training=spec)
    link = UpstreamLink(config.upstream, stop or threading.Event())
    try:
        logger.info("[upstream] first start: joining the parent at %s for its run", config.upstream.address)
        try:
            joined = link.join(num_samples=0, held_round=0)
        except grpc.RpcError as exc:
            raise ConfigError(
                f"the parent at {config.upstream.address} did not let this aggregator join as "
                f"{config.upstream.site_id!r} within upstream.max_wait_s = {config.upstream.max_wait_s:g}s: "
                f"{said(exc)}; the first start needs the parent's run and state",
                field="upstream.address",
            ) from None
        if config.run_id and config.run_id != joined.run_id:
            raise ConfigError(
                f"run_id = {config.run_id!r}, but the parent at {config.upstream.address} runs "
                f"{joined.run_id!r}; an intermediate's run is its parent's (leave run_id unset)",
                field="run_id",
            )
        configured = replace(config, run_id=joined.run_id, training=joined.current.training)
        try:
            header, tensors = link.retrier.call("upstream snapshot", lambda: _snapshot(link))
        except grpc.RpcError as exc:
            raise ConfigError(
                f"the parent at {config.upstream.address} did not send its state: {said(exc)}",
                field="upstream.address",
            ) from None
        _create_run(configured, header, tensors)
    finally:
        link.close()
    logger.info("[upstream] run=%s created here at the parent's round %d", configured.run_id, header.round)
    return configured


def _recorded(config: ServerConfig) -> tuple[str, TrainingSpec] | None:
    """The run id and training spec of the run in the state directory; None before the first start."""
    path = config.state_dir / "state.db"
    if not path.exists():
        return None
    store = Store(path)
    try:
        runs = store.select(RunRecord)
    finally:
        store.close()
    if not runs:
        return None
    spec = read_training_spec(config.state_dir)
    if spec is None:
        raise FailedPrecondition(
            f"{config.state_dir} holds run {runs[0].run_id!r} without its recorded training spec; "
            "an intermediate needs it: start it in a new --state-dir",
            field="state_dir",
        )
    if config.run_id and config.run_id != runs[0].run_id:
        raise ConfigError(
            f"state directory {config.state_dir} holds run {runs[0].run_id!r}, not {config.run_id!r}",
            field="run_id",
        )
    return runs[0].run_id, spec


def _snapshot(link: UpstreamLink) -> Delta:
    deltas = list(decoded_deltas(link.fetch(0, snapshot=True)))
    if len(deltas) != 1 or deltas[0][0].kind is not DeltaKind.SNAPSHOT:
        raise FailedPrecondition(
            "the parent answered a snapshot request with something else", field="upstream.address"
        )
    return deltas[0]


def _create_run(config: ServerConfig, header: DeltaHeader, tensors: dict[str, torch.Tensor]) -> None:
    """The run at the round of the parent's snapshot ``header``, its state ``tensors`` (see the module docstring)."""
    number = header.round
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.state_dir / "state.db")
    try:
        blobs = BlobStore(config.state_dir)
        manifest = header.spec.manifest
        temp = blobs.temp_path(".safetensors")
        state_blob = blobs.adopt(temp, write_state(temp, manifest, lambda spec: tensors[spec.name]))
        snapshot = store_snapshot(blobs, state_blob, config.run_id, number)
        record_new_run(
            config,
            store,
            config.run_id,
            int(time.time() * 1000),
            number,
            state_blob,
            snapshot,
            close_reason="the parent's state when this aggregator joined its tree",
        )
    finally:
        store.close()
