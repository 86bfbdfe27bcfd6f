"""Network namespaces for the shaped-link benchmark: one per site, one for the aggregator, one switch.

Every end namespace holds one veth, ``wan0``, whose peer sits in the switch namespace on a
bridge; so each site has a link of its own and the aggregator's link is shared by all sites,
as on a real network. All names start with ``PREFIX``: a run deletes any left over by an earlier
one that died (a leftover namespace would make ``ip netns add`` fail), and a lock file keeps
two runs from building over each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

PREFIX = "gdwan-"
SWITCH = PREFIX + "sw"
AGG = PREFIX + "agg"
DEV = "wan0"
SUBNET = "10.77.0"
AGG_IP = f"{SUBNET}.1"
LOCK = "/run/gdfed-bench-wan.lock"


@dataclass(frozen=True)
class Link:
    """One end's access link: rate in Mbit/s each way, and the round-trip time it adds."""

    mbit: float
    rtt_ms: float

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8


@dataclass(frozen=True)
class Topology:
    """K sites with the same link each, and the aggregator's link (its RTT is carried by the sites')."""

    name: str
    k: int
    site: Link
    agg_mbit: float

    def site_ns(self, i: int) -> str:
        return f"{PREFIX}s{i}"

    def site_ip(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    @property
    def agg_bytes_per_s(self) -> float:
        return self.agg_mbit * 1e6 / 8

    def namespaces(self) -> list[str]:
        return [SWITCH, AGG, *(self.site_ns(i) for i in range(self.k))]


def sh(argv: Sequence[str], *, check: bool = True) -> str:
    """Run one command; its stdout. A failure raises with the command's stderr."""
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def exec_in(ns: str) -> list[str]:
    """The argv prefix that runs a program inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def ours() -> list[str]:
    """Namespaces of this benchmark that exist now (left over or live)."""
    names = [line.split()[0] for line in sh(["ip", "netns", "list"]).splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def delete_all() -> list[str]:
    """Kill what still runs in our namespaces (every one of them was started by this benchmark), delete them."""
    gone = ours()
    for ns in gone:
        for pid in sh(["ip", "netns", "pids", ns], check=False).split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh(["ip", "netns", "del", ns], check=False)
    return gone


def build(topo: Topology) -> None:
    """The namespaces, veth pairs, bridge and addresses of ``topo`` (no shaping yet)."""
    for ns in topo.namespaces():
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    sh(["ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge"])
    sh(["ip", "-n", SWITCH, "link", "set", "br0", "up"])
    ends = [(AGG, "agg", AGG_IP)] + [(topo.site_ns(i), f"s{i}", topo.site_ip(i)) for i in range(topo.k)]
    for ns, port, ip in ends:
        sh(["ip", "-n", SWITCH, "link", "add", port, "type", "veth", "peer", "name", DEV, "netns", ns])
        sh(["ip", "-n", SWITCH, "link", "set", port, "master", "br0"])
        sh(["ip", "-n", SWITCH, "link", "set", port, "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", DEV])
        sh(["ip", "-n", ns, "link", "set", DEV, "up"])


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """The block runs alone among bench-wan runs (they share the namespace names), and unwinds on SIGTERM."""
    with open(LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another bench-wan run holds {LOCK}") from None
        # SIGTERM would end the process without unwinding; make it unwind like ^C does.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def built(topo: Topology) -> Iterator[Topology]:
    """``topo`` built for the block, torn down after it: on return, on error, on ^C (call within ``exclusive``)."""
    stale = delete_all()
    if stale:
        print(f"deleted namespaces left by an earlier run: {', '.join(stale)}", flush=True)
    try:
        build(topo)
        yield topo
    finally:
        delete_all()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass(frozen=True)
class Counters:
    """Bytes sent and received on an end's ``wan0`` (IP packets, headers included)."""

    tx: int
    rx: int


def counters(ns: str) -> Counters:
    """``wan0``'s byte counters inside ``ns``."""
    text = sh([*exec_in(ns), "cat", "/proc/net/dev"])
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == DEV:
            fields = rest.split()
            return Counters(tx=int(fields[8]), rx=int(fields[0]))
    raise RuntimeError(f"no {DEV} in {ns}")
