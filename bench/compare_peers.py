"""Our round overhead beside Flower's and NVIDIA FLARE's, and against the compute limit, in one run.

For each K, one system at a time (never two heavy ones at once): our daemon
and K site processes (bench/round_overhead.py), then NVFlare in POC mode and
Flower in deployment mode (bench/peers.py), all on 127.0.0.1 with the same
GPT-2-small-sized fp32 model, the same K, the same rounds and the same
trivial local training. Then the compute limit of a round from single-thread
measurements of our shards.

    python -m bench.compare_peers [--ks 2 4 8] [--peer-ks 2 4] [--rounds 3] [--warmup 2] [--quick]
    python -m bench.compare_peers --render bench/out/peers.json   # docs from a saved run

Every result is saved to bench/out/peers.json as it comes (a later failure
keeps the earlier figures); the "peers" section of docs/benchmarks.md, its
plot docs/benchmarks-peers.png and keys of docs/benchmarks.json are written
at the end (not with --quick).

Each system runs ``warmup + rounds`` rounds and every per-round figure is
taken over the last ``rounds``: a run's first rounds carry one-time costs
(processes connecting, buffers and files first allocated; our daemon starts
writing over the files of dropped states and differences from its fourth
round), and a real run is long.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.peer_goals import goal_table
from bench.peers import run_flower, run_nvflare
from bench.procs import wait_quiet
from bench.round_overhead import codec_work, compute_limit, fp32_bytes, model_shapes, run_ours
from bench.workload import DOCS, MB, machine, write_section

OUT = Path(__file__).resolve().parent / "out"
SYSTEMS = ("ours", "flower", "nvflare")
NAMES = {"ours": "gradualdiff-fed", "flower": "Flower", "nvflare": "NVIDIA FLARE"}


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_all(args: argparse.Namespace, saved: Path) -> dict[str, Any]:
    shapes = model_shapes(args.quick)
    data: dict[str, Any] = {
        "machine": machine(),
        "cores": os.cpu_count() or 1,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "quick": args.quick,
        "fp32_bytes": fp32_bytes(shapes),
        "runs": [],
        "failures": [],
    }

    def save() -> None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(data, indent=1))

    print("codec work of a round (single thread, our shards)...", flush=True)
    data["codec_work"] = codec_work(shapes)
    save()
    total = args.warmup + args.rounds
    with tempfile.TemporaryDirectory(prefix="gdfed-peers-") as tmp:
        for k in sorted(set(args.ks) | set(args.peer_ks)):
            plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
            if k in args.ks:
                plan.append(("ours", partial(run_ours, k, total, shapes, Path(tmp) / f"ours-k{k}")))
            if k in args.peer_ks and not args.skip_nvflare:
                plan.append(
                    ("nvflare", partial(run_nvflare, k, total, args.quick, Path(tmp) / f"nvflare-k{k}"))
                )
            if k in args.peer_ks and not args.skip_flower:
                plan.append(("flower", partial(run_flower, k, total, args.quick, Path(tmp) / f"flower-k{k}")))
            for system, fn in plan:
                result = None
                # Other sessions share this machine: start each run when it is quiet, and run it once
                # more when others still took a large share of the cores during it; keep the quieter.
                for attempt in range(1 + args.retries):
                    idle = wait_quiet()
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {system} K={k}, {args.warmup} + {args.rounds} round(s)"
                        f" (machine busy {idle:.0%} before it)...",
                        flush=True,
                    )
                    try:
                        got = fn()
                    except Exception as exc:  # one system failing must not lose the others' figures
                        traceback.print_exc()
                        if result is not None:  # a failed rerun leaves the first run's figures standing
                            break
                        if attempt < args.retries:  # a peer's run that fails once gets another try
                            print(f"  {system} K={k} failed: once more", flush=True)
                            continue
                        data["failures"].append({"system": system, "k": k, "error": str(exc)[-2000:]})
                        save()
                        break
                    got["attempt"] = attempt + 1
                    if result is None or got["foreign_cpu_share"] < result["foreign_cpu_share"]:
                        result = got
                    if result["foreign_cpu_share"] <= args.max_foreign or attempt == args.retries:
                        break
                    print(f"  others used {got['foreign_cpu_share']:.0%} of the cores: once more", flush=True)
                if result is None:
                    continue
                result["system"] = system
                data["runs"].append(result)
                save()
                overheads = [r["overhead_s"] for r in measured(data, result)]
                print(
                    f"  {system} K={k}: round overhead {statistics.median(overheads):.1f} s "
                    f"({min(overheads):.1f}-{max(overheads):.1f}), server peak RSS {result['server_peak_rss_MB']:.0f} MB, "
                    f"loopback {result['loopback_bytes_per_round'] / MB:.0f} MB/round",
                    flush=True,
                )
    return data


def measured(data: dict[str, Any], run: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's rounds after its warm-up (saved runs from before the warm-up existed have none)."""
    return list(run["rounds"][int(data.get("warmup", 0)) :])


