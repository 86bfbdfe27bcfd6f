"""The reliability campaign: every fault of bench.reliability, its figures, and the goals.

    python -m bench.reliability.campaign [--quick] [--seed N] [--work DIR] [--no-docs]

Runs, in order: SIGKILLs of the daemon under every optimizer, method and lossy codec (through the
fault proxy), real workers SIGKILLed mid-training and mid-upload, a full disk, the fuzz loop, the
load test and the malicious sites. Writes docs/reliability.json and the table in
docs/reliability.md (unless ``--no-docs``) and exits 1 when a goal is missed (a zero-goal above
0, fewer fuzz cases or load sites than asked). ``--quick`` is the CI version (tests/test_reliability.py):
two kill scenarios, no worker processes, 1,500 fuzz cases, one load round.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.reliability import disk, fuzz, hostile, kills, load, report, workers

DOCS = Path(__file__).resolve().parent.parent.parent / "docs"
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How much of each part to run."""

    scenarios: tuple[str, ...]
    kills_per_scenario: int
    workers: bool
    fuzz_cases: int
    load_sites: int
    load_rounds: int


FULL = Settings(
    scenarios=tuple(s.name for s in kills.SCENARIOS),
    kills_per_scenario=3,
    workers=True,
    fuzz_cases=10_000,
    load_sites=64,
    load_rounds=3,
)
QUICK = Settings(
    scenarios=("fedadam", "int8-fedavgm"),
    kills_per_scenario=2,
    workers=False,
    fuzz_cases=1_500,
    load_sites=64,
    load_rounds=1,
)


@dataclass
class Campaign:
    """The parts' figures as they come in, and what could not run."""

    seed: int
    settings: Settings
    log: Callable[[str], None]
    errors: list[str] = field(default_factory=list)

    def step(self, name: str, run: Callable[[], T]) -> T | None:
        started = time.monotonic()
        self.log(f"[campaign] {name} ...")
        try:
            result = run()
        except Exception as exc:
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            self.log(f"[campaign] {name} could not run: {type(exc).__name__}: {exc}")
            return None
        self.log(f"[campaign] {name} done in {time.monotonic() - started:.0f} s")
        return result


def run(work: Path, settings: Settings, seed: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every part, in ``work``; the report (every figure, goals included)."""
    started = time.monotonic()
    c = Campaign(seed, settings, log)
    chosen = [s for s in kills.SCENARIOS if s.name in settings.scenarios]
    k = c.step(
        "kills",
        lambda: kills.campaign(work / "kills", chosen, seed=seed, kills=settings.kills_per_scenario, log=log),
    )
    w = (
        c.step("workers", lambda: workers.run(work / "workers", seed=seed, log=log))
        if settings.workers
        else None
    )
    d = c.step("disk", lambda: disk.run(work / "disk", log=log))
    f = c.step("fuzz", lambda: fuzz.run(work / "fuzz", cases=settings.fuzz_cases, seed=seed, log=log))
    ld = c.step(
        "load",
        lambda: load.run(work / "load", sites=settings.load_sites, rounds=settings.load_rounds, log=log),
    )
    h = c.step("hostile", lambda: hostile.run(work / "hostile", log=log))

    moments: dict[str, int] = {}
    for record in k.kills if k else []:
        label = f"{record.aimed_at}/{record.observed}"
        moments[label] = moments.get(label, 0) + 1
    worker_kills = sum(w.kills.values()) if w else 0
    errors = list(c.errors)
    errors += k.errors if k else []
    errors += w.errors if w else []
    errors += d.errors if d else []
    errors += ld.errors if ld else []
    out: dict[str, Any] = {
        "quick": settings is QUICK,
        "seed": seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "scenarios": k.scenarios if k else [],
        "daemon_kills": len(k.kills) if k else 0,
        "kills_by_moment": dict(sorted(moments.items())),
        "proxy_faults": (k.proxy_faults if k else 0) + (w.proxy_faults if w else 0),
        "worker_kills": worker_kills,
        "worker_kills_by_moment": w.kills if w else {},
        "disk_mode": d.mode if d else "not run",
        "disk_full_events": d.events if d else 0,
        "disk_refusals": d.refusals if d else {},
        "hostile_cases": len(h.passed) if h else 0,
        "updates_acknowledged": k.acked if k else 0,
        "updates_lost": (k.lost if k else 0) + (d.lost if d else 0),
        "updates_double_counted": (k.double_counted if k else 0) + (d.double_counted if d else 0),
        "final_state_mismatches": k.mismatches if k else 0,
        "rounds_failed": (k.rounds_failed if k else 0)
        + (w.rounds_failed if w else 0)
        + (d.rounds_failed if d else 0),
        "daemon_tracebacks": (k.tracebacks if k else 0)
        + (w.tracebacks if w else 0)
        + (d.tracebacks if d else 0),
        "retried_statuses": k.retried if k else {},
        "fuzz_goal": settings.fuzz_cases,
        "fuzz_cases": f.cases if f else 0,
        "fuzz_methods": f.methods if f else 0,
        "fuzz_crashes": f.crashes if f else 0,
        "fuzz_statuses": dict(f.codes.most_common()) if f else {},
        "fuzz_crash_samples": f.crash_samples if f else [],
        "fuzz_healthy_after": f.healthy_after if f else False,
        "wire_corrupt_cases": f.wire_corrupt_cases if f else 0,
        "wire_corrupt_internal": f.wire_corrupt_internal if f else 0,
        "load_goal": settings.load_sites,
        "load_sites": ld.sites if ld and not ld.errors else 0,
        "load_rounds_published": ld.rounds_published if ld else 0,
        "upload_p50_s": round(ld.percentile(0.5), 4) if ld else None,
        "upload_p99_s": round(ld.percentile(0.99), 4) if ld else None,
        "hostile_failures": h.failures if h else 1,
        "hostile_notes": h.notes if h else {},
        "campaign_errors": len(errors),
        "campaign_error_list": errors,
    }
    out["faults_injected"] = (
        out["daemon_kills"]
        + out["proxy_faults"]
        + worker_kills
        + out["disk_full_events"]
        + out["hostile_cases"]
    )  # fmt: skip  (fuzz cases are counted on their own)
    out["campaign_seconds"] = round(time.monotonic() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the CI version (about 2 minutes)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument(
        "--work", type=Path, help="where the daemons' state and logs go (default: a temp dir)"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/reliability.{md,json}")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="gdfed-reliability-") as tmp:
        work = args.work or Path(tmp)
        result = run(work, settings, args.seed, log=lambda line: print(line, flush=True))
    if not args.no_docs:
        report.write(result, DOCS)
    print(report.table(result))
    failed = report.failed_goals(result)
    for line in failed:
        print(f"reliability: goal missed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
