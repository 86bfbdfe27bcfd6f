"""FedCyBGD against exact full fine-tuning, in one process, on the demo model.

The rows ``make compare`` adds for FedCyBGD's own regime (issue 22): the
demo's data split IID over N sites, N ≥ L blocks, at equal total optimizer
steps. A real federation per row would need N worker processes on two cores;
these rows run the client's own training code (``client.train.train_round``,
``client.optimizer_state``) and the server's own schedule
(``server.methods.CyBgdPlan``) in one process, and stand in for the gRPC
round trip with what FedAvg at server lr 1 publishes: the mean difference
(one uploader in the cyclic modes, so the block becomes what the site trained).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from client import optimizer_state
from client.data import batches, read_jsonl, tokenize
from client.model import LoadedModel, load_model, load_trainable, trainable_state
from client.train import difference, evaluate, train_round
from common.delta import TensorSpec
from common.dtypes import DType
from common.spec import Method, TrainingSpec, TrainMode
from server.methods import CyBgdPlan


@dataclass(frozen=True, slots=True)
class SimRow:
    name: str
    note: str
    method: str  # "exact" (FedAvg of full fine-tuning) or "fedcybgd"
    split: str = "iid"  # "iid": the union shuffled into N equal shards; "sites": the demo's non-IID files
    n_sites: int = 4
    mode: str = "ascending"
    travel: bool = False
    download_fraction: float = 1.0


LAYERS = r"^model\.layers\."


def rows() -> list[SimRow]:
    return [
        SimRow("iid4-exact", "exact full fine-tuning (FedAvg), 4 IID sites", "exact"),
        SimRow(
            "iid4-cybgd-asc",
            "FedCyBGD ascending, 4 IID sites over 4 blocks, fresh AdamW per turn",
            "fedcybgd",
        ),
        SimRow(
            "iid4-cybgd-asc-travel",
            "FedCyBGD ascending, 4 IID sites, AdamW state travelling with each block",
            "fedcybgd",
            travel=True,
        ),
        SimRow(
            "iid4-cybgd-asc-dl50",
            "FedCyBGD ascending, 4 IID sites, own block and half of the others downloaded",
            "fedcybgd",
            download_fraction=0.5,
        ),
        SimRow(
            "iid8-cybgd-asc-travel",
            "FedCyBGD ascending, 8 IID sites (each block twice a cycle, as the authors' 64/32), travelling",
            "fedcybgd",
            n_sites=8,
            travel=True,
        ),
        SimRow(
            "niid3-cybgd-asc-travel",
            "FedCyBGD ascending, the demo's 3 non-IID sites over 4 blocks (N < L: the block cycle), travelling",
            "fedcybgd",
            split="sites",
            n_sites=3,
            travel=True,
        ),
        SimRow(
            "niid3-cybgd-asc-dl50",
            "the same with a fresh AdamW per turn, own block and half of the others downloaded",
            "fedcybgd",
            split="sites",
            n_sites=3,
            download_fraction=0.5,
        ),
    ]


# Every row runs rounds × SITES_PER_ROUND × local_steps optimizer steps: exact's rounds of 4 sites.
SITES_PER_ROUND = 4


def shards(root: Path, row: SimRow, seed: int) -> list[list[dict[str, Any]]]:
    """Each site's records: IID equal contiguous shards of the shuffled union (the authors' split),
    or the demo's non-IID site files."""
    if row.split == "sites":
        return [read_jsonl(root / "data" / f"site-{c}.jsonl") for c in "abc"[: row.n_sites]]
    union = read_jsonl(root / "data" / "all.jsonl")
    random.Random(seed).shuffle(union)
    size = len(union) // row.n_sites
    return [union[i * size : (i + 1) * size] for i in range(row.n_sites)]


