"""The ``--lora-*`` flags of ``gdfed init-state``, with ``LoraSpec``'s defaults (``gdfed export`` reads the run's).

A flag left out is left out of the ``LoraSpec`` too, so the defaults live in
``common.spec`` alone. (``common.spec`` is imported only when the flags are
read: it pulls in torch, which building the parser must not.)
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.spec import LoraSpec


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-rank", type=int, help="LoRA rank (default: LoraSpec's)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: LoraSpec's)")
    parser.add_argument("--lora-targets", nargs="*", help="modules LoRA adapts (default: LoraSpec's)")


def lora_spec(args: argparse.Namespace) -> LoraSpec:
    """The ``LoraSpec`` the flags ask for; each flag not given keeps its default."""
    from common.spec import LoraSpec

    given: dict[str, Any] = {"rank": args.lora_rank, "alpha": args.lora_alpha}
    if args.lora_targets is not None:
        given["target_modules"] = tuple(args.lora_targets)
    return LoraSpec(**{key: value for key, value in given.items() if value is not None})
