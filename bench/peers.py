"""Flower and NVIDIA FLARE running the same rounds as bench/round_overhead.py, each in its own venv.

Both run as real processes on 127.0.0.1, started like ours (bench.procs:
each program its own subprocess and session, output to a log), with the same
GPT-2-small-sized fp32 model (124,439,808 parameters), the same K and
rounds, and the same trivial local training (add a fixed 16 MiB buffer of
Gaussian steps of std 1e-4, tensor by tensor).

- Flower (``flwr``) in deployment mode: ``flower-superlink --insecure``
  (Runtime, Fleet and Control HTTP APIs on one 127.0.0.1 port), K
  ``flower-supernode --insecure``, and ``flwr run`` submitting the Flower App
  in bench/flower (its ServerApp runs Flower's own FedAvg strategy; both
  apps run in the default ``subprocess`` isolation, spawned by the
  SuperLink's and the SuperNodes' SuperExec).
- NVIDIA FLARE (``nvflare``) in POC mode: ``nvflare poc prepare -n K``, the
  service target of every startup kit patched from the kit's default (the
  server listens on 0.0.0.0) to 127.0.0.1, the server and K clients each
  started with its kit's ``startup/sub_start.sh --once``; the job is the
  built-in numpy ``FedAvgRecipe`` (bench/nvflare/submit.py), in-time
  aggregation, every setting at its default.

Figures, the same for every system: wall time per round and the longest
local training of the round; the peak of the summed VmRSS of the
server-side process trees and of the site-side ones (sampled every 100 ms);
the growth of the loopback interface's byte counter per round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.procs import Procs, TreeSampler, free_port, loopback_bytes
from bench.round_overhead import fp32_bytes, model_shapes

BENCH = Path(__file__).resolve().parent
FLOWER_VENV = BENCH / ".venv-flower"
NVFLARE_VENV = BENCH / ".venv-nvflare"
# flwr 1.42.0 is the newest release, but it requires certifi >= 2026.10.19, which the package index
# this machine reaches does not have; 1.41.0 is the newest that installs here.
FLWR = "flwr==1.41.0"
NVFLARE = "nvflare==2.9.0"


def ensure_venv(venv: Path, requirement: str, module: str) -> str:
    """Create ``venv`` with ``requirement`` (and numpy) unless it already imports ``module``; its version."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import importlib.metadata as m; print(m.version({module!r}))"]
    if python.exists():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == requirement.split("==")[1]:
            return done.stdout.strip()
    print(f"creating {venv} with {requirement}", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", requirement, "numpy"], check=True)
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment a venv's console scripts need: its bin first on PATH (they spawn each other by name)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _wait_listening(port: int, procs: Procs, name: str, timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited:\n{procs.log_tail(name)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f} s:\n{procs.log_tail(name)}")


# ---------------------------------------------------------------- Flower


def run_flower(k: int, rounds: int, quick: bool, work: Path, timeout: float = 3600) -> dict[str, Any]:
    """Flower deployment mode: SuperLink + K SuperNodes + ``flwr run``; every figure of the run."""
    version = ensure_venv(FLOWER_VENV, FLWR, "flwr")
    if work.exists():
        shutil.rmtree(work)
    home = work / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    # The CLI finds the SuperLink through the Flower config file under FLWR_HOME.
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = venv_env(FLOWER_VENV, FLWR_HOME=str(home))
    timing = work / "timing.jsonl"
    bin_ = FLOWER_VENV / "bin"
    sampler = TreeSampler()
    with Procs(work / "logs") as procs:
        try:
            link = procs.start(
                "superlink",
                [
                    str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                    # uv sync would need the network; the venv already holds what the app imports.
                    "--disable-runtime-dependency-installation",
                ],
                env=env, cwd=work,
            )  # fmt: skip
            sampler.add("server", link.pid)
            sampler.start()
            _wait_listening(port, procs, "superlink")
            for i in range(k):
                node_port = free_port()
                node = procs.start(
                    f"supernode{i}",
                    [
                        str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(node_port), "--node-config", f"site={i}",
                    ],
                    env=env, cwd=work,
                )  # fmt: skip
                sampler.add("sites", node.pid)
            for i in range(k):
                _wait_listening(int(_node_port(procs, i)), procs, f"supernode{i}")
            time.sleep(3)  # let every SuperNode register with the SuperLink before the run asks for K
            lo_start = loopback_bytes()
            cpu_mark = sampler.cpu_mark()
            started = time.time()
            config = f'num-sites={k} num-rounds={rounds} quick={"true" if quick else "false"} timing-file="{timing}"'
            run = procs.start(
                "flwr-run",
                [str(bin_ / "flwr"), "run", str(BENCH / "flower"), "bench", "--run-config", config, "--stream"],
                env=env, cwd=work,
            )  # fmt: skip
            deadline = time.monotonic() + timeout
            while _rounds_done(timing) < rounds:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Flower K={k}: {_rounds_done(timing)} rounds after {timeout:.0f} s")
                if run.poll() is not None and _rounds_done(timing) < rounds:
                    raise RuntimeError("flwr run ended early:\n" + procs.log_tail("flwr-run"))
                if not procs.alive("superlink"):
                    raise RuntimeError("SuperLink died:\n" + procs.log_tail("superlink"))
                time.sleep(0.5)
            lo_bytes = loopback_bytes() - lo_start
            foreign_cpu = sampler.foreign_cpu_seconds(cpu_mark)
            elapsed = time.time() - started
            sampler.sample()
        finally:
            sampler.stop()
    per_round = []
    for line in timing.read_text().splitlines():
        ev = json.loads(line)
        round_s = ev["end"] - ev["start"]
        per_round.append(
            {
                "round": ev["round"],
                "round_s": round_s,
                "train_s": ev["train_s"],
                "overhead_s": round_s - ev["train_s"],
            }
        )
    return {
        "system": "flower",
        "version": version,
        "k": k,
        "rounds": per_round,
        "elapsed_s": elapsed,
        "server_peak_rss_MB": sampler.peak_mb("server"),
        "server_hwm_sum_MB": sampler.hwm_sum_mb("server"),
        "server_top": sampler.top("server"),
        "sites_peak_rss_MB": sampler.peak_mb("sites"),
        "loopback_bytes_per_round": lo_bytes / rounds,
        # CPU used by other processes on the machine while this ran, as a share of all its cores.
        "foreign_cpu_share": foreign_cpu / (elapsed * (os.cpu_count() or 1)),
    }


def _node_port(procs: Procs, i: int) -> str:
    for name, proc, _ in procs.procs:
        if name == f"supernode{i}":
            args = list(proc.args)  # type: ignore[arg-type]
            return str(args[args.index("--port") + 1])
    raise KeyError(i)


def _rounds_done(timing: Path) -> int:
    return len(timing.read_text().splitlines()) if timing.exists() else 0


# ---------------------------------------------------------------- NVIDIA FLARE

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _log_time(line: str) -> float | None:
    m = _LOG_TIME.match(line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def patch_poc_to_loopback(prod: Path, port: int) -> list[str]:
    """Point every kit's service target at 127.0.0.1:``port``; the server then binds there, not 0.0.0.0.

    NVFlare's server listens on its target's host when that host is a
    loopback address, and on every interface otherwise (the POC kit's
    ``server:8002``). The admin listener shares the port.
    """
    changed = []
    for path in sorted(prod.glob("*/startup/fed_*.json")):
        data = json.loads(path.read_text())
        admin = data.get("admin")
        if admin is not None:  # the admin console's kit (job submission)
            admin["host"], admin["port"] = "127.0.0.1", port
        for server in data.get("servers", []):
            server["service"]["target"] = f"127.0.0.1:{port}"
            if "admin_port" in server:
                server["admin_port"] = port
                server["admin_server"] = "127.0.0.1"
            if "host" in server:
                server["host"] = "127.0.0.1"
        path.write_text(json.dumps(data, indent=2))
        changed.append(str(path.relative_to(prod)))
    return changed


def run_nvflare(k: int, rounds: int, quick: bool, work: Path, timeout: float = 3600) -> dict[str, Any]:
    """NVFlare POC: server + K clients as processes, the numpy FedAvg recipe; every figure of the run."""
    version = ensure_venv(NVFLARE_VENV, NVFLARE, "nvflare")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    poc = work / "poc"
    env = venv_env(NVFLARE_VENV, NVFLARE_POC_WORKSPACE=str(poc))
    bin_ = NVFLARE_VENV / "bin"
    subprocess.run(
        [str(bin_ / "nvflare"), "poc", "prepare", "-n", str(k), "--force"],
        env=env, cwd=work, check=True, capture_output=True, text=True,
    )  # fmt: skip
    prod = next(poc.glob("*/prod_00"))
    port = free_port()
    patch_poc_to_loopback(prod, port)
    init = work / "init.npy"
    np.save(init, _flat_init(quick))
    clients = sorted(p.name for p in prod.iterdir() if p.name.startswith("site-"))
    sampler = TreeSampler()
    with Procs(work / "logs") as procs:
        try:
            server = procs.start(
                "server",
                ["bash", str(prod / "server" / "startup" / "sub_start.sh"), "--once"],
                env=env,
                cwd=prod / "server",
            )
            sampler.add("server", server.pid)
            sampler.start()
            _wait_listening(port, procs, "server")
            for name in clients:
                proc = procs.start(
                    name,
                    ["bash", str(prod / name / "startup" / "sub_start.sh"), "--once"],
                    env=env,
                    cwd=prod / name,
                )
                sampler.add("sites", proc.pid)
            time.sleep(10)  # the clients register with the server
            lo_start = loopback_bytes()
            cpu_mark = sampler.cpu_mark()
            started = time.time()
            submit = procs.start(
                "submit",
                [
                    str(bin_ / "python"), str(BENCH / "nvflare" / "submit.py"), "--kit",
                    str(prod / "admin@nvidia.com"), "--init", str(init), "--clients", str(k),
                    "--rounds", str(rounds), "--work", str(work), "--timeout", str(timeout),
                ],
                env=env, cwd=work,
            )  # fmt: skip
            deadline = time.monotonic() + timeout + 60
            while submit.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NVFlare K={k}: not finished after {timeout:.0f} s")
                if not procs.alive("server"):
                    raise RuntimeError("NVFlare server died:\n" + procs.log_tail("server"))
                time.sleep(0.5)
            lo_bytes = loopback_bytes() - lo_start
            foreign_cpu = sampler.foreign_cpu_seconds(cpu_mark)
            elapsed = time.time() - started
            if submit.returncode != 0:
                raise RuntimeError(
                    "NVFlare job failed:\n" + procs.log_tail("submit") + procs.log_tail("server")
                )
            listeners = _listeners()
            # The job's runner may log its "Finished FedAvg." after the admin API reported the job
            # done (twice in four K = 4 runs the processes were stopped first): let it, while they run.
            settle = time.monotonic() + 15
            while (
                time.monotonic() < settle
                and _nvflare_round_times(
                    [work / "logs" / "server.log", *sorted((prod / "server").rglob("log.txt"))]
                )[1]
                is None
            ):
                time.sleep(0.5)
        finally:
            sampler.stop()
    starts, finished = _nvflare_round_times(
        [work / "logs" / "server.log", *sorted((prod / "server").rglob("log.txt"))]
    )
    if len(starts) < rounds or finished is None:
        raise RuntimeError(f"NVFlare K={k}: found {len(starts)} round starts in the server job log")
    ends = [*starts[1:rounds], finished]
    train = _nvflare_train_seconds(prod, clients, work / "logs")
    per_round = []
    for r in range(rounds):
        round_s = ends[r] - starts[r]
        train_s = max((t[r] for t in train.values() if len(t) > r), default=0.0)
        per_round.append(
            {"round": r + 1, "round_s": round_s, "train_s": train_s, "overhead_s": round_s - train_s}
        )
    return {
        "system": "nvflare",
        "version": version,
        "k": k,
        "rounds": per_round,
        "elapsed_s": elapsed,
        "server_peak_rss_MB": sampler.peak_mb("server"),
        "server_hwm_sum_MB": sampler.hwm_sum_mb("server"),
        "server_top": sampler.top("server"),
        "sites_peak_rss_MB": sampler.peak_mb("sites"),
        "loopback_bytes_per_round": lo_bytes / rounds,
        # CPU used by other processes on the machine while this ran, as a share of all its cores.
        "foreign_cpu_share": foreign_cpu / (elapsed * (os.cpu_count() or 1)),
        "listeners": listeners,
    }


def _flat_init(quick: bool) -> np.ndarray:
    """GPT-2 small's parameters (or the quick subset) as one flat fp32 array of std 0.02."""
    count = fp32_bytes(model_shapes(quick)) // 4
    return np.random.default_rng(1).standard_normal(count, dtype=np.float32) * np.float32(0.02)


def _nvflare_round_times(logs: list[Path]) -> tuple[list[float], float | None]:
    """Round start times and the end of the FedAvg workflow, from the server's logs.

    The controller logs "Round N started." (N from 0) as a banner under a
    timestamped line, so each banner takes the last timestamp seen before it.
    The workflow's end is its "Finished FedAvg." banner; where a log lacks it
    (the processes' stdout can stop short of it, 3 of 6 K = 4 runs), the last
    round's "End persist model on server.", logged within a millisecond of it
    in the runs that have both. Every log is read (the server's stdout and the
    job's own log.txt), and the one with the most rounds and an end wins.
    """
    best: tuple[list[float], float | None] = ([], None)
    for log in logs:
        if not log.exists():
            continue
        starts: list[float] = []
        finished = None
        persisted = None
        last = None
        for line in log.read_text(errors="replace").splitlines():
            t = _log_time(line)
            if t is not None:
                last = t
            if last is None:
                continue
            if re.search(r"Round \d+ started\.", line):
                starts.append(last)
                persisted = None
            elif "End persist model on server." in line:
                persisted = last
            elif "Finished FedAvg." in line:
                finished = last
        end = finished if finished is not None else persisted
        if (len(starts), end is not None) > (len(best[0]), best[1] is not None):
            best = (starts, end)
    return best


def _nvflare_train_seconds(prod: Path, clients: list[str], logs: Path) -> dict[str, list[float]]:
    """Per client, the local training seconds client_train.py printed per round (job log, else its stdout)."""
    out: dict[str, list[float]] = {}
    for name in clients:
        values: list[float] = []
        for log in [*sorted((prod / name).rglob("log.txt")), logs / f"{name}.log"]:
            if log.exists():
                text = log.read_text(errors="replace")
                values += [float(v) for v in re.findall(r"GDFEDBENCH train_s=([0-9.eE+-]+)", text)]
            if values:
                break
        out[name] = values
    return out


def _listeners() -> list[str]:
    """Listening TCP sockets of this machine (to show what NVFlare bound)."""
    done = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if "python" in line]
