"""The campaign's figures: docs/reliability.json, the table in docs/reliability.md, and the goals.

The JSON holds every figure; the Markdown file keeps its hand-written parts and has the table
between two marker comments replaced. ``failed_goals`` lists each figure that missed its goal
(a zero-goal above 0, a minimum not reached); the command exits non-zero when any did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BEGIN = "<!-- reliability:begin (written by python -m bench.reliability.campaign) -->"
END = "<!-- reliability:end -->"

# Figures that must be 0.
ZERO_GOALS = (
    "updates_lost",
    "updates_double_counted",
    "final_state_mismatches",
    "fuzz_crashes",
    "rounds_failed",
    "hostile_failures",
    "daemon_tracebacks",
    "campaign_errors",
    "wire_corrupt_internal",
)

ROWS = [
    ("faults_injected", "faults injected (all kinds)", ""),
    ("daemon_kills", "SIGKILLs of the daemon", ""),
    ("kills_by_moment", "… by what the daemon was doing (its round's state just before)", ""),
    ("proxy_faults", "connections cut, reset or delayed by the proxy", ""),
    ("worker_kills", "SIGKILLs of worker processes (mid-training, mid-upload)", ""),
    ("disk_full_events", "full-disk events", ""),
    ("hostile_cases", "malicious-site cases", ""),
    ("scenarios", "kill scenarios (optimizers, methods, codecs)", ""),
    ("updates_acknowledged", "uploads acknowledged under faults", ""),
    ("updates_lost", "acknowledged uploads lost", "0"),
    ("updates_double_counted", "acknowledged uploads counted twice", "0"),
    ("final_state_mismatches", "final states not bit-identical to the fault-free run", "0"),
    ("rounds_failed", "rounds FAILED (or not published)", "0"),
    ("daemon_tracebacks", "tracebacks in the daemons' logs (kills, disk, workers)", "0"),
    ("fuzz_cases", "fuzz cases", ">= {fuzz_goal}"),
    ("fuzz_methods", "methods fuzzed (Federation + Admin)", ""),
    ("fuzz_crashes", "fuzz crashes (INTERNAL/UNKNOWN, exits, tracebacks, health)", "0"),
    ("wire_corrupt_cases", "undecodable messages sent (separate probe)", ""),
    ("wire_corrupt_internal", "… answered INTERNAL (server/decoding.py answers INVALID_ARGUMENT)", "0"),
    ("load_sites", "concurrent sites in the load test", ">= {load_goal}"),
    ("load_rounds_published", "load rounds published with every site", ""),
    ("upload_p50_s", "upload latency p50 under load (s)", ""),
    ("upload_p99_s", "upload latency p99 under load (s)", ""),
    ("hostile_failures", "malicious-site cases failed", "0"),
    ("campaign_errors", "campaign steps that could not run", "0"),
    ("campaign_seconds", "wall time of the campaign (s)", ""),
]


def failed_goals(report: Mapping[str, Any]) -> list[str]:
    out = [f"{key} = {report.get(key)} (goal 0)" for key in ZERO_GOALS if report.get(key, 0) != 0]
    if report.get("fuzz_cases", 0) < report.get("fuzz_goal", 0):
        out.append(f"fuzz_cases = {report.get('fuzz_cases')} (goal >= {report['fuzz_goal']})")
    if report.get("load_sites", 0) < report.get("load_goal", 0):
        out.append(f"load_sites = {report.get('load_sites')} (goal >= {report['load_goal']})")
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def table(report: Mapping[str, Any]) -> str:
    lines = ["| figure | value | goal |", "|---|---|---|"]
    for key, label, goal in ROWS:
        if key in report:
            lines.append(f"| {label} (`{key}`) | {_cell(report[key])} | {goal.format(**report)} |")
    failed = failed_goals(report)
    verdict = "every goal met" if not failed else "GOALS MISSED: " + "; ".join(failed)
    mode = "quick (CI)" if report.get("quick") else "full"
    lines += ["", f"Run: {mode}, seed {report.get('seed')}, {report.get('machine', '')}: {verdict}."]
    for section in ("hostile_notes", "campaign_error_list", "fuzz_crash_samples"):
        notes = report.get(section)
        if notes:
            lines += ["", f"`{section}`:", ""]
            items = notes.items() if isinstance(notes, Mapping) else enumerate(notes)
            lines += [f"- {k}: {str(v)[:400]}" for k, v in items]
    return "\n".join(lines)


def write(report: Mapping[str, Any], docs: Path) -> None:
    """docs/reliability.json (every figure) and the table in docs/reliability.md."""
    (docs / "reliability.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md = docs / "reliability.md"
    text = md.read_text() if md.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    md.write_text(f"{head}{BEGIN}\n{table(report)}\n{END}{tail}")
