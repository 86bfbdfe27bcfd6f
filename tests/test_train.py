"""Local training: FedProx pulls local weights towards the round's start; the spec carries mu over the wire."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.data import batches, read_jsonl, tokenize
from client.demo_init import init_demo
from client.model import load_model, load_trainable, trainable_state
from client.train import train_steps
from common.pb.gradualdiff.v1 import federation_pb2
from common.serde import training_spec_from_proto
from common.spec import TrainingSpec


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    init_demo(root, examples_per_site=60, eval_examples=30, pretrain_steps=0)
    return root


def test_fedprox_keeps_the_local_model_near_the_round_start(demo: Path) -> None:
    torch.set_num_threads(1)
    spec = TrainingSpec(batch_size=8, max_seq_len=32, learning_rate=3e-3)
    loaded = load_model(demo / "model", spec, torch.device("cpu"))
    examples = tokenize(read_jsonl(demo / "data" / "site-a.jsonl"), loaded.tokenizer, 32)
    start = trainable_state(loaded)

    def drift(mu: float) -> float:
        load_trainable(loaded, start)
        data = batches(examples, 8, loaded.tokenizer.pad_token_id, seed=1)
        train_steps(loaded, data, steps=12, lr=3e-3, prox_mu=mu)
        after = trainable_state(loaded)
        squares = sum(float(((after[k] - start[k]) ** 2).sum()) for k in start)
        return float(squares**0.5)

    plain, proximal = drift(0.0), drift(1000.0)
    assert plain > 0
    assert proximal < 0.5 * plain, (plain, proximal)


def test_prox_mu_travels_in_the_training_spec() -> None:
    msg = federation_pb2.TrainingSpec(prox_mu=0.25, local_steps=3)
    spec = training_spec_from_proto(msg)
    assert spec.prox_mu == 0.25 and spec.local_steps == 3
    assert training_spec_from_proto(federation_pb2.TrainingSpec()).prox_mu == 0.0
