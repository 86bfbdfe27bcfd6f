"""One daemon per port and per state directory, on real ``gdfed serve`` processes.

A second daemon on the port of a running one, or on its state directory, exits 2 with one line
saying which (and, for the directory, the pid holding it) before it reads, writes or logs
anything. The lock dies with its holder: after a SIGKILL the next daemon starts on the same
directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import ConfigError
from server.state_lock import StateDirLock
from tests.scripted import (
    ROOT,
    AdminClient,
    Daemon,
    free_port,
    small_state,
    write_daemon_config,
    write_state,
)


@pytest.fixture
def first(tmp_path: Path) -> Iterator[tuple[Daemon, Path, str]]:
    """A running daemon: (it, its config, its address); its state directory is tmp_path/state."""
    port = free_port()
    config = write_daemon_config(
        tmp_path / "gdfed.toml",
        port=port,
        init_state=write_state(tmp_path / "init.safetensors", small_state()),
        sites=["a"],
    )
    daemon = Daemon(config, tmp_path / "first.log")
    target = f"127.0.0.1:{port}"
    daemon.start(target)
    try:
        yield daemon, config, target
    finally:
        daemon.cleanup()


def serve(*argv: str) -> subprocess.Popen[str]:
    """``gdfed serve ARGV``, started (it must refuse to start, and end by itself)."""
    return subprocess.Popen(
        [sys.executable, "-m", "common.cli", "serve", *argv],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def refusal(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """The exit code and the one line of output of a daemon that refused to start."""
    output, _ = proc.communicate(timeout=120)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return proc.returncode, lines[0]


@pytest.mark.slow
def test_a_second_daemon_on_the_same_port_or_state_dir_exits_2(
    first: tuple[Daemon, Path, str], tmp_path: Path
) -> None:
    daemon, config, target = first
    assert daemon.proc is not None
    # Side by side: each pays for importing torch.
    same_port = serve("--config", str(config), "--state-dir", str(tmp_path / "other-state"))
    same_dir = serve("--config", str(config), "--listen", f"127.0.0.1:{free_port()}")
    assert refusal(same_port) == (
        2,
        f"gdfed serve: port {target} is in use (another gdfed serve?); stop what holds it or choose "
        "another --listen",
    )
    assert not (tmp_path / "other-state").exists()  # refused before it made anything
    assert refusal(same_dir) == (
        2,
        f"gdfed serve: state directory {tmp_path / 'state'} is locked by pid {daemon.proc.pid} "
        "(another gdfed serve?); stop that daemon or choose another --state-dir",
    )
    with AdminClient(target) as admin:
        assert admin.status().run_id == "crash-run"  # the first daemon still answers, alone


@pytest.mark.slow
def test_the_lock_dies_with_a_killed_daemon(first: tuple[Daemon, Path, str], tmp_path: Path) -> None:
    daemon, config, target = first
    with AdminClient(target) as admin:
        assert admin.status().run_id == "crash-run"  # a connection of the first lingers in TIME_WAIT
    daemon.kill()
    assert (tmp_path / "state" / "LOCK").exists()  # left behind by SIGKILL, and no obstacle
    successor = Daemon(config, tmp_path / "successor.log")  # same port, same state directory
    try:
        successor.start(target)
        with AdminClient(target) as admin:
            assert admin.status().run_id == "crash-run"  # the same run, from the same directory
        assert successor.proc is not None
        assert (tmp_path / "state" / "LOCK").read_text().strip() == str(successor.proc.pid)
        assert successor.terminate(timeout=60) == 0
    finally:
        successor.cleanup()


def test_the_lock_is_held_until_released(tmp_path: Path) -> None:
    """In one process too: each acquire opens the file anew, and flock locks per open file."""
    state = tmp_path / "new" / "state"
    with StateDirLock.acquire(state) as lock:
        assert lock.held and sorted(p.name for p in state.iterdir()) == ["LOCK"]
        with pytest.raises(
            ConfigError, match=re.escape(f"state directory {state} is locked by pid {os.getpid()} ")
        ):
            StateDirLock.acquire(state)
    assert not lock.held
    StateDirLock.acquire(state).release()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory; choose another --state-dir"):
        StateDirLock.acquire(tmp_path / "file")
