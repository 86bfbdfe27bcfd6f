"""One site on two processes (torchrun, gloo, the CPU) against a real aggregator on 127.0.0.1."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.cli import add_arguments
from client.distributed import group_from_env, launched_by_torchrun
from client.export import state_file_of_round
from client.fsdp import check_spec
from client.site_launch import argv_of
from common.cli import main as cli_main
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import admin_pb2
from common.spec import Method, Phase, TrainingSpec, TrainMode
from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
from tests.scripted import AdminClient, Aggregator, token_of, wait_for

# Full fine-tuning: every rank holds the whole trainable state (DDP). No dropout anywhere, so
# the only randomness is the data order, which both sides draw from the same seed.
SPEC = TrainingSpec(local_steps=3, batch_size=8, learning_rate=1e-3, max_seq_len=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("demo"))


def _work_command(target: str, site: str, demo: Path, tmp: Path, nproc: int) -> list[str]:
    token_file = tmp / f"{site}.token"
    token_file.write_text(token_of(site))
    return [
        sys.executable, "-m", "common.cli", "work", "--aggregator", target, "--site", site,
        "--token-file", str(token_file), "--model", str(demo / "model"),
        "--data", str(demo / "data" / f"{site}.jsonl"), "--state-dir", str(tmp / site),
        "--quiet", "--nproc", str(nproc),
    ]  # fmt: skip


def _published(config_state_dir: Path, number: int) -> dict[str, torch.Tensor]:
    path, _ = state_file_of_round(config_state_dir, number)
    return load_file(str(path))


def _one_round_on_ranks(tmp: Path, demo: Path, *flags: str) -> tuple[Path, str]:
    """One round of site-a on two processes (``gdfed work --nproc 2 FLAGS``): the aggregator's state
    directory and the processes' log."""
    tmp.mkdir()
    config = demo_config(tmp, demo, ["site-a"], SPEC, rounds=1)
    with Aggregator(config) as agg:
        log = tmp / "work.log"
        with (
            log.open("wb") as out,
            _site([*_work_command(agg.target, "site-a", demo, tmp, 2), *flags], out) as proc,
        ):
            proc.wait(timeout=300)
        assert proc.returncode == 0, log.read_text()[-3000:]
        with AdminClient(agg.target) as admin:
            assert admin.status().finished
            assert [p.site_id for p in admin.round(1).participants if p.accepted] == ["site-a"]
    return config.state_dir, log.read_text()


