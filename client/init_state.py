"""``gdfed init-state``: the trainable state at round 0, taken from a model, for ``gdfed serve --init-state``.

It selects the trainable tensors exactly as a worker will (same mode,
patterns, LoRA settings and seed), so the aggregator's manifest and the
sites' tensors agree by construction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from client.lora_flags import add_lora_arguments, lora_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model directory")
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--mode", choices=("full", "subset", "lora"), default="full")
    parser.add_argument("--patterns", nargs="*", default=[], help="regexes of trainable names (subset mode)")
    add_lora_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)


def write_init_state(model: Path, out: Path, spec: object) -> int:
    """Write the trainable tensors of ``model`` under ``spec`` to ``out``; return their count."""
    import torch
    from safetensors.torch import save_file

    from client.model import load_model, trainable_state
    from common.spec import TrainingSpec

    assert isinstance(spec, TrainingSpec)
    loaded = load_model(model, spec, torch.device("cpu"))
    state = trainable_state(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return len(state)


def run(args: argparse.Namespace) -> int:
    from common.spec import TrainingSpec, TrainMode

    spec = TrainingSpec(
        mode=TrainMode[args.mode.upper()],
        trainable_patterns=tuple(args.patterns),
        lora=lora_spec(args),
        seed=args.seed,
    )
    count = write_init_state(args.model, args.out, spec)
    from client.model import fingerprint

    print(f"wrote {count} trainable tensors to {args.out}")
    print(
        f"base model fingerprint (base_model_fingerprint in the aggregator's config): {fingerprint(args.model)}"
    )
    return 0
