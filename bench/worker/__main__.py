"""``python -m bench.worker [--gpu] [--quick]``: what a worker costs in memory, written to docs/worker.md.

Without ``--gpu`` (the CPU host): the accounting of a LoRA site (bench model
and 8B extrapolation), CPU peak RSS and step time per mode, and the host side
of a full fine-tune before and after issue 17 (bench.worker.host_side). With
``--gpu``: the ~1B model's CUDA figures; refused without CUDA. Each run
replaces its own sections of docs/worker.md and its own ``worker_*`` keys of
docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.worker import host_side
from bench.worker.models import ALL_LINEAR, ATTENTION, BENCH, GPU_1B, LLAMA3_8B, adapter_gb, save_base
from bench.worker.sites import in_child
from bench.workload import machine

DOCS = Path(__file__).resolve().parents[2] / "docs"


def write(section: str, markdown: str, figures: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    """Replace ``section`` of docs/worker.md (between its markers) and merge ``figures`` into benchmarks.json.

    ``drop``: keys of figures this section no longer measures, removed from benchmarks.json.
    """
    doc = DOCS / "worker.md"
    text = doc.read_text()
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    path = DOCS / "benchmarks.json"
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(figures)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def accounting(footprints: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """The bench model's measured footprints per mode, bytes per parameter, the 8B extrapolation."""
    fp32, bf16, nf4 = footprints["fp32"], footprints["bf16"], footprints["nf4"]
    n, emb = BENCH.params, BENCH.embedding_params + BENCH.norm_params
    # NF4 quantizes the projections only; embeddings, head and norms stay bf16 (2 bytes each).
    per_linear = (nf4 * 1e6 - 2 * emb) / BENCH.linear_params
    big = LLAMA3_8B
    big_base = (per_linear * big.linear_params + 2 * (big.embedding_params + big.norm_params)) / 1e9
    rows = []
    for targets, label in ((ALL_LINEAR, "all linear"), (ATTENTION, "q,k,v,o")):
        rows.append(
            (
                label,
                BENCH.adapter_params(targets),
                adapter_gb(BENCH, targets),
                big.adapter_params(targets),
                adapter_gb(big, targets),
            )
        )
    site_8b = big_base + rows[0][4]
    lines = [
        f"Bench model {BENCH.name}: hidden {BENCH.hidden}, {BENCH.layers} layers, vocab {BENCH.vocab}, "
        f"{n / 1e6:.1f}M parameters ({BENCH.linear_params / 1e6:.1f}M in projections, "
        f"{emb / 1e6:.1f}M in embeddings, head and norms). `get_memory_footprint`:",
        "",
        "| base | MB | bytes / base parameter | vs fp32 |",
        "|---|---:|---:|---:|",
        f"| fp32 | {fp32:.0f} | {fp32 * 1e6 / n:.2f} | 1.00 |",
        f"| bf16 | {bf16:.0f} | {bf16 * 1e6 / n:.2f} | {bf16 / fp32:.3f} |",
        f"| NF4, double quantization | {nf4:.0f} | {nf4 * 1e6 / n:.2f} | {nf4 / fp32:.3f} |",
        "",
        f"NF4 per quantized projection parameter: ({nf4:.1f} MB − 2 B × {emb / 1e6:.1f}M bf16 parameters) / "
        f"{BENCH.linear_params / 1e6:.1f}M = **{per_linear:.3f} B** (4 bits, plus the 8-bit block scales "
        "of double quantization).",
        "",
        "LoRA r=16 adapters, each parameter with its fp32 master, gradient and AdamW's two moments "
        "(16 B; 0 B for the frozen base's gradients and optimizer state):",
        "",
        "| targets | bench params | bench GB | 8B params | 8B GB |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r[0]} | {r[1] / 1e6:.2f}M | {r[2]:.3f} | {r[3] / 1e6:.1f}M | {r[4]:.3f} |" for r in rows],
        "",
        f"**8B extrapolation** ({big.name}: hidden {big.hidden}, {big.layers} layers, {big.heads} heads, "
        f"{big.kv_heads} KV heads, intermediate {big.intermediate}, vocab {big.vocab}, untied head):",
        "",
        f"- projections: {big.layers} × (2·{big.hidden}² + 2·{big.hidden}·{big.kv_dim} + 3·{big.hidden}·{big.intermediate}) "
        f"= {big.linear_params / 1e9:.3f}B × {per_linear:.3f} B = {per_linear * big.linear_params / 1e9:.2f} GB (NF4)",
        f"- embeddings + head + norms: (2·{big.vocab}·{big.hidden} + {big.norm_params}) = "
        f"{(big.embedding_params + big.norm_params) / 1e9:.3f}B × 2 B = {2 * (big.embedding_params + big.norm_params) / 1e9:.2f} GB (bf16)",
        f"- base: **{big_base:.2f} GB** (fp32 would be {4 * big.params / 1e9:.1f} GB, bf16 {2 * big.params / 1e9:.1f} GB)",
        f"- adapters (all linear, r=16) + gradients + AdamW: {rows[0][3] / 1e6:.1f}M × 16 B = {rows[0][4]:.2f} GB",
        f"- **site total: {site_8b:.2f} GB** (goal ≤ 7 GB); activations come on top and depend on batch, "
        "sequence and checkpointing.",
    ]
    figures = {
        "worker_fp32_footprint_MB": round(fp32, 1),
        "worker_bf16_footprint_MB": round(bf16, 1),
        "worker_nf4_footprint_MB": round(nf4, 1),
        "worker_nf4_footprint_ratio_vs_fp32": round(nf4 / fp32, 4),
        "worker_nf4_bytes_per_projection_param": round(per_linear, 4),
        "worker_8b_nf4_base_gb": round(big_base, 3),
        "worker_8b_nf4_lora_gb": round(site_8b, 3),
        "worker_8b_lora_all_linear_adapter_state_gb": round(rows[0][4], 3),
    }
    return "\n".join(lines), figures


