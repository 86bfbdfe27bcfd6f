"""The goals table of the peers section (bench/compare_peers.py): issue 6's and issue 19's, at K = 4.

Issue 19 tightened two of issue 6's goals on the same measures (round overhead
against Flower's and NVIDIA FLARE's); those rows carry issue 19's bound and
name issue 6's. The aggregator's figures come from docs/benchmarks.json, as
bench/aggregator.py last wrote them.
"""

from __future__ import annotations

from typing import Any


def goal_table(
    fig: dict[tuple[str, int], dict[str, Any]],
    ks: list[int],
    existing: dict[str, Any],
    figures: dict[str, object],
) -> list[str]:
    """The markdown lines of the goals table; the figures it judges are added to ``figures``."""

    def get(system: str, k: int) -> dict[str, Any] | None:
        return fig.get((system, k))

    ingest_fraction = existing.get("ingest_fraction_of_zstd_limit")
    cpu_fraction = existing.get("daemon_cpu_fraction_of_zstd_limit")
    o4, f4, n4 = get("ours", 4), get("flower", 4), get("nvflare", 4)
    goals = [
        "",
        "### Against the goals of issues 6 and 19 (K = 4)",
        "",
        "Issue 19 tightened issue 6's overhead ratios on the same measures (ours ÷ theirs at K = 4); those rows",
        "replace issue 6's and judge by issue 19's bound (issue 6's in parentheses). The compute-limit goal is the same",
        "in both issues. The shaped-link goals of issue 19 are in the WAN section.",
        "",
        "| goal | measured | |",
        "|---|---|---|",
    ]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    if o4 and f4:
        r = o4["overhead_s"][0] / f4["overhead_s"][0]
        figures["round_overhead_ratio_vs_flower"] = round(r, 3)
        goals.append(
            f"| round overhead ≤ 0.10 of Flower's (issue 19; issue 6: ≤ 1/8) | {r:.3f} (1/{1 / r:.1f}) | "
            f"{verdict(r <= 0.10)} |"
        )
    if o4 and n4:
        r = o4["overhead_s"][0] / n4["overhead_s"][0]
        figures["round_overhead_ratio_vs_nvflare"] = round(r, 3)
        goals.append(
            f"| round overhead ≤ 0.25 of NVFlare's (issue 19; issue 6: ≤ 1/3) | {r:.3f} (1/{1 / r:.1f}) | "
            f"{verdict(r <= 0.25)} |"
        )
    if o4:
        r = o4["overhead_s"][0] / o4["compute_limit_s"]
        figures["round_overhead_over_compute_limit"] = round(r, 2)
        goals.append(
            f"| round overhead ≤ 2 × the compute limit (issues 6 and 19) | {r:.2f} × | {verdict(r <= 2)} |"
        )
    if o4 and f4:
        r = o4["server_peak_rss_MB"] / f4["server_peak_rss_MB"]
        figures["server_peak_rss_ratio_vs_flower"] = round(r, 3)
        goals.append(f"| server peak RSS ≤ 1/4 of Flower's (issue 6) | {r:.3f} | {verdict(r <= 1 / 4)} |")
    if o4 and n4:
        r = o4["server_peak_rss_MB"] / n4["server_peak_rss_MB"]
        figures["server_peak_rss_ratio_vs_nvflare"] = round(r, 3)
        goals.append(f"| server peak RSS ≤ 1/3 of NVFlare's (issue 6) | {r:.3f} | {verdict(r <= 1 / 3)} |")
    ours_ks = [k for k in ks if get("ours", k)]
    if len(ours_ks) >= 2:
        lo, hi = get("ours", ours_ks[0]), get("ours", ours_ks[-1])
        assert lo and hi
        growth = hi["server_peak_rss_MB"] / lo["server_peak_rss_MB"] - 1
        figures["server_peak_rss_growth_k_min_to_max"] = round(growth, 3)
        goals.append(
            f"| server peak RSS flat in K (issue 6; issue 19: no memory goal regresses) | {lo['server_peak_rss_MB']:.0f} → {hi['server_peak_rss_MB']:.0f} MB "
            f"(K = {ours_ks[0]} → {ours_ks[-1]}, {growth:+.0%}) | {verdict(growth <= 0.10)} (flat: within 10 %) |"
        )
    if ingest_fraction is not None:
        figures["ingest_fraction_of_zstd_limit"] = ingest_fraction
        goals.append(
            f"| ingest ≥ 0.70 of single-core zstd decompression (issue 3) | {ingest_fraction:.2f} (bench/aggregator.py, "
            f"lowest over K) | {verdict(float(ingest_fraction) >= 0.70)} |"
        )
    if cpu_fraction is not None:
        figures["daemon_cpu_fraction_of_zstd_limit"] = cpu_fraction
        goals.append(
            f"| daemon MB decoded per CPU-s ≥ 0.4 of one core's zstd decompression (issue 19) | {cpu_fraction:.2f} "
            f"(bench/aggregator.py, lowest over K) | {verdict(float(cpu_fraction) >= 0.4)} |"
        )
    return goals