class Simulation:
    """One row: the global trainable state, advanced turn by turn (FedCyBGD) or round by round (exact)."""

    def __init__(
        self, root: Path, row: SimRow, *, local_steps: int, lr: float, batch_size: int, seed: int
    ) -> None:
        torch.manual_seed(seed)
        full = row.method == "exact"
        self.row = row
        self.spec = TrainingSpec(
            method=Method.GRADUALDIFF if full else Method.FEDCYBGD,
            mode=TrainMode.FULL if full else TrainMode.SUBSET,
            trainable_patterns=() if full else (LAYERS,),
            local_steps=local_steps,
            batch_size=batch_size,
            learning_rate=lr,
            max_seq_len=64,
            seed=seed,
        )
        self.loaded: LoadedModel = load_model(root / "model", self.spec, torch.device("cpu"))
        tok = self.loaded.tokenizer
        self.sites = [tokenize(s, tok, self.spec.max_seq_len) for s in shards(root, row, seed)]
        self.eval = tokenize(read_jsonl(root / "data" / "eval.jsonl"), tok, self.spec.max_seq_len)
        self.state = trainable_state(self.loaded)
        self.base = {n: t.clone() for n, t in self.state.items()}
        self.plan: CyBgdPlan | None = None
        if not full:
            manifest = [TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in self.state.items()]
            names = [f"site-{i}" for i in range(row.n_sites)]
            plan = CyBgdPlan(
                self.spec,
                manifest,
                names,
                mode=row.mode,
                travel=row.travel,
                download_fraction=row.download_fraction,
            )
            full_manifest = plan.initial_manifest()
            # The plan the aggregator runs is built over the published state, optimizer tensors included.
            self.plan = CyBgdPlan(
                self.spec,
                full_manifest,
                names,
                mode=row.mode,
                travel=row.travel,
                download_fraction=row.download_fraction,
            )
            for t in full_manifest:
                self.state.setdefault(t.name, torch.zeros(t.shape))

    def loss(self) -> float:
        load_trainable(self.loaded, self.state)
        return evaluate(self.loaded, self.eval, 64)

    def _train(
        self, site: int, number: int, start: dict[str, torch.Tensor], names: list[str]
    ) -> dict[str, torch.Tensor]:
        """What a worker's round does: train from ``start`` and return the difference (client.worker._round)."""
        params, carried = optimizer_state.split(names)
        optimizer_state.fill_missing(start, carried, self.loaded)
        load_trainable(self.loaded, start)
        data = batches(
            self.sites[site],
            self.spec.batch_size,
            self.loaded.tokenizer.pad_token_id,
            seed=site * 100_003 + number,
        )
        trained = train_round(self.loaded, self.spec, data, start, params, carried, [])
        return difference(trained.state, start, names, own=set(self.loaded.trainable))

    def round(self, number: int) -> None:
        """Aggregator round ``number`` (1-based): every site (exact), or the turn's site(s) (FedCyBGD)."""
        if self.plan is None:
            members, names = list(range(self.row.n_sites)), list(self.loaded.trainable)
        else:
            _, _, ids = self.plan.turn(number)
            members = [int(s.split("-")[1]) for s in ids]
            names = []
        deltas = []
        for site in members:
            start = {n: t.clone() for n, t in self.state.items()}
            if self.plan is not None:
                a = self.plan.assignment(number, f"site-{site}")
                names = list(a.tensors)
                if a.download_blocks:
                    # The worker trains against the base model's values outside the blocks it fetched.
                    fetched = a.download_blocks
                    for n in start:
                        if "#" not in n and not any(n.startswith(b) for b in fetched):
                            start[n] = self.base[n].clone()
            deltas.append(self._train(site, number, start, names))
        for n in deltas[0]:
            self.state[n] += sum(d[n] for d in deltas) / len(deltas)


