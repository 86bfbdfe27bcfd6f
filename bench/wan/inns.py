"""The existing round runners, with their processes inside the namespaces: ours, Flower, NVIDIA FLARE.

bench/round_overhead.py's ``run_ours`` and bench/peers.py's ``run_flower`` and ``run_nvflare``
take no host or namespace: they start every program with ``bench.procs.Procs``, talk to the
server at 127.0.0.1 and pick ports with ``free_port``. So the driver runs inside the
aggregator's namespace (its 127.0.0.1 is the aggregator's), and for the length of a run this
module swaps a few of those modules' names (restored after):

- ``Procs``: site-side programs (ours ``siteN``, Flower's ``supernodeN``, NVFlare's ``site-N``)
  start under ``ip netns exec`` in site N's namespace, where 127.0.0.1 at the service port is
  the site's delay line to the aggregator; our sites run ``bench.wan.site`` with the codec;
- ``free_port``: the run's first port is the service port the delay lines forward;
- the server binds every address instead of 127.0.0.1 (our daemon's ``listen``, the
  SuperLink's ``--host``, NVFlare's server target), so the sites reach it over the veth;
- ``_wait_listening`` looks for a SuperNode's port in the SuperNode's own namespace.

A small host/namespace parameter on the runners would replace all of this.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import peers, round_overhead
from bench.procs import Procs, free_port
from bench.wan.netns import AGG_IP, Topology, exec_in

ANY = "0.0.0.0"


def site_index(name: str) -> int | None:
    """The site a runner's process name belongs to (None: the aggregator's side)."""
    if m := re.fullmatch(r"(?:site|supernode)(\d+)", name):
        return int(m.group(1))
    if m := re.fullmatch(r"site-(\d+)", name):  # NVFlare's POC clients count from 1
        return int(m.group(1)) - 1
    return None


def rewrite(name: str, argv: Sequence[str], topo: Topology, codec: str) -> list[str]:
    """``argv`` as it must run for process ``name`` on the shaped topology."""
    out = list(argv)
    if name == "superlink" and "--host" in out:
        out[out.index("--host") + 1] = ANY
    if "bench.round_overhead" in out and "--site" in out:
        at = out.index("bench.round_overhead")
        out[at : at + 1] = ["bench.wan.site", "--codec", codec]
    site = site_index(name)
    return [*exec_in(topo.site_ns(site)), *out] if site is not None else out


class NetnsProcs(Procs):
    """``Procs`` that starts each site's programs in the site's namespace."""

    def __init__(self, logs: Path, topo: Topology, codec: str) -> None:
        super().__init__(logs)
        self.topo, self.codec = topo, codec

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Any:
        return super().start(name, rewrite(name, argv, self.topo, self.codec), env=env, cwd=cwd)


def listening_in(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of process ``pid``."""
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _wait_listening(port: int, procs: Procs, name: str, timeout: float = 120) -> None:
    pid = next((p.pid for n, p, _ in procs.procs if n == name), None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name) or pid is None:
            raise RuntimeError(f"{name} exited:\n{procs.log_tail(name)}")
        if listening_in(pid, port):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f} s:\n{procs.log_tail(name)}")


@contextlib.contextmanager
def in_namespaces(topo: Topology, service_port: int, codec: str = "exact") -> Iterator[None]:
    """For the block, the runners start their processes as this module's docstring says."""
    ports = iter([service_port])

    def port() -> int:
        return next(ports, None) or free_port()

    original_config = round_overhead.daemon_config
    original_poc = peers.patch_poc_to_loopback

    def daemon_config(tmp: Path, port_: int, init: Path, k: int, rounds: int) -> Path:
        path = original_config(tmp, port_, init, k, rounds)
        text = path.read_text().replace('listen = "127.0.0.1:', f'listen = "{ANY}:')
        if codec == "bf16":  # the round's upload codec and the broadcast's
            text += '[training.upload_codec]\ncast = "bf16"\n[broadcast_codec]\ncast = "bf16"\n'
        path.write_text(text)
        return path

    def patch_poc(prod: Path, port_: int) -> list[str]:
        changed = original_poc(prod, port_)
        # A non-loopback target makes the server listen on every address; clients keep 127.0.0.1,
        # their delay line. The admin console stays on the aggregator's own 127.0.0.1.
        for path in prod.glob("server/startup/fed_server.json"):
            data = json.loads(path.read_text())
            for server in data.get("servers", []):
                server["service"]["target"] = f"{AGG_IP}:{port_}"
            path.write_text(json.dumps(data, indent=2))
        return changed

    swaps: list[tuple[object, str, Callable[..., Any]]] = [
        (round_overhead, "Procs", lambda logs: NetnsProcs(logs, topo, codec)),
        (peers, "Procs", lambda logs: NetnsProcs(logs, topo, codec)),
        (round_overhead, "free_port", port),
        (peers, "free_port", port),
        (round_overhead, "daemon_config", daemon_config),
        (peers, "patch_poc_to_loopback", patch_poc),
        (peers, "_wait_listening", _wait_listening),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, value in swaps:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