@pytest.mark.slow
def test_two_ranks_give_the_delta_of_one_process_with_half_batches(tmp_path: Path, demo: Path) -> None:
    # Two ranks, each half of every global batch of 8 in one pass, gradients averaged: the
    # arithmetic of one process taking the batch as two micro-batches of 4. Both as DDP (each rank
    # the whole model) and as FSDP (each rank half of every tensor, scattered and gathered).
    (tmp_path / "one").mkdir()
    one = demo_config(tmp_path / "one", demo, ["site-a"], replace(SPEC, micro_batch_size=4), rounds=1)
    with Aggregator(one) as agg:
        assert run_workers([demo_worker(agg.target, "site-a", demo, tmp_path / "one")]) == [0]
    start, by_one = _published(one.state_dir, 0), _published(one.state_dir, 1)
    moved = max(float((by_one[n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-4, "the round trained"
    for mode, flags in (("ddp", ()), ("fsdp", ("--fsdp",))):
        state_dir, log = _one_round_on_ranks(tmp_path / mode, demo, *flags)
        assert ("[rank 1] model loaded on cpu (sharded)" in log) == (mode == "fsdp"), log[-3000:]
        assert all(torch.equal(t, start[n]) for n, t in _published(state_dir, 0).items())
        by_two = _published(state_dir, 1)
        assert by_two.keys() == start.keys()
        # Bound: 1e-6 of the largest update. DDP does the same additions in the same order as one
        # process (halving is exact: (a + b)/2 = a/2 + b/2), and here agrees to the bit; the margin
        # is for a BLAS whose summation order follows the thread count (torchrun gives each rank one
        # thread) in the last bits. A wrong split, a missed reduction or a shard put back in the
        # wrong rows moves weights by the update's own size.
        worst = max(float((by_two[n] - by_one[n]).abs().max()) for n in start)
        assert worst <= 1e-6 * moved, (
            f"{mode}: two ranks moved {worst:.3g} off one process (update {moved:.3g})"
        )


@pytest.mark.slow
def test_ranks_abort_a_round_together_and_a_dying_rank_stops_the_site(tmp_path: Path, demo: Path) -> None:
    spec = replace(SPEC, local_steps=100_000)  # still training when the round closes, or a rank dies
    config = demo_config(tmp_path, demo, ["site-a"], spec, rounds=2, missed_beats=200)
    with Aggregator(config) as agg, AdminClient(agg.target) as admin:

        def site() -> admin_pb2.SiteStatus:
            return admin.sites()["site-a"]

        def training() -> bool:
            return "site-a" in admin.sites() and site().phase == int(Phase.TRAINING) and site().step >= 2

        log = tmp_path / "site-a.log"
        with (
            log.open("wb") as out,
            _site(_work_command(agg.target, "site-a", demo, tmp_path, 2), out) as proc,
        ):
            wait_for(training, timeout=180, what="the two ranks training round 1")
            assert site().training.ranks == 2, "rank 0's heartbeats count the ranks"
            # Closing round 1 aborts its training (the heartbeat's directive): both ranks stop at
            # the same step, or round 2 would never get past the first collective.
            assert admin.stub.CloseRound(admin_pb2.ControlRequest(), metadata=admin.metadata, timeout=10).ok
            wait_for(lambda: "training aborted" in site().last_problem, timeout=60, what="round 1 aborted")
            wait_for(training, timeout=60, what="the two ranks training round 2")
            os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
            code = proc.wait(timeout=60)  # torchrun notices in 0.5 s; rank 0 then stops
        text = log.read_text()
        assert code == 1, text[-3000:]
        assert "gdfed work: the site's 2 processes stopped" in text
        assert "gdfed work: rank 0 of site site-a:" in text, text[-3000:]
        # Rank 0's last heartbeat said why the site left.
        wait_for(lambda: "another rank" in site().last_problem, timeout=10, what="rank 0's last word")


@contextlib.contextmanager
def _site(command: list[str], out: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` in a process group of its own, stopped with torchrun and its ranks if left running.

    torchrun puts each rank in a session of its own: SIGTERM (to gdfed and torchrun) makes torchrun
    stop them; SIGKILL would leave them running.
    """
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _rank_pid(root: int, rank: int) -> int:
    """The process under ``root`` whose environment says RANK=``rank`` (a torchrun worker)."""
    found: list[int] = []

    def walk(pid: int) -> None:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return
        for child in map(int, children):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                found.append(child)
            walk(child)

    walk(root)
    assert len(found) == 1, f"ranks {rank} found under {root}: {found}"
    return found[0]


# Run by torchrun on two gloo ranks: the collectives on their own, with shapes the demo model lacks.
RANK_CHECKS = """
import torch
from client import distributed, fsdp
from client.model import LoadedModel

g = distributed.group_from_env("cpu")
distributed.start(g)
# DDP: each rank's gradient is its rank + 1, in two dtypes, a bucket limit that splits them; the
# mean is 1.5 everywhere, and a parameter without a gradient keeps none.
ps = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
      [(3, torch.float32), (5, torch.float64), (7, torch.float32), (2, torch.float32)]]
for p in ps[:3]:
    p.grad = torch.full_like(p, g.rank + 1.0)
distributed.reduce_gradients(ps, world=2, bucket_bytes=16)
assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in ps[:3]), [p.grad for p in ps]
assert ps[3].grad is None
# FSDP: 5, 3 and 1 rows over two ranks (3+2, 2+1, 1+0): scattered from rank 0, gathered back.
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))
names = [n for n, _ in model.named_parameters()]
fsdp.shard_model(LoadedModel(model, None, names, torch.device("cpu")), g)
shards = dict(model.named_parameters())
assert shards["2.bias"].to_local().shape[0] == (1 if g.rank == 0 else 0)
new = {n: torch.randn(tuple(p.shape)) for n, p in shards.items()}  # the same seed on both ranks
for n in names:
    fsdp.scatter_into(g, shards[n], new[n] if g.leader else None)
for n in names:
    assert torch.equal(shards[n].full_tensor(), new[n]), n
    back = fsdp.gather_to_leader(g, shards[n])
    assert torch.equal(back, new[n]) if g.leader else back is None, n
distributed.stop()
# A file per rank: two processes printing to one pipe may interleave their lines.
__import__("pathlib").Path(__file__).with_name(f"ok-{g.rank}").write_text("ok")
"""


@pytest.mark.slow
def test_gradients_average_and_shards_travel_whole(tmp_path: Path) -> None:
    script = tmp_path / "rank_checks.py"
    script.write_text(RANK_CHECKS)
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == ["ok-0", "ok-1"]


def test_fsdp_refuses_what_it_does_not_shard() -> None:
    check_spec(SPEC)  # full fine-tuning
    with pytest.raises(InvalidArgument, match="drop --fsdp") as lora:
        check_spec(replace(SPEC, mode=TrainMode.LORA))
    assert lora.value.field == "training.mode"
    with pytest.raises(InvalidArgument, match="fedcybgd") as cybgd:
        check_spec(replace(SPEC, method=Method.FEDCYBGD))
    assert cybgd.value.field == "training.method"


def test_the_ranks_get_the_same_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    command = [
        "--aggregator", "h:1", "--site", "s", "--model", "m", "--data", "d.jsonl", "--nproc", "4",
        "--fsdp", "--quiet", "--max-wait-s", "30", "--lora-rank", "8", "--state-dir", "st",
    ]  # fmt: skip
    given = parser.parse_args(command)
    again = parser.parse_args(argv_of(given, parser, leave={"nproc"}))
    assert vars(again) == vars(given) | {"nproc": 1}


def test_fsdp_needs_several_processes(capsys: pytest.CaptureFixture[str]) -> None:
    command = ["work", "--aggregator", "h:1", "--site", "s", "--model", "m", "--data", "d", "--fsdp"]
    assert cli_main(command) == 2
    assert "--fsdp shards the model across processes; give --nproc 2 or more" in capsys.readouterr().err
    assert cli_main([*command[:-1], "--nproc", "0"]) == 2
    assert "--nproc 0 must be >= 1" in capsys.readouterr().err


def test_a_rank_reads_its_place_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    assert launched_by_torchrun()
    group = group_from_env("cpu")
    assert (group.rank, group.world, group.leader, group.device.type, group.backend) == (
        1,
        2,
        False,
        "cpu",
        "gloo",
    )
    with pytest.raises(InvalidArgument, match="CUDA_VISIBLE_DEVICES") as numbered:
        group_from_env("cuda:1")
    assert numbered.value.field == "device"
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InvalidArgument, match="RANK = 2 must be below WORLD_SIZE = 2"):
        group_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun()  # one process: the plain worker
