"""The ``gdfed`` command: one entry point, a subcommand per job.

Each subcommand lives in the package that owns it and is imported only when
chosen, so ``gdfed status`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

# name -> (module, help). The module defines ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli", "run the aggregator daemon"),
    "status": ("server.admin_cli", "show the run, its rounds and sites (--watch to follow)"),
    "admin": ("server.admin_control", "steer a run: pause, resume, close-round, evict, policy"),
    "work": ("client.cli", "run a site's worker: train locally, send only what changed"),
    "init-state": (
        "client.init_state",
        "write the trainable state at round 0 from a model, for serve --init-state",
    ),
    "export": ("client.export", "write a published round as a Hugging Face model directory"),
    "demo": (
        "client.demo",
        "a whole federation on this machine: `gdfed demo init DIR`, `gdfed demo run DIR`",
    ),
    "codec-demo": ("common.codec_demo", "encode and decode a generated delta, and show what travels"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` given, only that subcommand's module is imported (its flags added)."""
    parser = argparse.ArgumentParser(prog="gdfed", description="Federated fine-tuning by weight differences.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if command is None or command == name:
            _load(module, "add_arguments")(sub_parser)
    return parser


def _load(module: str, attr: str) -> Callable[..., object]:
    fn: Callable[..., object] = getattr(importlib.import_module(module), attr)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    # Models are local paths, never hub names: keep transformers from reaching for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    words = list(sys.argv[1:] if argv is None else argv)
    # The subcommand is the first word that is not an option (the top level has only -v).
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code = _load(args._module, "run")(args)
    return int(code) if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
