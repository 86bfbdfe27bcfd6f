"""The round on shaped links: ours (exact and bf16 codecs), NVIDIA FLARE and Flower, K sites, one table.

    python -m bench.wan.run                       # both cases, every system (make bench-wan)
    python -m bench.wan.run --cases wan --systems ours-exact --k 2 --params 2.5e6 --rounds 2 --warmup 1
    python -m bench.wan.run --render bench/out/wan.json   # the docs from a saved run

Per case: build the namespaces (bench/wan/netns.py), shape the links (shaping.py), start a
delay line in each site's namespace (delay.py), verify the shaping with raw TCP (check.py),
then run every system with this module again as the driver inside the aggregator's
namespace (``--inner``), its site processes in the sites' (inns.py). The namespaces are
deleted after each case, on error and on ^C too. Results go to bench/out/wan.json as they
come; the "wan" section of docs/benchmarks.md and the ``wan_*`` keys of docs/benchmarks.json
at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.procs import Procs, wait_quiet
from bench.wan import netns, shaping
from bench.wan.check import check, describe
from bench.wan.netns import AGG, AGG_IP, Link, Topology, counters, exec_in

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "bench" / "out"
SERVICE_PORT = 7700
PROBE_PORT = 7701
SYSTEMS = ("ours-exact", "ours-bf16", "nvflare", "flower")
CASES = {
    # issue 19: sites at 100 Mbit/s and 40 ms RTT, the aggregator at 1 Gbit/s; then 1 Gbit/s, 10 ms sites.
    "wan": (Link(100, 40), 1000),
    "lan": (Link(1000, 10), 1000),
}


def shapes_for(params: float) -> dict[str, tuple[int, ...]]:
    """The state the systems federate: peers' "quick" GPT-2 subset (0), else ~``params`` fp32 in 1M blocks."""
    from bench.round_overhead import model_shapes

    if not params:
        return model_shapes(True)
    n = int(params)
    shapes: dict[str, tuple[int, ...]] = {f"block{i}.weight": (1024, 1024) for i in range(n // (1 << 20))}
    if n % (1 << 20):
        shapes["tail.weight"] = (n % (1 << 20),)
    return shapes


# ---------------------------------------------------------------- inside the aggregator's namespace


def run_system(system: str, topo: Topology, total: int, params: float, work: Path) -> dict[str, Any]:
    """One system's run on the shaped links; its runner's figures plus each site's bytes on ``wan0``."""
    from bench.peers import run_flower, run_nvflare
    from bench.round_overhead import run_ours
    from bench.wan.inns import in_namespaces

    codec = system.split("-", 1)[1] if system.startswith("ours-") else "exact"
    # run_ours keeps an init state it finds in its folder: one from a run with another state must go.
    shutil.rmtree(work, ignore_errors=True)
    before = [counters(topo.site_ns(i)) for i in range(topo.k)]
    with in_namespaces(topo, SERVICE_PORT, codec):
        if system.startswith("ours-"):
            result = run_ours(topo.k, total, shapes_for(params), work)
        elif system == "nvflare":
            result = run_nvflare(topo.k, total, True, work)
        else:
            result = run_flower(topo.k, total, True, work)
    after = [counters(topo.site_ns(i)) for i in range(topo.k)]
    result["system"] = system
    result["site_up_bytes"] = [a.tx - b.tx for a, b in zip(after, before, strict=True)]
    result["site_down_bytes"] = [a.rx - b.rx for a, b in zip(after, before, strict=True)]
    result["total_rounds"] = total
    return result


def inner(args: argparse.Namespace) -> int:
    topo = Topology(args.case, args.k, Link(args.site_mbit, args.rtt_ms), args.agg_mbit)
    out: dict[str, Any] = {"runs": [], "failures": []}
    work = Path(args.work)
    for system in args.systems:
        idle = wait_quiet(max_wait=60)
        print(
            f"[{time.strftime('%H:%M:%S')}] {topo.name}: {system} (machine busy {idle:.0%} before)",
            flush=True,
        )
        try:
            result = run_system(system, topo, args.warmup + args.rounds, args.params, work / system)
        except Exception as exc:  # one system failing must not lose the others' figures
            traceback.print_exc()
            out["failures"].append({"system": system, "error": str(exc)[-2000:]})
        else:
            out["runs"].append(result)
            rounds = [r["round_s"] for r in result["rounds"][args.warmup :]]
            print(f"  {system}: rounds {', '.join(f'{r:.1f}' for r in rounds)} s", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------- the driver


def run_case(name: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    site, agg_mbit = CASES[name]
    topo = Topology(name, args.k, site, agg_mbit)
    case: dict[str, Any] = {"name": name, "k": args.k, "site_mbit": site.mbit, "rtt_ms": site.rtt_ms}
    case["agg_mbit"] = agg_mbit
    with netns.built(topo), Procs(logs / name) as procs:
        case["tc"] = shaping.apply(topo)
        for i in range(topo.k):
            procs.start(
                f"delay{i}",
                [
                    *exec_in(topo.site_ns(i)), sys.executable, "-m", "bench.wan.delay", "--to", AGG_IP,
                    "--ports", str(SERVICE_PORT), str(PROBE_PORT), "--rtt-ms", f"{site.rtt_ms:g}",
                ],
                cwd=ROOT,
            )  # fmt: skip
        time.sleep(1.0)
        shaped = check(topo, PROBE_PORT, logs / name)
        case["check"] = shaped.as_dict()
        print(describe(shaped), flush=True)
        if not shaped.ok and args.strict:
            raise RuntimeError("the shaping does not hold (--strict)")
        results = logs / name / "inner.json"
        argv = [
            *exec_in(AGG), sys.executable, "-m", "bench.wan.run", "--inner", "--case", name,
            "--k", str(args.k), "--site-mbit", f"{site.mbit:g}", "--rtt-ms", f"{site.rtt_ms:g}",
            "--agg-mbit", f"{agg_mbit:g}", "--rounds", str(args.rounds), "--warmup", str(args.warmup),
            "--params", str(args.params), "--systems", *args.systems, "--out", str(results),
            "--work", str(logs / name / "work"),
        ]  # fmt: skip
        driver = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            code = driver.wait()
        except BaseException:
            # Let it stop its processes itself (Procs.close); what it leaves, netns.delete_all kills.
            driver.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                driver.wait(timeout=30)
            driver.kill()
            raise
        if code != 0:
            raise RuntimeError(f"the driver inside {AGG} exited with {code}")
        case |= json.loads(results.read_text())
    return case


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["wan", "lan"])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds measured, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--params", type=float, default=0,
        help="fp32 parameters of the state (ours only); 0: the peers' quick GPT-2 subset",
    )  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="stop when the shaping check fails")
    parser.add_argument("--render", type=Path, help="write the docs from a saved run")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--case", "--out", "--work"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--site-mbit", "--rtt-ms", "--agg-mbit"):
        parser.add_argument(hidden, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    from bench.wan.report import render, write

    if args.render:
        data = json.loads(args.render.read_text())
    else:
        if args.params and any(not s.startswith("ours") for s in args.systems):
            parser.error("--params sizes our state only; Flower's app carries the full or the quick GPT-2")
        if os.geteuid() != 0:
            parser.error("network namespaces need root")
        with netns.exclusive():
            data = collect(args)
    markdown, figures = render(data)
    print(markdown)
    if not args.no_docs:
        write(markdown, figures)
        print("wrote the wan section of docs/benchmarks.md and wan_* keys of docs/benchmarks.json")
    return 1 if any(c.get("failures") or c.get("error") for c in data["cases"]) else 0


def collect(args: argparse.Namespace) -> dict[str, Any]:
    from bench.round_overhead import codec_work, fp32_bytes
    from bench.workload import machine

    shapes = shapes_for(args.params)
    data: dict[str, Any] = {
        "machine": machine(),
        "cores": os.cpu_count() or 1,
        "k": args.k,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "params": fp32_bytes(shapes) // 4,
        "params_set": bool(args.params),
        "fp32_bytes": fp32_bytes(shapes),
        "state": "GPT-2 small's every 8th tensor" if not args.params else f"{len(shapes)} tensors of up to 1M elements",
        "systems": args.systems,
        "shaping": {"queue_ms": shaping.QUEUE_MS, "example": [" ".join(c) for c in shaping.commands(
            Topology("wan", 1, *CASES["wan"]))]},
        "cases": [],
    }  # fmt: skip
    saved = OUT / "wan.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    # First, so that a run stopped part-way still renders with its compute limit.
    print("codec work of a round (single thread, our shards)...", flush=True)
    data["codec_work"] = codec_work(shapes)
    for name in args.cases:
        try:
            case = run_case(name, args, OUT / "wan-logs")
        except Exception as exc:
            traceback.print_exc()
            case = {"name": name, "error": str(exc)[-2000:]}
        data["cases"].append(case)
        saved.write_text(json.dumps(data, indent=1))
    print(f"saved {saved}", flush=True)
    return data


if __name__ == "__main__":
    sys.exit(main())