def simulate(
    root: Path,
    row: SimRow,
    *,
    turns: int,
    local_steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run ``turns`` aggregator rounds' worth of optimizer steps; the eval loss after each round.

    Equal total optimizer steps: exact full fine-tuning trains N sites per round, so it runs
    ``turns // N`` rounds against FedCyBGD's ``turns`` one-site turns.
    """
    sim = Simulation(root, row, local_steps=local_steps, lr=lr, batch_size=batch_size, seed=seed)
    rounds = turns // row.n_sites if row.method == "exact" else turns
    initial = sim.loss()
    losses = []
    for number in range(1, rounds + 1):
        sim.round(number)
        losses.append(sim.loss())
        progress(f"{row.name} round {number}/{rounds}: eval {losses[-1]:.4f}")
    steps = rounds * local_steps * (row.n_sites if row.method == "exact" else 1)
    return {
        "name": row.name,
        "note": row.note,
        "initial_eval_loss": initial,
        "eval_loss": losses,
        "final_eval_loss": losses[-1],
        "optimizer_steps": steps,
        "steps_per_point": local_steps * (row.n_sites if row.method == "exact" else 1),
    }


def select(names: Sequence[str]) -> list[SimRow]:
    chosen = [r for r in rows() if not names or r.name in names]
    unknown = set(names) - {r.name for r in rows()}
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; known: {[r.name for r in rows()]}")
    return [replace(r) for r in chosen]


def run_rows(
    root: Path,
    names: Sequence[str],
    *,
    rounds: int,
    local_steps: int,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The selected rows, each at ``rounds`` × SITES_PER_ROUND × ``local_steps`` optimizer steps."""
    torch.set_num_threads(1)  # the CPU is shared; one thread gives steadier timings than two contending
    out = []
    for row in select(names):
        out.append(
            simulate(root, row, turns=rounds * SITES_PER_ROUND, local_steps=local_steps, progress=progress)
        )
        out[-1]["n_sites"] = row.n_sites
        progress(f"{row.name}: final {out[-1]['final_eval_loss']:.4f}")
    return {"rows": out, "rounds": rounds, "local_steps": local_steps}


def markdown(regime: dict[str, Any]) -> list[str]:
    """The rows' table against exact full fine-tuning and the untrained model, for docs/methods.md."""
    rows_ = regime["rows"]
    by = {r["name"]: r for r in rows_}
    exact = by.get("iid4-exact")
    lines = [
        "| row | optimizer steps | final eval loss | / exact (iid4) | / untrained | best turn | worst of last 4 turns |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_:
        ratio = f"{r['final_eval_loss'] / exact['final_eval_loss']:.4f}" if exact else "-"
        lines.append(
            f"| {r['name']} | {r['optimizer_steps']} | {r['final_eval_loss']:.4f} | {ratio} "
            f"| {r['final_eval_loss'] / r['initial_eval_loss']:.4f} | {min(r['eval_loss']):.4f} "
            f"| {max(r['eval_loss'][-4:]):.4f} |"
        )
    lines += ["", f"Untrained model: {rows_[0]['initial_eval_loss']:.4f}." if rows_ else ""]
    lines += ["", "What each row is:", ""] + [f"- **{r['name']}**: {r['note']}." for r in rows_]
    travel, exact_row = by.get("iid4-cybgd-asc-travel"), by.get("iid4-exact")
    lines += ["", "### Against the acceptance of issue 22", ""]
    if travel and exact_row:
        ratio = travel["final_eval_loss"] / exact_row["final_eval_loss"]
        lines.append(
            f"- FedCyBGD ascending, travelling state, vs exact full fine-tuning, IID, equal steps "
            f"(goal ≤ 1.05): **{ratio:.4f}**"
        )
    above = [
        r["name"]
        for r in rows_
        if ("cybgd" in r["name"] and (r["name"].startswith("iid") or "travel" in r["name"]))
        and r["final_eval_loss"] > r["initial_eval_loss"]
    ]
    lines.append(
        "- IID FedCyBGD rows and travelling-state rows that end above the untrained model: "
        f"**{', '.join(above) if above else 'none'}**"
    )
    return lines


def plot(regime: dict[str, Any], path: Path) -> bool:
    """Eval loss after every turn (FedCyBGD) or round (exact) against optimizer steps; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in regime["rows"]:
        xs = [(i + 1) * r["steps_per_point"] for i in range(len(r["eval_loss"]))]
        ax.plot(xs, r["eval_loss"], label=r["name"], marker="o" if "exact" in r["name"] else None, ms=3)
    if regime["rows"]:
        ax.axhline(regime["rows"][0]["initial_eval_loss"], color="k", ls="--", lw=1, label="untrained")
    ax.set_xlabel("optimizer steps (all sites)")
    ax.set_ylabel("eval loss after each turn / round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


DOC_HEAD = [
    "## FedCyBGD in its own regime",
    "",
    "The authors ran FedCyBGD on IID shards with more sites than blocks (64 clients over 32 layers).",
    "Here the demo's union of the three sites' data is shuffled and cut into N equal IID shards, and",
    "every row runs the same total optimizer steps (rounds × 4 × local steps): exact full fine-tuning",
    "(FedAvg of 4 sites, every parameter) against FedCyBGD (one site per turn, one decoder layer;",
    "embeddings, final norm and head stay frozen, as in the authors' pipeline). These rows run in one",
    "process (`python -m bench.compare --cybgd-regime`, bench/cybgd_sim.py): the client's own training",
    "code and the server's own schedule, with what FedAvg at server lr 1 publishes for one uploader (the",
    "block becomes what the site trained) standing in for the gRPC round trip. Eval loss is the global",
    "model's on the shared held-out set after every turn (FedCyBGD) or round (exact).",
    "",
]
DOC_TAIL = [
    "",
    "### Reading it",
    "",
    "- **Fewer sites than blocks (N < L).** In the cyclic modes the cycle then advances by blocks, not",
    "  by sites: a cycle is L turns, turn k trains block k (`ascending`), L−1−k (`descending`) or the",
    "  k-th of a fresh seeded permutation (`random`), and site (e·L + k) mod N takes it — each site",
    "  takes the next untrained block on its turn. Every block is trained once a cycle and the sites",
    "  rotate over the blocks. With N ≥ L the authors' table stands (site c trains block c mod L);",
    "  `agg` keeps the authors' groups. The three-site rows above (N = 3, L = 4) use the block cycle.",
    "- **Why `-travel` and `-dl50` ended above the untrained model (issue 22).** Not the travelling",
    "  optimizer itself: with one site cycling over every block it reproduces BAdam — one persistent",
    "  AdamW over all blocks, the inactive ones skipped — turn by turn, weights, both moments under",
    "  each parameter's own name and the per-block step count, within rtol 1e-5 / atol 1e-6",
    "  (tests/test_cybgd_reference.py). The cause was the schedule: with N = 3 < L = 4, the authors'",
    "  `ascending` table gave site c block c for the whole run (and block 3 to nobody), so on these",
    "  non-IID sites each block was fitted to one domain only. With a fresh AdamW per turn each turn",
    "  restarts small; with the state travelling, each block is one persistent AdamW on one domain",
    "  (250 steps at a constant lr 1e-3, no schedule — the authors' cosine decay travels with their",
    "  optimizer), and the blocks pull the shared model apart further every cycle; with half the",
    "  other blocks left at base values (`-dl50`) each block is also fitted to a model that is never",
    "  published. The same client code in process, old table, 30 turns of 25 steps (2026-12-06):",
    "  travel 2.31 (the federation: 2.37), dl50 1.94 (1.74), reset 1.28 (1.30). The same sites under",
    "  the block cycle, where every site trains every block in turn: travel 1.16, dl50 1.24; on IID",
    "  shards of three sites, travel 1.150 and reset 1.148.",
    "  With N ≥ L on non-IID sites the authors' table still ties a block to the sites c ≡ b (mod L);",
    "  travelling state there is the authors' setting only with IID shards.",
    "- **What `-dl50` saves.** A full sync fetches the differences of the turns since the site's last",
    "  one (N − 1 blocks under the block cycle); the compressed download fetches whole blocks, its own",
    "  and ceil(p·n) of the n blocks updated so far. With N = 3 sites over 4 blocks that is no fewer",
    "  bytes (the table above: 1.04× the full sync, against 0.71× under the authors' table, where",
    "  block 3 was never updated); it saves bytes only while 1 + p·(L − 1) < N − 1, with many more",
    "  sites than p·L (the authors' 64 sites over 32 layers: 17 blocks against 63 differences).",
    "- **Equal steps, not equal work.** A FedCyBGD step trains one layer of four and none of the",
    "  embeddings or head; exact full fine-tuning trains every parameter at every step.",
]
