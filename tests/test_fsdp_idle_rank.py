"""FSDP: a rank whose share of a step has no loss tokens still takes part in the step's reduction.

FSDP reduces gradients inside backward; a rank that skipped backward left the other waiting in the
collective for good. Two gloo ranks on the CPU, a batch whose second half (rank 1's) is all prompt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from client import distributed, fsdp
from client.data import IGNORE, Batch
from client.model import LoadedModel
from client.train import train_steps

g = distributed.group_from_env("cpu")
distributed.start(g)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
model = LlamaForCausalLM(config)
names = [n for n, _ in model.named_parameters()]
loaded = fsdp.shard_model(LoadedModel(model, None, names, torch.device("cpu")), g)
ids = torch.randint(0, 32, (2, 8))
labels = ids.clone()
labels[1] = IGNORE  # rank 1's row: nothing to learn from
batch = Batch(ids, torch.ones_like(ids), labels)
before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
result = train_steps(loaded, iter([batch, batch]), steps=2, lr=1e-2, shard=(g.rank, g.world))
moved = sum(int(not torch.equal(before[n], p.full_tensor())) for n, p in model.named_parameters())
assert moved > 0, "no parameter moved: rank 0's gradient was lost"
distributed.stop()
# A file per rank: two processes printing to one pipe may interleave their lines.
__import__("pathlib").Path(__file__).with_name(f"ok-{g.rank}").write_text(str(result.steps))
"""


@pytest.mark.slow
def test_a_rank_without_loss_tokens_does_not_leave_the_other_waiting(tmp_path: Path) -> None:
    script = tmp_path / "idle_rank.py"
    script.write_text(SCRIPT)
    root = Path(__file__).parent.parent
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the ranks hung in the step's gradient reduction") from exc
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name: p.read_text() for p in tmp_path.glob("ok-*")} == {"ok-0": "2", "ok-1": "2"}