def figures_of(data: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (system, K): medians and spreads of what the tables show."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    work = data["codec_work"]
    for run in data["runs"]:
        system, k = run["system"], int(run["k"])
        rounds = measured(data, run)
        row: dict[str, Any] = {
            "round_s": med([r["round_s"] for r in rounds]),
            "overhead_s": med([r["overhead_s"] for r in rounds]),
            "train_s": med([r["train_s"] for r in rounds]),
            "server_peak_rss_MB": run["server_peak_rss_MB"],
            "sites_peak_rss_MB": run["sites_peak_rss_MB"],
            "loopback_MB_per_round": run["loopback_bytes_per_round"] / MB,
            "version": run.get("version", ""),
            "server_top": run.get("server_top", []),
            "foreign_cpu_share": run.get("foreign_cpu_share"),
        }
        if system == "ours":
            row["wire_MB_per_round"] = med([(r["bytes_in"] + r["bytes_out"]) / MB for r in rounds])
            row["server_hwm_MB"] = run["server_hwm_MB"]
            row["open_to_published_s"] = med([r["open_to_published_s"] for r in rounds])
            row["aggregate_s"] = med([r["aggregate_s"] for r in rounds])
            row["encode_s"] = med([r["encode_s"] for r in rounds])
            # Saved runs from before issue 19 have no first byte: the site encoded whole, then pushed.
            firsts = [r["first_byte_s"] for r in rounds if "first_byte_s" in r]
            row["first_byte_s"] = med(firsts) if firsts else None
            row["push_s"] = med([r["push_s"] for r in rounds])
            row["compute_limit_s"] = compute_limit(work, k, int(data["cores"]))
        out[(system, k)] = row
    return out


def program(cmdline: str) -> str:
    """A short name for a process: its module (``-m x.y.z`` → ``z``) or its script's base name."""
    parts = cmdline.split()
    if "-m" in parts[:-1]:
        return parts[parts.index("-m") + 1].rsplit(".", 1)[-1]
    if len(parts) > 1 and parts[0].rsplit("/", 1)[-1].startswith("python"):
        return parts[1].rsplit("/", 1)[-1]
    return parts[0].rsplit("/", 1)[-1] if parts else "?"


def ours_per_round(row: dict[str, Any], k: int) -> str:
    """Ours at K = ``k``: where a round's time goes, in words."""
    text = (
        f"K = {k}: open → published {row['open_to_published_s'][0]:.1f} s, publication "
        f"{row['aggregate_s'][0]:.1f} s, a site's encode {row['encode_s'][0]:.1f} s"
    )
    if row.get("first_byte_s") is not None:
        text += f" (encode → first byte {row['first_byte_s'][0]:.2f} s)"
    return text


def _s(v: tuple[float, float, float], digits: int = 1) -> str:
    return f"{v[0]:.{digits}f} ({v[1]:.{digits}f}–{v[2]:.{digits}f})"


def render(data: dict[str, Any]) -> tuple[str, dict[str, object]]:
    """The markdown section and the JSON figures."""
    fig = figures_of(data)
    ks = sorted({k for _, k in fig})
    rounds = data["rounds"]
    warmup = int(data.get("warmup", 0))
    work = data["codec_work"]
    versions = {s: fig[(s, k)]["version"] for s, k in fig if s != "ours"}
    bench_json = DOCS / "benchmarks.json"
    existing = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    figures: dict[str, object] = {
        "peers_machine": data["machine"],
        "peers_rounds": rounds,
        "peers_warmup_rounds": warmup,
    }
    for s, v in versions.items():
        figures[f"peers_{s}_version"] = v

    def get(system: str, k: int) -> dict[str, Any] | None:
        return fig.get((system, k))

    lines = [
        "## Round overhead against Flower and NVIDIA FLARE (bench/compare_peers.py)",
        "",
        f"One run, one system at a time, on this machine ({data['machine']}; other work on it adds noise).",
        f"Every system federates the same GPT-2-small-sized fp32 state ({data['fp32_bytes'] / MB:.1f} MB, 124,439,808",
        f"parameters) between K sites on 127.0.0.1 for {warmup + rounds} rounds; every per-round figure is taken over",
        f"the last {rounds} (the first {warmup} of every run, ours and theirs, are its warm-up: processes connecting,",
        "buffers and files first allocated; our daemon writes over the files of dropped states and differences from",
        'its fourth round on). A site\'s local "training" adds a fixed 16 MiB buffer of Gaussian steps (std 1e-4) to',
        "every tensor (~0.1–0.5 s). Every program is its own process, started the same way (bench/procs.py: a",
        "subprocess in its own session, killed as a process group). Medians over the measured rounds (min–max).",
        "",
        "- **gradualdiff-fed**: `python -m common.cli serve --config FILE` and K site processes doing what the worker",
        "  does minus the model (client.transfer: fetch and apply the global difference; client.outgoing: encode and",
        "  push at once, each shard sent once written; exact codec both ways). gRPC (HTTP/2) with our chunked,",
        "  zstd-compressed safetensors deltas, wire revision 2 (shard specs with the data, BLAKE3 shard digests).",
        f"- **Flower** {versions.get('flower', '?')}, deployment mode: `flower-superlink --insecure`, K `flower-supernode",
        "  --insecure`, `flwr run` of the Flower App in bench/flower (Flower's own `FedAvg` strategy, no evaluation",
        "  round); ServerApp and ClientApps in the default `subprocess` isolation. Transport: Flower 1.41's default,",
        "  **protobuf messages over HTTP** (the SuperLink's FastAPI/uvicorn Fleet, Control and Runtime APIs on one",
        "  port; the ServerApp and each ClientApp reach the SuperLink/SuperNode over the same HTTP Runtime API).",
        "  The newest release, flwr 1.42.0, needs certifi ≥ 2026.10.19, which the package index here lacks.",
        f"- **NVIDIA FLARE** {versions.get('nvflare', '?')}, POC mode: `nvflare poc prepare -n K`, each kit's service",
        "  target patched from `server:8002` (server bound to 0.0.0.0) to 127.0.0.1 (the server then binds only",
        "  there), server and clients started with their kit's `startup/sub_start.sh --once`; the job is the built-in",
        "  `NumpyFedAvgRecipe` (in-time aggregation, full weights, client script in-process, mTLS as the kit sets",
        "  it, every other setting at its default). Its numpy recipe carries one array, so the model is the same",
        "  124,439,808 fp32 parameters as one flat array. Transport: its F3 cell network over the kit's `http`",
        "  scheme; arrays are streamed by reference in chunks.",
        "",
        "*Round*: ours, from every site holding global r−1 to every site holding global r (the broadcast, training,",
        "upload, aggregation and publication of one round); Flower, from the ServerApp's `configure_train` of round",
        'r to the end of its `aggregate_train`; NVFlare, from the server\'s "Round r started" to the next one (the',
        'last: "Finished FedAvg", or where a log lacks it the last round\'s "End persist model on server.", logged',
        "within a millisecond of it). Each covers one broadcast of the global model, training, one upload per site",
        "and the aggregation. *Overhead* = round − the longest local training of the round.",
        "*Compute limit*: the codec work of a round, measured one thread at a time on our shards, divided by the",
        f"{data['cores']} cores: K × zstd-1 compression (the encoder's parameters) at the sites ({work['compress_s']:.2f} s each) + K × (zstd",
        f"decompression {work['decompress_s']:.2f} s + fp32 weighted add {work['add_s']:.2f} s) at the aggregator +",
        "one compression of the global difference + K × (decompression + add) at the sites. (Byte shuffling,",
        "hashing, CRCs, gRPC and Python are not in it: they are the overhead the goal bounds.)",
        "",
        "### Round time and overhead (s)",
        "",
        "| K | ours round | ours overhead | compute limit | ours / limit | Flower round | Flower overhead | NVFlare round | NVFlare overhead | ours / Flower | ours / NVFlare |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        o, f, n = get("ours", k), get("flower", k), get("nvflare", k)
        cells = [str(k)]
        cells += [_s(o["round_s"]), _s(o["overhead_s"]), f"{o['compute_limit_s']:.1f}"] if o else ["—"] * 3
        cells.append(f"{o['overhead_s'][0] / o['compute_limit_s']:.2f}" if o else "—")
        cells += [_s(f["round_s"]), _s(f["overhead_s"])] if f else ["not run"] * 2
        cells += [_s(n["round_s"]), _s(n["overhead_s"])] if n else ["not run"] * 2
        cells.append(f"{o['overhead_s'][0] / f['overhead_s'][0]:.2f}" if o and f else "—")
        cells.append(f"{o['overhead_s'][0] / n['overhead_s'][0]:.2f}" if o and n else "—")
        lines.append("| " + " | ".join(cells) + " |")
        for system, row in (("ours", o), ("flower", f), ("nvflare", n)):
            if row is None:
                continue
            p = f"peers_{system}_k{k}_"
            figures |= {
                p + "round_s": round(row["round_s"][0], 2),
                p + "round_min_s": round(row["round_s"][1], 2),
                p + "round_max_s": round(row["round_s"][2], 2),
                p + "overhead_s": round(row["overhead_s"][0], 2),
                p + "overhead_min_s": round(row["overhead_s"][1], 2),
                p + "overhead_max_s": round(row["overhead_s"][2], 2),
                p + "train_s": round(row["train_s"][0], 3),
                p + "server_peak_rss_MB": round(row["server_peak_rss_MB"], 1),
                p + "sites_peak_rss_MB": round(row["sites_peak_rss_MB"], 1),
                p + "loopback_MB_per_round": round(row["loopback_MB_per_round"], 1),
            }
            if system == "ours":
                figures |= {
                    p + "compute_limit_s": round(row["compute_limit_s"], 2),
                    p + "overhead_over_compute_limit": round(
                        row["overhead_s"][0] / row["compute_limit_s"], 2
                    ),
                    p + "wire_MB_per_round": round(row["wire_MB_per_round"][0], 1),
                    p + "server_vmhwm_MB": round(row["server_hwm_MB"], 1),
                    p + "open_to_published_s": round(row["open_to_published_s"][0], 2),
                    p + "publish_s": round(row["aggregate_s"][0], 2),
                    p + "site_encode_s": round(row["encode_s"][0], 2),
                }
                if row["first_byte_s"] is not None:
                    figures[p + "site_encode_to_first_byte_s"] = round(row["first_byte_s"][0], 2)
    foreign = [
        f"{NAMES[s_]} K = {k_} {row_['foreign_cpu_share']:.0%}"
        for (s_, k_), row_ in sorted(fig.items(), key=lambda kv: (kv[0][1], SYSTEMS.index(kv[0][0])))
        if row_.get("foreign_cpu_share") is not None
    ]
    if foreign:
        lines += [
            "",
            "The machine is shared (other sessions run test suites on it). CPU used by processes other than the",
            "benchmark's during each run, as a share of both cores: " + ", ".join(foreign) + ".",
        ]
        for (s_, k_), row_ in fig.items():
            if row_.get("foreign_cpu_share") is not None:
                figures[f"peers_{s_}_k{k_}_foreign_cpu_share"] = round(row_["foreign_cpu_share"], 3)
    lines += [
        "",
        "Ours, per round (medians): "
        + "; ".join(ours_per_round(row, k) for k in ks if (row := get("ours", k)))
        + ". A site encodes on a thread while its push streams each shard once written (issue 19): *encode →",
        "first byte* is from the start of encoding to the first chunk handed to gRPC, one shard's encoding",
        "where the whole delta's (the encode time) went before.",
        "",
        "### Server-side peak RSS (MB) and bytes per round (MB)",
        "",
        "Server side: ours, the daemon; Flower, the SuperLink and everything under it (its SuperExec and the",
        "ServerApp process); NVFlare, the server and everything under it (the job's runner process). Summed VmRSS of",
        "the process tree, sampled every 100 ms. *Loopback*: growth of the `lo` interface's receive counter",
        "during the rounds ÷ rounds. It counts every hop on this machine, so Flower's ServerApp → SuperLink →",
        "SuperNode → ClientApp relays and NVFlare's client → job-process hops count too; *ours on the wire* is",
        "the daemon's own count of delta bytes in and out (what would cross a real network).",
        "",
        "| K | ours daemon | Flower server side | NVFlare server side | ours / Flower | ours / NVFlare | all sites: ours / Flower / NVFlare | ours on the wire | ours loopback | Flower loopback | NVFlare loopback |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        o, f, n = get("ours", k), get("flower", k), get("nvflare", k)

        def cell(row: dict[str, Any] | None, key: str) -> str:
            return f"{row[key]:.0f}" if row else "not run"

        lines.append(
            "| "
            + " | ".join(
                [
                    str(k),
                    cell(o, "server_peak_rss_MB"),
                    cell(f, "server_peak_rss_MB"),
                    cell(n, "server_peak_rss_MB"),
                    f"{o['server_peak_rss_MB'] / f['server_peak_rss_MB']:.2f}" if o and f else "—",
                    f"{o['server_peak_rss_MB'] / n['server_peak_rss_MB']:.2f}" if o and n else "—",
                    " / ".join(cell(r, "sites_peak_rss_MB") for r in (o, f, n)),
                    f"{o['wire_MB_per_round'][0]:.0f}" if o else "—",
                    cell(o, "loopback_MB_per_round"),
                    cell(f, "loopback_MB_per_round"),
                    cell(n, "loopback_MB_per_round"),
                ]
            )
            + " |"
        )
    tops = []
    top_k = max((k for s, k in fig if s != "ours"), default=0)
    for system in ("flower", "nvflare"):
        row = get(system, top_k)
        if row and row["server_top"]:
            parts = ", ".join(f"`{program(name)}` {mb:.0f}" for name, mb in row["server_top"][:3])
            tops.append(f"{NAMES[system]}: {parts}")
    if tops:
        lines += [
            "",
            f"Largest server-side processes at K = {top_k} (each one's own VmHWM, MB): "
            + "; ".join(tops)
            + ".",
        ]

    lines += goal_table(fig, ks, existing, figures)
    if data.get("notes"):
        lines += ["", *(f"Note: {n}" for n in data["notes"])]
    if data["failures"]:
        lines += ["", "Runs that failed in this run:"]
        lines += [
            f"- {NAMES[f['system']]} K = {f['k']}: `{f['error'].strip().splitlines()[-1][:300]}`"
            for f in data["failures"]
        ]
    if any(get("ours", k) and not get("flower", k) and not get("nvflare", k) for k in ks):
        lines += [
            "",
            "Flower and NVFlare run at K = 2 and 4 only: at K = 8 Flower needs ~4 min a round and its processes",
            "together ~14 GB of this machine's 24 GB, which puts the whole benchmark past an hour and near",
            "the memory limit. Ours runs at K = 2, 4, 8.",
        ]
    lines += ["", "![round overhead and server RSS](benchmarks-peers.png)"]
    return "\n".join(lines), figures


def plot(data: dict[str, Any], path: Path) -> bool:
    """Round overhead and server peak RSS per K and system, as a PNG; False without matplotlib."""
    try:  # a bench-only dependency (the Makefile's bench target installs it), imported by name
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return False
    fig_data = figures_of(data)
    ks = sorted({k for _, k in fig_data})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.26
    colors = {"ours": "#2a7ab0", "flower": "#e0a030", "nvflare": "#76b900"}
    for i, system in enumerate(SYSTEMS):
        xs = [j + (i - 1) * width for j, k in enumerate(ks) if (system, k) in fig_data]
        rows = [fig_data[(system, k)] for k in ks if (system, k) in fig_data]
        if not rows:
            continue
        over = [r["overhead_s"] for r in rows]
        axes[0].bar(
            xs,
            [o[0] for o in over],
            width,
            yerr=[[o[0] - o[1] for o in over], [o[2] - o[0] for o in over]],
            label=NAMES[system],
            color=colors[system],
            capsize=3,
        )
        axes[1].bar(
            xs,
            [r["server_peak_rss_MB"] / 1000 for r in rows],
            width,
            label=NAMES[system],
            color=colors[system],
        )
    limit_x = [j - width for j, k in enumerate(ks) if ("ours", k) in fig_data]  # over our bars
    limits = [fig_data[("ours", k)]["compute_limit_s"] for k in ks if ("ours", k) in fig_data]
    axes[0].plot(limit_x, limits, "k_", markersize=16, mew=2, label="compute limit (ours)")
    for ax, title, unit in (
        (axes[0], "Round overhead (round − local training)", "seconds per round"),
        (axes[1], "Server-side peak RSS", "GB"),
    ):
        ax.set_xticks(range(len(ks)), [f"K = {k}" for k in ks])
        ax.set_xlim(-0.6, len(ks) - 0.4)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"GPT-2-small-sized fp32 state, 127.0.0.1, {data['machine'].split(',')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="K for ours")
    parser.add_argument("--peer-ks", type=int, nargs="+", default=[2, 4], help="K for Flower and NVFlare")
    parser.add_argument("--rounds", type=int, default=3, help="rounds measured, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first and left out of the figures")
    parser.add_argument("--quick", action="store_true", help="K=2, 1 round, a 1/8-size model; writes no docs")
    parser.add_argument(
        "--max-foreign", type=float, default=0.2, help="rerun when others used more of the cores than this"
    )
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-nvflare", action="store_true")
    parser.add_argument("--render", type=Path, help="write the docs from a saved run instead of running")
    args = parser.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
    else:
        if args.quick:
            args.ks, args.peer_ks, args.rounds, args.warmup = [2], [2], 1, 0
        saved = OUT / ("peers-quick.json" if args.quick else "peers.json")
        data = run_all(args, saved)
        print(f"saved {saved}")
    markdown, figures = render(data)
    print(markdown)
    if not data.get("quick"):
        plot(data, DOCS / "benchmarks-peers.png")
        write_section("peers", markdown, figures)
        print("wrote docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks-peers.png")
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
