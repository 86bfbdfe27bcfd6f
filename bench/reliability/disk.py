"""A full disk under a real daemon: its state directory on a small tmpfs, filled up twice.

1. While an upload streams in: the sender is refused (RESOURCE_EXHAUSTED or UNAVAILABLE, never
   INTERNAL), the daemon stays healthy, and once space returns the same upload resumes and counts.
2. While a round publishes: publication is retried, the round stays AGGREGATING with its uploads,
   and once space returns it publishes by itself, with no restart.

Mounting needs root (or CAP_SYS_ADMIN). Where the machine does not allow it, the same two
moments are made by failing writes at the storage layer instead: the state's ``tmp/`` (where
every blob is written first) replaced by a file, as tests/test_publish_failures.py does; the
upload case then has no equivalent and is reported as not run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.reliability.daemon import Admin, Daemon, DaemonSpec, unexpected_tracebacks
from bench.reliability.sites import ResilientSite
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2

SITES = {"a": 10, "b": 30, "c": 5}  # c never uploads: rounds close when the operator says


@dataclass
class DiskFigures:
    """What the full disk did."""

    mode: str = ""  # tmpfs | injected
    events: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # status codes the full disk was answered with
    rounds_failed: int = 0
    lost: int = 0
    double_counted: int = 0
    tracebacks: int = 0
    errors: list[str] = field(default_factory=list)


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` (e.g. "64k") on ``path``: a disk that fills; False where not allowed.

    Needs root or CAP_SYS_ADMIN; the caller unmounts (``umount -l``). The disk-full tests use it too.
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _fill(folder: Path, leave: int = 0) -> Path:
    """Fill the disk ``folder`` is on, then free ``leave`` bytes; the filler file."""
    filler = folder / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"model.layers.0.w": torch.randn(256, 256, generator=gen) * 0.02, "model.norm": torch.ones(256)}


def _delta(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in _state().items()}


def _close(admin: Admin) -> None:
    admin.stub.CloseRound(admin_pb2.ControlRequest(reason="campaign"), metadata=admin.metadata, timeout=10)


def _check_round(admin: Admin, number: int, acked: int, figures: DiskFigures) -> None:
    status = admin.wait_round_done(number, timeout=60)
    if status.state != federation_pb2.ROUND_STATE_PUBLISHED:
        figures.rounds_failed += 1
        figures.errors.append(f"round {number}: {federation_pb2.RoundState.Name(status.state)}")
    expected = acked
    if status.samples < expected:
        figures.lost += 1
    elif status.samples > expected:
        figures.double_counted += 1


def run(root: Path, log: Callable[[str], None] = print) -> DiskFigures:
    root.mkdir(parents=True, exist_ok=True)
    init = root / "init.safetensors"
    save_file(_state(), str(init))
    state_dir = root / "state"
    figures = DiskFigures(mode="tmpfs" if mount_tmpfs(state_dir, "3m") else "injected")
    daemon = Daemon(root, DaemonSpec(list(SITES), init))
    sites = {s: ResilientSite(daemon.target, s, n, patience_s=60) for s, n in SITES.items()}
    admin = Admin(daemon.target)
    try:
        daemon.start()
        for site in sites.values():
            site.join()
            site.start_beating()
        a, b = sites["a"], sites["b"]
        spec = a.await_round(after=0)
        a.push(a.encode(_delta(1), round=1, base=0, upload_id="a-1"))
        if figures.mode == "tmpfs":
            filler = _fill(state_dir)
            figures.events += 1
            done: list[object] = []
            upload = b.encode(_delta(2), round=1, base=0, upload_id="b-1")
            pusher = threading.Thread(target=lambda: done.append(b.push(upload)), daemon=True)
            pusher.start()
            deadline = time.monotonic() + 20
            while not b.codes and time.monotonic() < deadline:  # refused at least once
                time.sleep(0.05)
            healthy = daemon.healthy()
            filler.unlink()
            pusher.join(60)
            if not done or not healthy:
                figures.errors.append(
                    f"upload on a full disk: acked {bool(done)}, healthy while full {healthy}"
                )
            figures.refusals.update(b.codes)
        else:
            b.push(b.encode(_delta(2), round=1, base=0, upload_id="b-1"))
        _close(admin)
        _check_round(admin, 1, 40, figures)

        spec = a.await_round(after=1)
        for site, seed in ((a, 3), (b, 4)):
            site.push(
                site.encode(
                    _delta(seed), round=spec.round, base=spec.base_round, upload_id=f"{site.site_id}-2"
                )
            )
        log_before = len(daemon.log_text())
        if figures.mode == "tmpfs":
            filler = _fill(state_dir, leave=48 * 1024)  # room for the close's record, not the new state
        else:
            tmp = state_dir / "tmp"
            shutil.rmtree(tmp)
            tmp.write_text("not a directory: every blob write fails\n")
        figures.events += 1
        _close(admin)
        deadline = time.monotonic() + 20
        while "publication attempt" not in daemon.log_text()[log_before:] and time.monotonic() < deadline:
            time.sleep(0.05)
        if admin.round(2).state != federation_pb2.ROUND_STATE_AGGREGATING or not daemon.healthy():
            figures.errors.append("publication on a full disk: not AGGREGATING, or the daemon unhealthy")
        if figures.mode == "tmpfs":
            filler.unlink()
        else:
            tmp.unlink()
            tmp.mkdir()
        _check_round(admin, 2, 40, figures)
    except Exception as exc:
        figures.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        admin.close()
        for site in sites.values():
            site.close()
        daemon.stop()
        figures.tracebacks = unexpected_tracebacks(daemon.log_text())
        if figures.mode == "tmpfs":
            subprocess.run(["umount", "-l", str(state_dir)], capture_output=True, timeout=10)
    log(
        f"[disk] {figures.mode}: {figures.events} full-disk event(s), refused with {figures.refusals}, "
        f"{figures.rounds_failed} round(s) failed, errors {figures.errors}"
    )
    return figures
