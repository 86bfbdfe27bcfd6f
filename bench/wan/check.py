"""Does the shaping hold? Raw TCP through the links, before any system runs on them.

Three measurements, through each site's delay line as the federation's programs connect:
the round trip of a small ping-pong from every site in turn (against the set RTT); all K sites
uploading at once, then all K downloading at once (each site's rate against what the links
allow it: its own rate, or its share of the aggregator's when that is smaller). TCP payload
rides in 1514-byte frames, so goodput is ~4 % under the rate tbf enforces on whole frames.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.procs import Procs
from bench.wan.netns import AGG, Topology, exec_in

ROOT = Path(__file__).resolve().parent.parent.parent

# A rate within this fraction of the expected one passes; the RTT within RTT_SLACK_S.
RATE_TOLERANCE = 0.10
RTT_SLACK_S = 0.005
BULK_SECONDS = 2.0


@dataclass
class ShapingCheck:
    """What the probes measured against what the topology sets; ``ok`` when every figure holds."""

    rtt_set_s: float
    rtt_s: list[float]
    first_exchange_s: list[float]
    rate_set_Bps: float
    up_Bps: list[float]
    down_Bps: list[float]
    ok: bool
    problems: list[str]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def expected_rate(topo: Topology) -> float:
    """Bytes/s each of K sites moving at once can get: its link, or its share of the aggregator's."""
    return min(topo.site.bytes_per_s, topo.agg_bytes_per_s / topo.k)


def _probes(
    procs: Procs, topo: Topology, port: int, name: str, extra: list[str], sites: list[int]
) -> list[dict[str, float]]:
    """Probe clients in ``sites``' namespaces, started together; what each printed."""
    runs = []
    for i in sites:
        argv = [*exec_in(topo.site_ns(i)), sys.executable, "-m", "bench.wan.probe", "client"]
        runs.append((f"{name}{i}", procs.start(f"{name}{i}", [*argv, "--port", str(port), *extra], cwd=ROOT)))
    out = []
    for label, proc in runs:
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"probe {label} failed:\n{procs.log_tail(label)}")
        out.append(json.loads(procs.log_tail(label).strip().splitlines()[-1]))
    return out


def check(topo: Topology, port: int, logs: Path) -> ShapingCheck:
    """Measure the links of ``topo`` (built, shaped, delay lines listening on ``port``)."""
    with Procs(logs) as procs:
        procs.start(
            "probe-server",
            [*exec_in(AGG), sys.executable, "-m", "bench.wan.probe", "serve", "--port", str(port)],
            cwd=ROOT,
        )
        time.sleep(1.0)
        # One site at a time: a ping-pong measures the idle path.
        pings = [p for i in range(topo.k) for p in _probes(procs, topo, port, "ping", ["--count", "10"], [i])]
        rate = expected_rate(topo)
        n = int(max(4e6, rate * BULK_SECONDS))
        at = time.time() + 1.5  # every client started and connected before the first byte
        sites = list(range(topo.k))
        up = _probes(procs, topo, port, "up", ["--mode", "up", "--bytes", str(n), "--at", str(at)], sites)
        at = time.time() + 1.5
        down = _probes(
            procs, topo, port, "down", ["--mode", "down", "--bytes", str(n), "--at", str(at)], sites
        )
    rtt_set = topo.site.rtt_ms / 1000
    result = ShapingCheck(
        rtt_set_s=rtt_set,
        rtt_s=[p["rtt_s"] for p in pings],
        first_exchange_s=[p["first_exchange_s"] for p in pings],
        rate_set_Bps=rate,
        up_Bps=[u["bytes_per_s"] for u in up],
        down_Bps=[d["bytes_per_s"] for d in down],
        ok=True,
        problems=[],
    )
    for i, rtt in enumerate(result.rtt_s):
        if abs(rtt - rtt_set) > RTT_SLACK_S:
            result.problems.append(f"site {i}: RTT {rtt * 1000:.1f} ms, set {rtt_set * 1000:.0f} ms")
    for way, rates in (("up", result.up_Bps), ("down", result.down_Bps)):
        for i, got in enumerate(rates):
            if abs(got / rate - 1) > RATE_TOLERANCE:
                result.problems.append(
                    f"site {i} {way}: {got * 8 / 1e6:.1f} Mbit/s, expected {rate * 8 / 1e6:.1f}"
                )
    result.ok = not result.problems
    return result


def describe(c: ShapingCheck) -> str:
    """One paragraph for the terminal and the docs."""
    mbit = [r * 8 / 1e6 for r in c.up_Bps + c.down_Bps]
    return (
        f"shaping check: RTT set {c.rtt_set_s * 1000:.0f} ms, measured "
        f"{min(c.rtt_s) * 1000:.1f}–{max(c.rtt_s) * 1000:.1f} ms (ping-pong, median of 10 per site; "
        f"first exchange with the connection's handshake {max(c.first_exchange_s) * 1000:.0f} ms); "
        f"all sites at once, expected {c.rate_set_Bps * 8 / 1e6:.1f} Mbit/s each, measured "
        f"up {', '.join(f'{r * 8 / 1e6:.1f}' for r in c.up_Bps)}, down "
        f"{', '.join(f'{r * 8 / 1e6:.1f}' for r in c.down_Bps)} Mbit/s "
        f"(goodput / rate {min(mbit) / (c.rate_set_Bps * 8 / 1e6):.2f}–{max(mbit) / (c.rate_set_Bps * 8 / 1e6):.2f}): "
        + ("holds" if c.ok else "**does not hold**: " + "; ".join(c.problems))
    )
