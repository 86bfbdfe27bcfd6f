"""``gdfed work``: run a site's worker against an aggregator."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", required=True, help="host:port of the aggregator")
    parser.add_argument("--site", required=True, help="this site's id (as in the aggregator's token list)")
    parser.add_argument("--token-file", help="file holding this site's token (default: $GDFED_SITE_TOKEN)")
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model directory")
    parser.add_argument(
        "--data", type=Path, required=True, help="JSONL: {'text'} or {'prompt','response'} per line"
    )
    parser.add_argument(
        "--eval-data", type=Path, help="JSONL for the eval loss (default: hold out --eval-fraction)"
    )
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument(
        "--state-dir", type=Path, help="where to keep resumable state (default: ./gdfed-<site>)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="the LoRA rank this site can afford (FlexLoRA)"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="stop after this many rounds (0 = until the run ends)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default: one per core)"
    )
    parser.add_argument(
        "--max-wait-s",
        type=_seconds,
        default=600.0,
        help="how long each call waits for an aggregator that is away or restarting, from its first "
        "failure, before the worker gives up with exit code 1 (default: 600)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes (GPUs) this site trains on; > 1 starts them through torchrun (rank 0 talks "
        "to the aggregator); see docs/operator.md, 'A site on several GPUs'",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="with --nproc: shard full fine-tuning across the processes (FSDP2) instead of each "
        "holding the whole model (DDP); for models that do not fit one GPU",
    )
    parser.add_argument("--tls-ca", type=Path)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number of seconds > 0")
    return value


def run(args: argparse.Namespace) -> int:
    from client.worker import Worker
    from client.worker_config import WorkerConfig
    from common.channel import read_token
    from common.malloc import tune_malloc

    if args.threads:
        import torch

        # Several workers sharing a machine each want one thread: small ops slow down 5x oversubscribed.
        torch.set_num_threads(args.threads)

    if args.nproc < 1:
        print(f"gdfed work: --nproc {args.nproc} must be >= 1", file=sys.stderr)
        return 2
    from client.distributed import launched_by_torchrun

    ranked = launched_by_torchrun()
    if args.fsdp and args.nproc < 2 and not ranked:
        print("gdfed work: --fsdp shards the model across processes; give --nproc 2 or more", file=sys.stderr)
        return 2
    token = read_token(args.token_file, "GDFED_SITE_TOKEN")
    if not token:
        print("gdfed work: give --token-file or set GDFED_SITE_TOKEN", file=sys.stderr)
        return 2
    config = WorkerConfig(
        aggregator=args.aggregator,
        site_id=args.site,
        token=token,
        model=args.model,
        data=args.data,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        state_dir=args.state_dir or Path(f"gdfed-{args.site}"),
        device=args.device,
        lora_rank=args.lora_rank,
        max_rounds=args.rounds,
        quiet=args.quiet or not os.isatty(2),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        seed=args.seed,
        max_wait_s=args.max_wait_s,
    )
    tune_malloc()
    if ranked:
        from client.site_launch import run_rank

        return run_rank(config, fsdp=args.fsdp)
    if args.nproc > 1:
        return _launch(args)
    return Worker(config).run()


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command on N processes through torchrun."""
    from client.site_launch import argv_of, launch

    options = argparse.ArgumentParser()
    add_arguments(options)
    argv = argv_of(args, options, leave={"nproc"})
    argv += [f"--{flag}" for flag in ("verbose", "debug") if getattr(args, flag, False) is True]
    return launch(args.nproc, argv)