def cpu_table(results: list[dict[str, Any]], batch: int, seq: int) -> tuple[str, dict[str, Any]]:
    lines = [
        f"{machine()}; batch {batch} × {seq} tokens, LoRA r=16 on all projections, AdamW; step time the "
        "median after the first. For reference only: on the CPU, RSS does not show what a GPU holds "
        "(lazy safetensors loading hides the base, bitsandbytes' CPU path materialises full-width "
        "copies, checkpointing changes little).",
        "",
        "| base | checkpointing | peak RSS MB | step s |",
        "|---|---|---:|---:|",
    ]
    figures: dict[str, Any] = {}
    for r in results:
        ck = "on" if r["checkpointing"] else "off"
        lines.append(f"| {r['mode']} | {ck} | {r['peak_rss_mb']:.0f} | {r['step_s']:.2f} |")
        key = f"worker_cpu_{r['mode']}_ckpt_{ck}"
        figures[key + "_peak_rss_MB"] = round(r["peak_rss_mb"], 1)
        figures[key + "_step_s"] = round(r["step_s"], 3)
    return "\n".join(lines), figures


def host_table(results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    copy = results["lean"]["copy_mb"]
    phases = list(results["lean"]["peaks_mb"])
    lines = [
        f"GPT-2 small (124M, full fine-tune), one fp32 copy of the trainable state = {copy:.0f} MB. "
        "Peak RSS above the baseline (model loaded and touched), per phase, MB (× one copy):",
        "",
        "| phase | before (old) | after (lean) |",
        "|---|---:|---:|",
    ]
    for ph in phases:
        old, lean = results["old"]["peaks_mb"][ph], results["lean"]["peaks_mb"][ph]
        lines.append(f"| {ph} | {old:.0f} ({old / copy:.2f}×) | {lean:.0f} ({lean / copy:.2f}×) |")
    worst_old = max(results["old"]["peaks_mb"].values()) / copy
    worst = max(results["lean"]["peaks_mb"].values()) / copy
    same = results["old"]["upload_digest"] == results["lean"]["upload_digest"]
    same_state = results["old"]["state_after_fetch_sha256"] == results["lean"]["state_after_fetch_sha256"]
    lines += [
        "",
        f"Worst phase: **{worst:.2f}×** one copy after (goal ≤ 1.25×), {worst_old:.2f}× before. "
        f"Upload payloads identical before and after: {'yes' if same else 'NO'} (payload digest); "
        f"states after the fetch identical: {'yes' if same_state else 'NO'}.",
        "*encode+upload*: before, the payload encoded whole to its file, then pushed; after, encoded on a thread",
        "while the push streams each shard once written (issue 19); the push reads the payload back from its",
        "file a chunk at a time, so the worker never holds the encoded payload whole.",
    ]
    figures = {
        "worker_full_ft_rss_ratio": round(worst, 3),
        "worker_full_ft_rss_ratio_before": round(worst_old, 3),
        "worker_full_ft_copy_MB": round(copy, 1),
        **{
            f"worker_full_ft_{ph.replace('+', '_')}_MB": round(results["lean"]["peaks_mb"][ph], 1)
            for ph in phases
        },
    }
    return "\n".join(lines), figures


def gpu(batch: int, seq: int, steps: int) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench.worker --gpu: no CUDA device here; run it on a machine with a GPU")
    with tempfile.TemporaryDirectory(prefix="bench-worker-gpu-") as tmp:
        save_base(GPU_1B, Path(tmp))
        results = [
            in_child(Path(tmp), m, ck, "cuda", batch, seq, steps)
            for m in ("fp32", "bf16", "nf4")
            for ck in (False, True)
        ]
    lines = [
        f"{results[0].get('device', 'GPU')}, {GPU_1B.name} (hidden {GPU_1B.hidden}, {GPU_1B.layers} layers), "
        f"batch {batch} × {seq}, LoRA r=16 on all projections, bf16 autocast. MFU counts 4N FLOPs a token "
        "(frozen base: forward and input gradients) against the dense bf16 peak.",
        "",
        "| base | checkpointing | max allocated MB | tokens/s | MFU |",
        "|---|---|---:|---:|---:|",
    ]
    figures: dict[str, Any] = {}
    for r in results:
        ck = "on" if r["checkpointing"] else "off"
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "n/a"
        lines.append(
            f"| {r['mode']} | {ck} | {r['max_allocated_mb']:.0f} | {r['tokens_per_s']:.0f} | {mfu} |"
        )
        key = f"worker_gpu_{r['mode']}_ckpt_{ck}"
        figures[key + "_max_allocated_MB"] = round(r["max_allocated_mb"], 1)
        figures[key + "_tokens_per_s"] = round(r["tokens_per_s"], 1)
    fp32 = next(r for r in results if r["mode"] == "fp32" and not r["checkpointing"])["max_allocated_mb"]
    nf4 = next(r for r in results if r["mode"] == "nf4" and r["checkpointing"])["max_allocated_mb"]
    figures["worker_gpu_nf4_ckpt_ratio_vs_fp32"] = round(nf4 / fp32, 4)
    lines += ["", f"NF4 + checkpointing / fp32 peak: **{nf4 / fp32:.3f}** (goal ≤ 0.25)."]
    write("gpu", "\n".join(lines), figures)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="the CUDA section only (refused without CUDA)")
    parser.add_argument("--quick", action="store_true", help="the accounting and the host side only")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.gpu:
        gpu(max(args.batch, 8), max(args.seq, 512), max(args.steps, 5))
        return
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        save_base(BENCH, Path(tmp))
        modes = ("fp32", "bf16", "nf4")
        checks = (False,) if args.quick else (False, True)
        runs = [
            in_child(Path(tmp), m, ck, "cpu", args.batch, args.seq, args.steps)
            for m in modes
            for ck in checks
        ]
    text, figures = accounting({r["mode"]: r["footprint_mb"] for r in runs if not r["checkpointing"]})
    write("accounting", text, figures)
    text, figures = cpu_table(runs, args.batch, args.seq)
    write("cpu", text, figures)
    text, figures = host_table(host_side.run())
    # Issue 19 pipelines encode and upload: one phase now, measured as one.
    write("host", text, figures, drop=("worker_full_ft_encode_MB", "worker_full_ft_upload_MB"))
    print("wrote docs/worker.md and docs/benchmarks.json")


if __name__ == "__main__":
    main()
