"""Real federations for tests: the tiny demo model, an in-process aggregator and real workers in threads."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from client.demo_init import init_demo
from client.init_state import write_init_state
from client.worker import Worker
from client.worker_config import WorkerConfig
from common.spec import TrainingSpec
from server.config import RoundPolicy, ServerConfig
from tests.scripted import make_config, token_of


def tiny_demo(root: Path, examples_per_site: int = 80, eval_examples: int = 30) -> Path:
    """The demo's model (no pretraining) and three sites' data under ``root``."""
    init_demo(root, examples_per_site=examples_per_site, eval_examples=eval_examples, pretrain_steps=0)
    return root


def demo_config(
    tmp: Path, demo: Path, sites: list[str], spec: TrainingSpec, rounds: int, **overrides: Any
) -> ServerConfig:
    """An aggregator config whose round-0 state is the demo model's trainable tensors under ``spec``.

    Round 1 waits for every site: a worker loads its model at its own pace.
    """
    overrides.setdefault("round", RoundPolicy(min_sites_to_open=len(sites)))
    overrides.setdefault("heartbeat_interval_s", 0.3)
    overrides.setdefault("missed_beats", 40)
    config = make_config(tmp, sites, training=spec, rounds=rounds, **overrides)
    init = tmp / "model-init.safetensors"
    write_init_state(demo / "model", init, spec)
    return replace(config, init_state=init)


def demo_worker(target: str, site: str, demo: Path, tmp: Path, *, data: str = "", **config: Any) -> Worker:
    """A worker for ``site`` on the demo model, its state in ``tmp/site`` (``data``: another site's file)."""
    return Worker(
        WorkerConfig(
            aggregator=target,
            site_id=site,
            token=token_of(site),
            model=demo / "model",
            data=demo / "data" / f"{data or site}.jsonl",
            state_dir=tmp / site,
            quiet=True,
            **config,
        )
    )


def run_workers(workers: list[Worker], timeout: float = 240) -> list[int]:
    """Run each worker in a thread until the run ends; their exit codes, in finishing order."""
    codes: list[int] = []
    threads = [threading.Thread(target=lambda w=w: codes.append(w.run())) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return codes
