"""A site on several processes: ``gdfed work --nproc N`` starts torchrun, and each rank's start.

    gdfed work --nproc N ...                    (launch: this process waits for torchrun)
      └─ python -m torch.distributed.run --standalone --nproc-per-node N -m common.cli work ...
           ├─ rank 0      the worker (client.worker) with a ``Leader``: the aggregator's one contact
           └─ rank 1..N-1 client.rank_follower: rank 0's orders only

torchrun watches its processes: when one dies it stops the others (SIGTERM, then SIGKILL)
and exits 1 naming the rank that failed. A rank told to stop, or whose collective fails
because another died, exits 1 with one line saying so; rank 0 first sends the aggregator a
last heartbeat with that line, so ``gdfed status --site`` shows why the site left.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from dataclasses import replace
from types import FrameType

from client import distributed
from client.distributed import RankLost
from client.rank_follower import follow
from client.ranks import Leader
from client.worker import Worker
from client.worker_config import WorkerConfig

# How often torchrun looks at its processes: a rank that died is noticed within this (seconds).
MONITOR_INTERVAL_S = 0.5


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``gdfed work`` with ``argv`` (without ``--nproc``) on ``nproc`` processes; torchrun's exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), "--monitor-interval", str(MONITOR_INTERVAL_S),
        "-m", "common.cli", "work", *argv,
    ]  # fmt: skip
    proc = subprocess.Popen(command)
    # torchrun starts each rank in a session of its own and stops them when it is told to stop:
    # pass a SIGTERM sent to this process on (Ctrl-C reaches torchrun by the terminal).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # torchrun is stopping its ranks
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        print(
            f"gdfed work: the site's {nproc} processes stopped with exit code {code} "
            "(torchrun's report above names the rank that failed first)",
            file=sys.stderr,
            flush=True,
        )
    return code


def argv_of(args: argparse.Namespace, parser: argparse.ArgumentParser, *, leave: set[str]) -> list[str]:
    """The command line that gives ``args`` again under ``parser`` (its options), without ``leave``."""
    words: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in leave or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value is True:
                words.append(flag)
        elif type(action) is argparse._StoreAction and action.nargs is None:
            words += [flag, str(value)]
        else:
            raise ValueError(f"{flag}: only plain and on/off options can pass to the ranks")
    return words


def run_rank(config: WorkerConfig, *, fsdp: bool = False) -> int:
    """This process's part of the site (under torchrun): rank 0 the worker, the others follow it.

    ``fsdp``: full fine-tuning sharded across the ranks; rank 0's worker keeps its whole model on
    the host (the start and the trained state pass through it), the ranks train the shards.
    """
    group = distributed.group_from_env(config.device)
    host = "cpu" if fsdp else str(group.device)
    config = replace(config, device=host, quiet=config.quiet or not group.leader)
    distributed.start(group)
    signal.signal(signal.SIGTERM, _told_to_stop)
    try:
        if group.leader:
            leader = Leader(group, fsdp_model=config.model if fsdp else None)
            worker = Worker(config)
            worker.ranks = leader
            code = worker.run()
            leader.finish(f"the worker exited with code {code}")
        else:
            code = follow(config, group)
    except RankLost as exc:
        # One line, as gdfed's own errors; the process group is not torn down (a peer is gone).
        print(f"gdfed work: rank {group.rank} of site {config.site_id}: {exc}", file=sys.stderr, flush=True)
        return 1
    distributed.stop()
    return code


def _told_to_stop(signum: int, frame: FrameType | None) -> None:
    raise RankLost("torchrun stopped this rank: the site was told to stop, or another rank of it failed")
