"""``gdfed serve`` as a process for the campaign: its TOML, start, SIGKILL, restart, its log.

The daemon is started exactly as an operator starts it (``python -m common.cli serve --config``),
on a fixed 127.0.0.1 port so a restart on the same state directory is reachable at the same
address (through the proxy too). SIGKILL gives it no chance to clean up: what survives a kill is
only what it made durable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.channel import auth_metadata
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2

ROOT = Path(__file__).resolve().parent.parent.parent
ADMIN_TOKEN = "reliability-admin"
# Reconnect within a fraction of a second once a restarted daemon listens again (gRPC's default
# backoff grows from 1 s to 120 s).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]

TomlValue = str | int | float | bool
Table = Mapping[str, "TomlValue | Table"]


def token_of(site: str) -> str:
    return f"token-{site}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def toml_text(settings: Table, prefix: str = "") -> str:
    """``settings`` as TOML: plain keys first, then each nested mapping as its own [table]."""
    plain = [f"{k} = {_toml_value(v)}" for k, v in settings.items() if not isinstance(v, Mapping)]
    out = ["\n".join(plain)] if plain else []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            name = f"{prefix}{key}"
            out.append(f"[{name}]\n" + toml_text(value, f"{name}.").strip())
    return "\n\n".join(part for part in out if part) + "\n"


def unexpected_tracebacks(log: str) -> int:
    """Tracebacks in a daemon's log, less those it writes on purpose: the cause of a failed
    publication attempt, logged with the error before the attempt is retried."""
    lines = log.splitlines()
    count = 0
    for i, line in enumerate(lines):
        if line.startswith("Traceback") and not (i > 0 and "publication attempt" in lines[i - 1]):
            count += 1
    return count


@dataclass
class DaemonSpec:
    """What a campaign daemon runs: its sites and the sections of its TOML beyond the basics."""

    sites: Sequence[str]
    init_state: Path
    rounds: int = 0
    extra: dict[str, TomlValue | Table] = field(default_factory=dict)


def write_config(folder: Path, spec: DaemonSpec, port: int) -> Path:
    """The daemon's TOML in ``folder`` (state in ``folder/state``); every round waits for every site."""
    settings: dict[str, TomlValue | Table] = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(folder / "state"),
        "init_state": str(spec.init_state),
        "run_id": "reliability",
        "rounds": spec.rounds,
        # A kill and restart take seconds: sites must not be dropped for the daemon's own downtime.
        "heartbeat_interval_s": 0.5,
        "missed_beats": 60,
        "tick_s": 0.05,
        "admin_token": ADMIN_TOKEN,
        "round": {"min_sites_to_open": len(spec.sites)},
        "publish": {"backoff_s": 0.05, "max_backoff_s": 0.5},
    }
    for key, value in spec.extra.items():
        old = settings.get(key)
        settings[key] = {**old, **value} if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    settings["sites"] = {s: token_of(s) for s in spec.sites}
    path = folder / "gdfed.toml"
    path.write_text(toml_text(settings))
    return path


class Daemon:
    """One daemon's process over its life: started, killed and restarted on one state directory."""

    def __init__(self, folder: Path, spec: DaemonSpec, port: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port or free_port()
        self.config = write_config(folder, spec, self.port)
        self.log_path = folder / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.kills = 0
        self.exits: list[int] = []  # exit codes of runs that ended other than by our SIGKILL

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    def spawn(self) -> None:
        """Start the process without waiting for it to listen."""
        self._close_log()
        self._log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "serve", "--config", str(self.config)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start it and return once it answers the health check."""
        self.spawn()
        self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(timeout=0.5):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not serve within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether the health service answers SERVING (directly, never through the proxy)."""
        with grpc.insecure_channel(self.target) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError:
                return False
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        self.proc.wait(timeout=30)
        self._close_log()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and its exit code (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=30)
        self._close_log()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class Admin:
    """The operator's calls, straight to the daemon (never through the proxy)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=FAST_RECONNECT)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self.metadata = auth_metadata(ADMIN_TOKEN)

    def close(self) -> None:
        self.channel.close()

    def status(self, timeout: float = 10) -> admin_pb2.RunStatus:
        return self.stub.GetStatus(admin_pb2.StatusRequest(), metadata=self.metadata, timeout=timeout)

    def round(self, number: int, timeout: float = 10) -> admin_pb2.RoundStatus:
        return self.stub.GetRound(
            admin_pb2.GetRoundRequest(round=number), metadata=self.metadata, timeout=timeout
        )

    def wait_round_done(self, number: int, timeout: float = 120) -> admin_pb2.RoundStatus:
        """Round ``number`` once PUBLISHED or FAILED; retries while the daemon is away."""
        done = (federation_pb2.ROUND_STATE_PUBLISHED, federation_pb2.ROUND_STATE_FAILED)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.round(number, timeout=5)
                if status.state in done:
                    return status
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {number} did not end within {timeout}s")
            time.sleep(0.05)
