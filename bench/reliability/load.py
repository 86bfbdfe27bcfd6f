"""Many concurrent sites on one daemon: every round must publish with all of them, and each
upload's latency (first message sent to receipt, queueing for an upload slot included) is
recorded for its p50 and p99.

The sites are scripted, in this process, one thread each, with tiny states (the point is the
daemon's handling of many callers, not bandwidth); one thread heartbeats for all of them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from bench.reliability.daemon import Admin, Daemon, DaemonSpec
from bench.reliability.sites import ResilientSite
from common.pb.gradualdiff.v1 import federation_pb2


@dataclass
class LoadFigures:
    """The load test's outcome."""

    sites: int = 0
    rounds: int = 0
    rounds_published: int = 0
    uploads: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"model.layers.0.w": torch.randn(64, 64, generator=gen) * 0.02, "model.norm": torch.ones(64)}


def run(root: Path, *, sites: int, rounds: int, log: Callable[[str], None] = print) -> LoadFigures:
    """``sites`` concurrent sites for ``rounds`` rounds on a fresh daemon in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    init = root / "init.safetensors"
    state = _state()
    save_file(state, str(init))
    names = [f"site{i:03d}" for i in range(sites)]
    # The default fair-share total (128 long calls) is sized for fewer sites; each of these holds an
    # upload and a poll at times, as the operator guide says to allow for.
    daemon = Daemon(root, DaemonSpec(names, init, rounds, {"max_long_calls": max(128, 3 * sites)}))
    figures = LoadFigures(sites=sites, rounds=rounds)
    started = time.monotonic()
    daemon.start()
    clients = [ResilientSite(daemon.target, n, 10 + i % 7, patience_s=120) for i, n in enumerate(names)]
    lock = threading.Lock()
    stop = threading.Event()

    def beat_all() -> None:
        while not stop.wait(0.5):
            for c in clients:
                if stop.is_set():
                    return
                with contextlib.suppress(grpc.RpcError):
                    c.stub.Heartbeat(
                        federation_pb2.HeartbeatRequest(site_id=c.site_id, phase=federation_pb2.PHASE_IDLE),
                        metadata=c.metadata,
                        timeout=5,
                    )

    def site_loop(index: int) -> None:
        client = clients[index]
        gen = torch.Generator().manual_seed(index)
        try:
            client.join()
            after = 0
            for _ in range(rounds):
                spec = client.await_round(after=after)
                if spec.run_finished:
                    return
                delta = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in state.items()}
                upload = client.encode(
                    delta,
                    round=spec.round,
                    base=spec.base_round,
                    upload_id=f"load-{spec.round}-{client.site_id}",
                )
                t0 = time.monotonic()
                client.push(upload)
                with lock:
                    figures.latencies_s.append(time.monotonic() - t0)
                    figures.uploads += 1
                after = spec.round
        except Exception as exc:
            with lock:
                figures.errors.append(f"{client.site_id}: {type(exc).__name__}: {exc}")

    beater = threading.Thread(target=beat_all, name="load-beats", daemon=True)
    admin = Admin(daemon.target)
    try:
        beater.start()
        threads = [threading.Thread(target=site_loop, args=(i,), name=f"load-{i}") for i in range(sites)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        for number in range(1, rounds + 1):
            try:
                status = admin.wait_round_done(number, timeout=60)
            except TimeoutError as exc:
                figures.errors.append(str(exc))
                continue
            accepted = sum(p.accepted for p in status.participants)
            if status.state == federation_pb2.ROUND_STATE_PUBLISHED and accepted == sites:
                figures.rounds_published += 1
            else:
                figures.errors.append(
                    f"round {number}: {federation_pb2.RoundState.Name(status.state)} with {accepted} of {sites}"
                )
    finally:
        stop.set()
        beater.join(10)
        admin.close()
        for c in clients:
            c.close()
        daemon.stop()
    figures.seconds = time.monotonic() - started
    log(
        f"[load] {sites} sites x {rounds} rounds: {figures.rounds_published} published, upload p50 "
        f"{figures.percentile(0.5):.3f} s, p99 {figures.percentile(0.99):.3f} s ({figures.seconds:.0f} s)"
    )
    return figures
