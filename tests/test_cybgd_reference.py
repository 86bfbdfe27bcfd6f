"""FedCyBGD's travelling AdamW state against plain block-coordinate descent (BAdam).

With one site and the cycle over every block, FedCyBGD with ``optimizer_state = "travel"`` is
block-coordinate descent with a persistent optimizer: each turn trains one block, and the next
turn of the same block continues its AdamW (moments, step count, bias correction) as if the
optimizer had never left. The reference is one ``torch.optim.AdamW`` over every block parameter,
driven on the same batches; a parameter without a gradient in a step is skipped by AdamW, so its
moments and step count wait for the block's next turn, as BAdam's do.

The federated side runs the client's own code (``client.train.train_round``,
``client.optimizer_state``, ``client.train.difference``) and the server's own schedule and
manifest (``server.methods.CyBgdPlan``, ``with_optimizer_state``); the gRPC round trip is what
FedAvg at server lr 1 publishes for one uploader: global + (trained − start).

Tolerance: the weights and moments travel as fp32 differences, so every turn adds
start + (trained − start), which is trained up to one rounding per element; over the whole run
the two trajectories stay within rtol 1e-5, atol 1e-6 after every turn (float32: 1e-5 is ~80 ulps;
1e-6 absolute for entries near zero), four orders of magnitude below one AdamW step (lr 1e-2 on
every coordinate): a reset optimizer, a wrong step count or swapped moments are far outside it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from client import optimizer_state
from client.data import Batch
from client.model import LoadedModel, load_trainable, trainable_state, training_only
from client.train import difference, train_round
from common.delta import TensorSpec
from common.dtypes import DType
from common.spec import OPTIMIZER_MARK, Method, TrainingSpec, TrainMode
from server.methods import CyBgdPlan

LR = 1e-2
STEPS = 3  # local steps per turn
N_LAYERS = 3
CYCLES = 3
RTOL, ATOL = 1e-5, 1e-6


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)  # float32 by default


def _batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 32, (4, 8), generator=g)
        out.append(Batch(ids, torch.ones_like(ids), ids.clone()))
    return out


def _spec() -> TrainingSpec:
    return TrainingSpec(
        method=Method.FEDCYBGD,
        mode=TrainMode.SUBSET,
        trainable_patterns=(r"^model\.layers\.",),
        local_steps=STEPS,
        batch_size=4,
        learning_rate=LR,
        seed=0,
    )


def _loaded(model: LlamaForCausalLM) -> LoadedModel:
    trainable = [n for n, _ in model.named_parameters() if n.startswith("model.layers.")]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    return LoadedModel(model, None, trainable, torch.device("cpu"))


def _federated(data: list[Batch]) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """One site, travelling state: the global state after every turn of CYCLES cycles, and the blocks in turn order."""
    loaded = _loaded(_model())
    spec = _spec()
    weights = trainable_state(loaded)
    bare = CyBgdPlan(
        spec, [TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in weights.items()], ["s"], travel=True
    )
    plan = CyBgdPlan(spec, bare.initial_manifest(), ["s"], travel=True)
    state = weights | {
        t.name: torch.zeros(t.shape) for t in plan.initial_manifest() if OPTIMIZER_MARK in t.name
    }
    feed: Iterator[Batch] = iter(data)
    order, states = [], []
    for number in range(1, CYCLES * plan.turns_per_cycle + 1):
        assignment = plan.assignment(number, "s")
        order.append(assignment.block)
        names = list(assignment.tensors)
        params, carried = optimizer_state.split(names)
        start = {n: t.clone() for n, t in state.items()}
        optimizer_state.fill_missing(start, carried, loaded)
        load_trainable(loaded, start)
        trained = train_round(loaded, spec, feed, start, params, carried, [])
        delta = difference(trained.state, start, names, own=set(loaded.trainable))
        for n, d in delta.items():
            state[n] = state[n] + d
        states.append(dict(state))
    return states, order


def _reference(data: list[Batch], order: list[str]) -> list[dict[str, torch.Tensor]]:
    """BAdam: one AdamW over every block parameter for the whole run; each turn only its block has gradients.

    After every turn: each block parameter, its moments and its step count, under the names of the global state.
    """
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    blocks = [n for n in params if n.startswith("model.layers.")]
    optimizer = torch.optim.AdamW([params[n] for n in blocks], lr=LR, weight_decay=0.0)
    feed = iter(data)
    model.train()
    snapshots = []
    for block in order:
        active = [n for n in blocks if n.startswith(block)]
        for n in active:
            params[n].requires_grad_(True)
        for _ in range(STEPS):
            b = next(feed)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for n in active:
            params[n].requires_grad_(False)
        snap: dict[str, torch.Tensor] = {}
        for n in blocks:
            snap[n] = params[n].detach().clone()
            st = optimizer.state.get(params[n], {})
            if st:
                snap[n + OPTIMIZER_MARK + "exp_avg"] = st["exp_avg"].clone()
                snap[n + OPTIMIZER_MARK + "exp_avg_sq"] = st["exp_avg_sq"].clone()
                snap[n[: n.index(".", len("model.layers.")) + 1] + OPTIMIZER_MARK + "step"] = (
                    st["step"].reshape(1).clone()
                )
        snapshots.append(snap)
    return snapshots


@pytest.mark.slow
def test_one_site_travelling_adamw_is_block_coordinate_descent_with_one_persistent_adamw() -> None:
    data = _batches(N_LAYERS * CYCLES * STEPS)
    states, order = _federated(data)
    # One site over L blocks: the cycle still visits every block, in ascending order.
    assert order == [f"model.layers.{i}." for i in range(N_LAYERS)] * CYCLES
    reference = _reference(data, order)
    base = trainable_state(_loaded(_model()))
    for turn, (ours, theirs) in enumerate(zip(states, reference, strict=True)):
        # Turn by turn: the weights, and the moments of every block trained so far under its own
        # parameter's name (a block not yet trained has zero moments and step 0 on our side).
        for name, want in theirs.items():
            assert ours[name].shape == want.shape, (turn, name)
            torch.testing.assert_close(ours[name], want.to(torch.float32), rtol=RTOL, atol=ATOL)
        for i in range(N_LAYERS):
            # Bias correction is per block: its own count of steps, not the run's.
            block = f"model.layers.{i}."
            assert float(ours[block + OPTIMIZER_MARK + "step"]) == STEPS * order[: turn + 1].count(block)
    last = states[-1]
    assert all(not torch.equal(last[n], base[n]) for n in base if n.startswith("model.layers."))


@pytest.mark.slow
def test_reference_tells_a_reset_optimizer_apart() -> None:
    """The comparison above can fail: restarting AdamW every turn (optimizer_state = reset) is not BAdam."""
    data = _batches(N_LAYERS * CYCLES * STEPS)
    loaded = _loaded(_model())
    spec = _spec()
    weights = trainable_state(loaded)
    plan = CyBgdPlan(spec, [TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in weights.items()], ["s"])
    feed = iter(data)
    order = []
    for number in range(1, CYCLES * plan.turns_per_cycle + 1):
        a = plan.assignment(number, "s")
        order.append(a.block)
        load_trainable(loaded, weights)
        trained = train_round(loaded, spec, feed, weights, list(a.tensors), [], [])
        weights = {n: trained.state[n] for n in weights}
    last = _reference(data, order)[-1]
    gaps = [float((weights[n] - last[n]).abs().max()) for n in weights]
    assert max(gaps) > 1e-3


def test_moments_stay_with_their_parameters() -> None:
    """Names and shapes: each parameter gets back its own moments, never a neighbour's of the same shape."""
    loaded = _loaded(_model())
    weights = trainable_state(loaded)
    plan = CyBgdPlan(
        _spec(), [TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in weights.items()], ["s"], travel=True
    )
    carried = [
        t.name
        for t in plan.initial_manifest()
        if t.name.startswith("model.layers.1.") and OPTIMIZER_MARK in t.name
    ]
    start = dict(weights)
    for k, n in enumerate(c for c in carried if not c.endswith("step")):
        start[n] = torch.full(
            weights[n.rpartition(OPTIMIZER_MARK)[0]].shape, float(k + 1)
        )  # distinct per tensor
    start["model.layers.1." + OPTIMIZER_MARK + "step"] = torch.tensor([5.0])
    params = [n for n in loaded.trainable if n.startswith("model.layers.1.")]
    with training_only(loaded, params) as part:
        adamw = optimizer_state.restored_adamw(part, start, carried, LR)
        by_param = dict(part.model.named_parameters())
        for n in params:
            st = adamw.state[by_param[n]]
            assert float(st["step"]) == 5.0
            torch.testing.assert_close(st["exp_avg"], start[n + OPTIMIZER_MARK + "exp_avg"])
            torch.testing.assert_close(st["exp_avg_sq"], start[n + OPTIMIZER_MARK + "exp_avg_sq"])
        out = optimizer_state.optimizer_tensors(part, adamw, carried)
    assert list(out) == carried
    for n in carried:
        torch.testing.assert_close(out[n], start[n])


def test_moments_of_another_shape_are_refused() -> None:
    loaded = _loaded(_model())
    weights = trainable_state(loaded)
    name = "model.layers.0.self_attn.q_proj.weight"
    state = dict(weights)
    state[name + OPTIMIZER_MARK + "exp_avg"] = torch.zeros(3)
    state[name + OPTIMIZER_MARK + "exp_avg_sq"] = torch.zeros(3)
    state["model.layers.0." + OPTIMIZER_MARK + "step"] = torch.tensor([2.0])
    carried = [
        name + OPTIMIZER_MARK + "exp_avg",
        name + OPTIMIZER_MARK + "exp_avg_sq",
        "model.layers.0." + OPTIMIZER_MARK + "step",
    ]
    with training_only(loaded, [name]) as part, pytest.raises(ValueError, match="shape"):
        optimizer_state.restored_adamw(part, state, carried, LR)
