"""Real worker processes (``gdfed work``) through the fault proxy, SIGKILLed mid-training and
mid-upload and restarted on their state directories; every round must still publish.

The demo's tiny model (no pretraining) keeps training to seconds; 12 local steps make it span
several heartbeats, so the daemon sees the phase the kill waits for. In the workers' processes the
first try of every upload goes slowly (a chunk every 0.3 s: a slow link, patched in with
``python -c`` as tests/test_worker_faults.py does), so a kill can land while it streams.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench.reliability.daemon import ROOT, Admin, Daemon, DaemonSpec, token_of, unexpected_tracebacks
from bench.reliability.proxy import FaultProxy, FaultRates
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2

SITES = ["site-a", "site-b"]
ROUNDS = 3
TRAINING = {"local_steps": 12, "batch_size": 8, "learning_rate": 1e-3, "max_seq_len": 32}
# A first try of every upload crawls (0.3 s per 256 KiB), so the campaign can kill a worker
# mid-upload; its resumed tries run at full speed. The chunks are re-cut, still within one shard
# each, the shard's spec and `last` on the piece that ends it (a valid wire revision 2 stream).
SLOW_LINK = """
import time, client.transfer as t
from common.codec.chunks import make_chunk
real = t.payload_chunks
def slow(payload, header, start):
    step = 256 * 1024
    for chunk in real(payload, header, start):
        data, size = chunk.data, len(chunk.data)
        for lo in range(0, max(size, 1), step):
            end = lo + step >= size
            if start == 0:
                time.sleep(0.3)
            yield make_chunk(chunk.offset + lo, data[lo : lo + step], chunk.last and end,
                             chunk.header if lo == 0 else None, chunk.shard if end else None)
t.payload_chunks = slow
"""


@dataclass
class WorkerFigures:
    """What happened to the workers."""

    kills: dict[str, int] = field(default_factory=dict)  # moment -> SIGKILLs
    restarts: int = 0
    rounds_published: int = 0
    rounds_failed: int = 0
    proxy_faults: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    tracebacks: int = 0
    errors: list[str] = field(default_factory=list)


class WorkerProcess:
    """``gdfed work`` for one site, its output appended to a log."""

    def __init__(self, root: Path, target: str, site: str, model: Path, data: Path) -> None:
        self.root, self.target, self.site, self.model, self.data = root, target, site, model, data
        self.log_path = root / f"{site}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        token = self.root / f"{self.site}.token"
        token.write_text(token_of(self.site))
        argv = [
            "work", "--aggregator", self.target, "--site", self.site, "--token-file", str(token),
            "--model", str(self.model), "--data", str(self.data), "--state-dir", str(self.root / self.site),
            "--quiet", "--threads", "1", "--max-wait-s", "120",
        ]  # fmt: skip
        code = f"{SLOW_LINK}\nfrom common.cli import main\nraise SystemExit(main({argv!r}))"
        self._log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self._log is not None:
            self._log.close()


def _prepare(root: Path) -> tuple[Path, Path, str]:
    """The demo model and data, round 0's state, and the model's fingerprint."""
    from client.demo_init import init_demo
    from client.init_state import write_init_state
    from client.model import fingerprint
    from common.spec import TrainingSpec

    demo = root / "demo"
    init_demo(demo, examples_per_site=48, eval_examples=16, pretrain_steps=0)
    init = root / "init.safetensors"
    write_init_state(demo / "model", init, TrainingSpec(**TRAINING))  # type: ignore[arg-type]
    return demo, init, fingerprint(demo / "model")


def _wait_phase(admin: Admin, site: str, phase: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sites = admin.stub.ListSites(admin_pb2.ListSitesRequest(), metadata=admin.metadata, timeout=2)
            if any(s.site_id == site and s.phase == phase for s in sites.sites):
                return True
        except Exception:
            pass
        time.sleep(0.02)
    return False


def run(root: Path, *, seed: int, log: Callable[[str], None] = print) -> WorkerFigures:
    root.mkdir(parents=True, exist_ok=True)
    figures = WorkerFigures()
    demo, init, print_ = _prepare(root)
    extra = {"base_model_fingerprint": print_, "training": dict(TRAINING)}
    daemon = Daemon(root, DaemonSpec(SITES, init, ROUNDS, extra))  # type: ignore[arg-type]
    daemon.start()
    proxy = FaultProxy(
        daemon.port, seed, FaultRates(delay=0.3, cut=0.1, reset=0.1, max_offset=2 * 1024 * 1024)
    )
    admin = Admin(daemon.target)
    workers = {
        s: WorkerProcess(root, proxy.target, s, demo / "model", demo / "data" / f"{s}.jsonl") for s in SITES
    }
    try:
        for w in workers.values():
            w.start()
        # Mid-training: site-a, in round 1.
        for site, phase, moment in (
            ("site-a", federation_pb2.PHASE_TRAINING, "training"),
            ("site-b", federation_pb2.PHASE_UPLOADING, "upload"),
        ):
            if _wait_phase(admin, site, phase, timeout=120):
                workers[site].kill()
                figures.kills[moment] = figures.kills.get(moment, 0) + 1
                workers[site].start()
                figures.restarts += 1
            else:
                figures.errors.append(f"{site} never reported {moment} within 120 s")
        for site, w in workers.items():
            figures.exit_codes[site] = w.wait(300)
        proxy.faults = False
        for number in range(1, ROUNDS + 1):
            try:
                status = admin.wait_round_done(number, timeout=30)
            except TimeoutError as exc:
                figures.errors.append(str(exc))
                figures.rounds_failed += 1
                continue
            if status.state == federation_pb2.ROUND_STATE_PUBLISHED:
                figures.rounds_published += 1
            else:
                figures.rounds_failed += 1
                figures.errors.append(f"round {number}: {status.failure_reason or status.close_reason}")
        if any(code != 0 for code in figures.exit_codes.values()):
            figures.errors.append(f"worker exit codes {figures.exit_codes}")
    except Exception as exc:
        figures.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        figures.proxy_faults = proxy.counts.faults
        for w in workers.values():
            w.close()
        admin.close()
        proxy.close()
        daemon.stop()
        figures.tracebacks = unexpected_tracebacks(daemon.log_text()) + sum(
            w.log_path.read_text(errors="replace").count("Traceback")
            for w in workers.values()
            if w.log_path.exists()
        )
    log(
        f"[workers] kills {figures.kills}, {figures.rounds_published}/{ROUNDS} rounds published, "
        f"exit codes {figures.exit_codes}, proxy faults {figures.proxy_faults}, errors {figures.errors}"
    )
    return figures
