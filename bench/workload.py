"""Shared pieces of the benchmarks: the GPT-2-small-shaped delta, RSS probes, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from common.delta import PayloadLayout

DOCS = Path(__file__).resolve().parent.parent / "docs"
MB = 1e6


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124,439,808 parameters), HF naming."""
    d, ff, vocab, ctx = 768, 3072, 50257, 1024
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, d),
        "transformer.wpe.weight": (ctx, d),
    }
    for i in range(12):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,),
            p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d),
            p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d),
            p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, ff),
            p + "mlp.c_fc.bias": (ff,),
            p + "mlp.c_proj.weight": (ff, d),
            p + "mlp.c_proj.bias": (d,),
        }
    shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    return shapes


def realistic_delta(
    shapes: dict[str, tuple[int, ...]], *, seed: int = 0, weight_std: float = 0.02, step_std: float = 1e-4
) -> dict[str, torch.Tensor]:
    """``trained - global`` in fp32: weights of std 0.02 moved by small Gaussian steps.

    Computed as a real subtraction, so the delta carries the rounding pattern
    of fp32 weights (what makes it compress better than pure noise).
    """
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=gen) * weight_std
        delta[name] = (base + torch.randn(shape, generator=gen) * step_std) - base
    return delta


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Read from VmHWM, not getrusage: ru_maxrss survives fork+exec, so a child
    started by a big parent would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max."""
    return statistics.median(values), min(values), max(values)


def repeat(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall seconds of ``runs`` calls of ``fn``."""
    import time

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture: hosts change from day to day, and with them the limits."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine the numbers come from."""
    return (
        f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def write_section(name: str, markdown: str, figures: dict[str, object]) -> None:
    """Replace section ``name`` of docs/benchmarks.md and merge ``figures`` into docs/benchmarks.json."""
    DOCS.mkdir(exist_ok=True)
    doc = DOCS / "benchmarks.md"
    text = (
        doc.read_text() if doc.exists() else "# Benchmarks\n\nWritten by `make bench`; do not edit by hand.\n"
    )
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    data_path = DOCS / "benchmarks.json"
    data = json.loads(data_path.read_text()) if data_path.exists() else {}
    data.update(figures)
    data_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def encoded_payload(delta: dict[str, torch.Tensor]) -> tuple[bytes, PayloadLayout]:
    """``delta`` encoded with the exact codec (the default digest): the payload and its layout."""
    import tempfile

    from common.codec import encode
    from common.delta import Codec

    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "delta.payload"
        with payload.open("wb") as sink:
            layout = encode(delta, Codec(), sink)
        return payload.read_bytes(), layout


def encoded_frames(delta: dict[str, torch.Tensor]) -> tuple[list[tuple[memoryview, int]], int]:
    """``delta`` encoded with the exact codec: its zstd frames (compressed bytes, decoded size), and its wire bytes."""
    data, layout = encoded_payload(delta)
    return payload_frames(data, layout), layout.total_bytes


def payload_frames(data: bytes, layout: PayloadLayout) -> list[tuple[memoryview, int]]:
    """The zstd frames of an encoded payload: (compressed bytes, decoded size) each, in order."""
    from common.codec.layout import expected_frame_sizes

    frames = []
    offset = 0
    for shard in layout.shards:
        for size, raw in zip(shard.frame_bytes, expected_frame_sizes(shard, layout), strict=True):
            frames.append((memoryview(data)[offset : offset + size], raw))
            offset += size
    return frames
