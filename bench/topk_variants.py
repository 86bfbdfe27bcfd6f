"""Top-k with error feedback, which selection rule and which server step? An in-process ablation.

``make compare`` measured the product's top-1% codec with error feedback at
1.057 of the exact codec's eval loss (goal: 1.05). This asks what would
close the gap, before any of it touches the wire format or the worker. It
simulates the demo federation in one process (the demo's model, three
non-IID sites, the worker's own training step, FedAvg by sample count,
error feedback e ← e + Δ; c = top_k(e); e ← e − c, ALGORITHMS.md §4) and
varies the selection, at the same number of sent values:

- ``per-tensor``: each tensor's own top 1 % (what the worker sends; the
  product's ``compact_tensor``, bf16 values);
- ``global``: one threshold over the whole delta (Stich et al.'s top_k over
  the full vector), the same total count;
- ``small-dense``: per-tensor, with tensors of at most 4,096 elements (the
  norms) sent whole, as Deep Gradient Compression leaves small layers alone;
- ``per-row``: each row of a matrix its share of the tensor's 1 %;

and, with per-tensor selection, the rest of the loop:

- ``residual-start``: a site trains from global + e instead of the global
  model (as CSER-style local models do), so its difference no longer
  re-derives what it has not yet sent;
- ``-slrS``: the server's FedAvg step is S times the mean (FedOpt's server
  learning rate), for top-k and, as the control, for the exact codec.

Each seed changes the data order and the initialisation of nothing else.
Writes docs/topk-variants.md and prints the table.

    python -m bench.topk_variants [--seeds 0 1 2 3] [--rounds 10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from client.data import batches, read_jsonl, tokenize
from client.demo import SITES, DemoSettings, training_spec_of
from client.demo_init import demo_paths, init_demo
from client.model import load_model, load_trainable, trainable_state
from client.train import evaluate, train_steps
from common.codec.compact import compact_tensor
from common.delta import Cast, Codec, Lossy
from common.lossy import topk_count

DOCS = Path(__file__).resolve().parent.parent / "docs"
FRACTION = 0.01
CODEC = Codec(lossy=Lossy.TOPK, topk_fraction=FRACTION, cast=Cast.BF16)
State = dict[str, torch.Tensor]


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def per_tensor(c: State) -> State:
    return {name: compact_tensor(name, x, CODEC)[1] for name, x in c.items()}


def global_threshold(c: State) -> State:
    total = sum(topk_count(x.numel(), FRACTION) for x in c.values())
    threshold = torch.cat([x.reshape(-1).abs() for x in c.values()]).topk(total).values[-1]
    return {name: torch.where(x.abs() >= threshold, _bf16(x), torch.zeros_like(x)) for name, x in c.items()}


def small_dense(c: State, limit: int = 4096) -> State:
    return {
        name: _bf16(x) if x.numel() <= limit else compact_tensor(name, x, CODEC)[1] for name, x in c.items()
    }


def per_row(c: State) -> State:
    out = {}
    for name, x in c.items():
        if x.dim() < 2:
            out[name] = compact_tensor(name, x, CODEC)[1]
            continue
        rows = x.reshape(x.shape[0], -1)
        k = max(1, math.ceil(topk_count(x.numel(), FRACTION) / rows.shape[0]))
        index = rows.abs().topk(k, dim=1).indices
        sent = torch.zeros_like(rows).scatter_(1, index, _bf16(rows.gather(1, index)))
        out[name] = sent.reshape(x.shape)
    return out


@dataclass(frozen=True)
class Setup:
    """One row: how a site picks its 1 % (None: the exact codec), the server's FedAvg step, and
    whether a site trains from the global model (the product) or from global + its own residual."""

    select: Callable[[State], State] | None
    server_lr: float = 1.0
    start_from_residual: bool = False


RULES: dict[str, Setup] = {
    "exact": Setup(None),
    "per-tensor": Setup(per_tensor),
    "global": Setup(global_threshold),
    "small-dense": Setup(small_dense),
    "per-row": Setup(per_row),
    "residual-start": Setup(per_tensor, start_from_residual=True),
    "per-tensor-slr2": Setup(per_tensor, server_lr=2.0),
    "per-tensor-slr3": Setup(per_tensor, server_lr=3.0),
    "exact-slr1.5": Setup(None, server_lr=1.5),
    "exact-slr0.75": Setup(None, server_lr=0.75),
}


class Federation:
    """The demo federation in one process: one model object, the sites taking turns on it."""

    def __init__(self, root: Path, settings: DemoSettings) -> None:
        paths = demo_paths(root)
        self.spec = training_spec_of(settings)
        self.loaded = load_model(root / "model", self.spec, torch.device("cpu"))
        tokenizer = self.loaded.tokenizer
        self.data = {s: tokenize(read_jsonl(paths.sites[s]), tokenizer, self.spec.max_seq_len) for s in SITES}
        self.eval = tokenize(read_jsonl(paths.eval), tokenizer, self.spec.max_seq_len)
        total = sum(len(v) for v in self.data.values())
        self.weight = {s: len(self.data[s]) / total for s in SITES}
        self.initial = {k: v.detach().clone() for k, v in trainable_state(self.loaded).items()}

    def run(self, setup: Setup, rounds: int, seed: int) -> tuple[list[float], int]:
        """Eval loss after each round, and the values sent up in all."""
        model = {k: v.clone() for k, v in self.initial.items()}
        residual = {s: {k: torch.zeros_like(v) for k, v in model.items()} for s in SITES}
        losses, sent_values = [], 0
        for number in range(1, rounds + 1):
            step = {k: torch.zeros_like(v) for k, v in model.items()}
            for i, site in enumerate(SITES):
                torch.manual_seed(seed * 7919 + 1000 * number + i)
                # From global + e, the site's training sees what it has not yet sent, so its
                # difference no longer re-derives it; e + Δ is then simply after - global.
                start = (
                    {k: model[k] + residual[site][k] for k in model} if setup.start_from_residual else model
                )
                load_trainable(self.loaded, start)
                pad = self.loaded.tokenizer.pad_token_id
                data = batches(
                    self.data[site], self.spec.batch_size, pad, seed=seed * 7919 + i * 100_003 + number
                )
                train_steps(self.loaded, data, steps=self.spec.local_steps, lr=self.spec.learning_rate)
                after = trainable_state(self.loaded)
                delta = {k: after[k].float() - model[k] for k in model}
                if setup.select is None:
                    sent = delta
                else:
                    compensated = (
                        delta
                        if setup.start_from_residual
                        else {k: delta[k] + residual[site][k] for k in delta}
                    )
                    sent = setup.select(compensated)
                    residual[site] = {k: compensated[k] - sent[k] for k in delta}
                    sent_values += sum(int(torch.count_nonzero(v)) for v in sent.values())
                for k in step:
                    step[k] += self.weight[site] * sent[k]
            model = {k: model[k] + setup.server_lr * step[k] for k in model}
            load_trainable(self.loaded, model)
            losses.append(evaluate(self.loaded, self.eval, 64))
        return losses, sent_values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument(
        "--dir", type=Path, default=None, help="demo folder to reuse (default: a fresh temp one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "demo"
        if not (root / "model").exists():
            init_demo(root)
        federation = Federation(root, DemoSettings(rounds=args.rounds))
        finals: dict[str, list[float]] = {}
        sent: dict[str, int] = {}
        for rule in ["exact", *[r for r in args.rules if r != "exact"]]:
            for seed in args.seeds:
                losses, count = federation.run(RULES[rule], args.rounds, seed)
                finals.setdefault(rule, []).append(losses[-1])
                sent[rule] = count
                print(f"{rule:12s} seed {seed}: final eval loss {losses[-1]:.4f}", flush=True)
    lines = [
        "# Top-k with error feedback: selection rules and server steps compared (in process)",
        "",
        "Written by `python -m bench.topk_variants`; see its docstring. The demo task simulated in one",
        f"process: {args.rounds} rounds of {federation.spec.local_steps} local steps, three sites, FedAvg, error",
        "feedback; the rows differ in which 1 % of e + Δ each site sends, where a site starts training, and",
        "the server's step (see the docstring). Ratio: final eval loss over",
        f"the exact codec's with the same seed, median (min–max) over seeds {', '.join(map(str, args.seeds))}.",
        "",
        "| rule | final eval loss (median) | vs exact | values sent up |",
        "|---|---|---|---|",
    ]
    for rule, values in finals.items():
        ratios = [v / e for v, e in zip(values, finals["exact"], strict=True)]
        ratio = f"{statistics.median(ratios):.4f} ({min(ratios):.4f}–{max(ratios):.4f})"
        shown = f"{sent[rule]:,}" if RULES[rule].select is not None else "all (dense)"
        lines.append(f"| {rule} | {statistics.median(values):.4f} | {ratio} | {shown} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (DOCS / "topk-variants.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
