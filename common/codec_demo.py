"""``gdfed codec-demo``: the codec on a generated delta, end to end, with the numbers that matter.

Until the worker lands this is what ``make demo`` runs: it says so, builds a
transformer-shaped fp32 weight difference, sends it through every stage
(encode -> 1 MiB chunks -> stream decode) for each codec, checks the result,
and prints bytes on the wire against the raw fp32 size.
"""

from __future__ import annotations

import argparse
import io
import time

import torch

from common.codec import decode_chunks, encode, iter_chunks
from common.delta import Cast, Codec, DeltaHeader

CODECS = {"exact": Codec(), "exact, no shuffle": Codec(byte_shuffle=False), "bf16": Codec(cast=Cast.BF16)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the generated delta")
    parser.add_argument("--width", type=int, default=512, help="hidden size of the generated delta")
    parser.add_argument("--seed", type=int, default=0)


def generated_delta(layers: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    """A Llama-shaped weight difference: fp32 weights of std 0.02 moved by small Gaussian steps."""
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (8000, width)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (width, width)
        shapes[f"{p}mlp.gate_proj.weight"] = (4 * width, width)
        shapes[f"{p}mlp.up_proj.weight"] = (4 * width, width)
        shapes[f"{p}mlp.down_proj.weight"] = (width, 4 * width)
        shapes[f"{p}input_layernorm.weight"] = (width,)
    delta = {}
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=gen) * 0.02
        delta[name] = (base + torch.randn(shape, generator=gen) * 1e-4) - base
    return delta


def run(args: argparse.Namespace) -> int:
    print("gradualdiff-fed codec demo: the worker and aggregator are not built yet, so this runs the")
    print("delta codec alone on a generated weight difference (no model, no network).\n")
    delta = generated_delta(args.layers, args.width, args.seed)
    raw = sum(t.numel() * 4 for t in delta.values())
    print(f"delta: {len(delta)} tensors, {raw / 1e6:.1f} MB as fp32\n")
    print(
        f"{'codec':<20} {'pipeline':<22} {'wire MB':>8} {'/ fp32':>7} {'encode s':>9} {'decode s':>9}  check"
    )
    for label, codec in CODECS.items():
        sink = io.BytesIO()
        start = time.perf_counter()
        layout = encode(delta, codec, sink)
        encoded = time.perf_counter() - start
        header = DeltaHeader(
            spec=layout.spec, run_id="demo", round=1, site_id="demo", upload_id="u1", sample_count=1
        )
        start = time.perf_counter()
        _, decoded = decode_chunks(iter_chunks(header, layout, sink))
        decoded_s = time.perf_counter() - start
        if codec.cast is Cast.NONE:
            ok = all(torch.equal(delta[k], decoded[k]) for k in delta)
            check = "bit-exact" if ok else "MISMATCH"
        else:
            err = max(float((delta[k] - decoded[k]).abs().max()) for k in delta)
            ok = all(torch.equal(delta[k].bfloat16().float(), decoded[k]) for k in delta)
            check = f"bf16 rounding, max err {err:.1e}" if ok else "MISMATCH"
        ratio = layout.total_bytes / raw
        print(
            f"{label:<20} {codec.name:<22} {layout.total_bytes / 1e6:>8.1f} {ratio:>7.3f} "
            f"{encoded:>9.2f} {decoded_s:>9.2f}  {check}"
        )
        if not ok:
            return 1
    return 0
