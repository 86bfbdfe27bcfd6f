"""Process plumbing shared by the round benchmarks: process groups, tree RSS sampling, loopback bytes.

Every system under test (ours, Flower, NVIDIA FLARE) is started the same way:
each server-side and site-side program is its own subprocess in its own
session (so one ``killpg`` ends it and everything it spawned), with its output
in a log file. Memory is measured the same way for all three: the VmRSS of a
set of root processes and all their descendants, summed and sampled every
100 ms; bytes on the wire as the growth of the loopback interface's counters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` (those still alive) and every process below them."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    stack = [r for r in roots if r in parents]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    return seen


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def loopback_bytes() -> int:
    """Bytes received on ``lo`` so far (each loopback byte is counted once on rx and once on tx)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_quiet(threshold: float = 0.15, window: float = 3.0, max_wait: float = 180.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine's busy share over ``window`` s is under ``threshold``.

    Called between runs, when none of the benchmark's heavy processes is up,
    so what keeps the cores busy is someone else's work. Returns the last share.
    """
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + max_wait
    while True:
        start = machine_busy_seconds()
        time.sleep(window)
        share = (machine_busy_seconds() - start) / (window * cores)
        if share < threshold or time.monotonic() > deadline:
            return share


class TreeSampler:
    """Samples the summed VmRSS of process trees every ``interval`` seconds in a thread.

    ``groups`` names sets of root pids ("server", "sites"); roots may be added
    later (a process spawned by the system itself, found by its command line).
    Also keeps, per pid seen, the largest VmHWM read, so a sum of per-process
    peaks (an upper bound of the true peak of the sum) can be reported too.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.roots: dict[str, set[int]] = {}
        self.peak_kib: dict[str, int] = {}
        self.hwm_kib: dict[str, dict[int, int]] = {}
        self.names: dict[int, str] = {}
        # CPU seconds of every process below this one (the benchmark's own), last value seen per pid,
        # so that work done by anything else on the machine during a run can be told apart.
        self.cpu_s: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def add(self, group: str, pid: int) -> None:
        with self._lock:
            self.roots.setdefault(group, set()).add(pid)
            self.peak_kib.setdefault(group, 0)
            self.hwm_kib.setdefault(group, {})

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def reset(self) -> None:
        """Forget the peaks so far (per-round or per-phase peaks)."""
        with self._lock:
            for group in self.peak_kib:
                self.peak_kib[group] = 0

    def cpu_mark(self) -> tuple[float, float]:
        """(machine busy seconds, our processes' CPU seconds) now; pass it to ``foreign_cpu_seconds``."""
        self.sample()
        with self._lock:
            return machine_busy_seconds(), sum(self.cpu_s.values())

    def foreign_cpu_seconds(self, mark: tuple[float, float]) -> float:
        """CPU seconds the machine spent on processes other than ours since ``mark``."""
        busy, ours = self.cpu_mark()
        return max(0.0, (busy - mark[0]) - (ours - mark[1]))

    def sample(self) -> None:
        for pid in descendants([os.getpid()]):
            used = cpu_seconds(pid)
            with self._lock:
                if used > self.cpu_s.get(pid, 0.0):
                    self.cpu_s[pid] = used
        with self._lock:
            groups = {g: set(r) for g, r in self.roots.items()}
        for group, roots in groups.items():
            total = 0
            for pid in descendants(roots):
                rss = status_kib(pid, "VmRSS")
                total += rss
                hwm = status_kib(pid, "VmHWM")
                with self._lock:
                    table = self.hwm_kib[group]
                    if hwm > table.get(pid, 0):
                        table[pid] = hwm
                    if pid not in self.names:
                        self.names[pid] = cmdline(pid)[:160]
            with self._lock:
                self.peak_kib[group] = max(self.peak_kib[group], total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def peak_mb(self, group: str) -> float:
        return self.peak_kib.get(group, 0) * 1024 / 1e6

    def hwm_sum_mb(self, group: str) -> float:
        return sum(self.hwm_kib.get(group, {}).values()) * 1024 / 1e6

    def top(self, group: str, n: int = 4) -> list[tuple[str, float]]:
        """The largest per-process peaks of a group: (command line, MB)."""
        table = self.hwm_kib.get(group, {})
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:n]
        return [(self.names.get(pid, str(pid)), kib * 1024 / 1e6) for pid, kib in ranked]


class Procs:
    """Subprocesses each in its own session; ``close()`` kills every group, even on error."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        self.procs.append((name, proc, log))
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p, _ in self.procs)

    def stop(self, name: str, timeout: float = 30.0) -> None:
        for n, proc, log in self.procs:
            if n == name:
                _kill_group(proc, timeout)
                log.close()

    def close(self, timeout: float = 20.0) -> None:
        """SIGTERM every group, wait, then SIGKILL what is left, descendants included.

        Descendants are collected first: Flower's SuperLink and SuperNode start
        their SuperExec in a new session, outside our process group.
        """
        tree = descendants(p.pid for _, p, _ in self.procs)
        for _, proc, _ in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc, log in reversed(self.procs):
            _kill_group(proc, max(0.1, deadline - time.monotonic()))
            log.close()
        for pid in tree & descendants(tree):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # The leader may be gone while its children (a SuperNode's ClientApp, a POC job process) live on.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def kill_leftovers(pattern: str) -> list[int]:
    """SIGKILL processes (of this user) whose command line contains ``pattern`` and that we started.

    Only used for processes a system under test daemonizes out of our session
    (NVFlare's POC launcher does); ``pattern`` is a path unique to this run.
    """
    killed = []
    me = os.getuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{entry}").st_uid != me:
                continue
        except OSError:
            continue
        if pid != os.getpid() and pattern in cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed
