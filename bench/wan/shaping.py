"""Rate limits on the veth ends: a tbf qdisc on each end's egress, so each direction is shaped.

A site's upload leaves through its own ``wan0`` (shaped at the site's rate) and enters the
aggregator through the switch's ``agg`` port (shaped at the aggregator's rate); a download
leaves the aggregator's ``wan0`` (aggregator's rate) and the switch's ``sN`` port (site's rate).
The round-trip time is not the kernel's here: sch_netem is missing on this machine, so
bench/wan/delay.py adds it in userspace.
"""

from __future__ import annotations

from bench.wan.netns import AGG, DEV, SWITCH, Topology, sh

# The queue a tbf may hold before it drops, as time at its rate: a modest router buffer.
QUEUE_MS = 50
MIN_BURST = 64 * 1024


def tbf(ns: str, dev: str, mbit: float) -> list[str]:
    """The tc command shaping ``dev``'s egress in ``ns`` to ``mbit`` Mbit/s."""
    # The bucket must hold a GSO segment (veths pass up to 64 KiB at once) and a few ms at the rate,
    # or the rate falls short of the setting at high rates.
    burst = max(MIN_BURST, int(mbit * 1e6 / 8 * 0.004))
    return [
        "tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
        "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", f"{QUEUE_MS}ms",
    ]  # fmt: skip


def commands(topo: Topology) -> list[list[str]]:
    """Every tc command of ``topo``: the aggregator's two directions, then each site's."""
    out = [tbf(AGG, DEV, topo.agg_mbit), tbf(SWITCH, "agg", topo.agg_mbit)]
    for i in range(topo.k):
        out += [tbf(topo.site_ns(i), DEV, topo.site.mbit), tbf(SWITCH, f"s{i}", topo.site.mbit)]
    return out


def apply(topo: Topology) -> list[str]:
    """Shape every link of ``topo``; the commands, as text."""
    done = []
    for argv in commands(topo):
        sh(argv)
        done.append(" ".join(argv))
    return done
