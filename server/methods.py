"""What the run's method asks of each round: who trains, which tensors, at which LoRA rank.

The round state machine (server.rounds) and the aggregation rule
(server.aggregate) are the same for every method; a method only changes

- **who takes part**: every live site (GradualDiff-Fed, FlexLoRA), or the
  sites whose turn it is (FedCyBGD);
- **what a site trains and uploads**: the whole trainable state, one decoder
  block (FedCyBGD), or a rank-r_i slice of the LoRA state (FlexLoRA);
- **how uploads combine**: the streaming weighted mean, or FlexLoRA's SVD
  over the full-size ΔW (server.flexlora_round) at the close;
- **what the initial state holds**: FedCyBGD with a travelling optimizer
  adds the AdamW moments beside the weights.

The round machinery asks these through hooks (``assignment``,
``upload_manifest``, ``check_site``, ``next_state``, ``initial_manifest``),
never by the plan's class.

FedCyBGD (ALGORITHMS.md §3) trains sites one after another within a cycle;
here one aggregator round is one *turn*: the round's participants are the
site whose turn it is (cyclic modes) or the sites of one block (``agg``),
and a cycle is max(N, L) rounds for N sites and L blocks: with fewer sites
than blocks the cycle advances by blocks, so every block is trained once a
cycle (server.cybgd; ``agg``: one round per block that has sites). With
FedAvg at learning rate 1 and a single uploader, publishing the mean
difference sets the block to exactly what the site trained: the authors'
"latest writer wins".
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from common.delta import PayloadLayout, TensorSpec
from common.dtypes import DType
from common.errors import InvalidArgument
from common.lora import is_lora_a, is_lora_b, lora_pairs
from common.spec import OPTIMIZER_MARK, Method, TrainingSpec, TrainMode
from common.statefile import StateReader
from server import cybgd
from server.config import CyBgdOptimizerState, ServerConfig
from server.flexlora_round import FlexUpload
from server.flexlora_round import next_state as flexlora_next_state
from server.spool import Spool


@dataclass(frozen=True, slots=True)
class Assignment:
    """One site's part in one round."""

    trains: bool = True
    tensors: tuple[str, ...] = ()  # what the site trains and uploads; empty = the whole trainable state
    lora_rank: int = 0  # FlexLoRA: the rank the site trains (0 = not FlexLoRA)
    block: str = ""  # FedCyBGD: the block's name prefix
    download_blocks: tuple[str, ...] = ()  # FedCyBGD download compression: the blocks to fetch


@dataclass(frozen=True, slots=True)
class RoundUpload:
    """An accepted upload, as a plan that combines them at the close (``next_state``) sees it."""

    upload_id: str
    layout: PayloadLayout  # recorded at acceptance: where its shards lie in its spool
    sample_count: int
    declared_rank: int  # the LoRA rank the site declared when it joined (0: any)


class MethodPlan:
    """GradualDiff-Fed: every live site trains the whole trainable state every round."""

    streaming_fold = True  # uploads fold into the round's running sum as they arrive
    uniform_weights = False  # every upload counts 1 instead of its sample count

    def __init__(self, spec: TrainingSpec, manifest: Sequence[TensorSpec], sites: Sequence[str]) -> None:
        self.spec = spec
        self.manifest = tuple(manifest)
        self.sites = tuple(sorted(sites))

    def assignment(self, round_number: int, site_id: str, declared_rank: int = 0) -> Assignment:
        return Assignment()

    def upload_manifest(self, assignment: Assignment) -> tuple[TensorSpec, ...]:
        """What an upload under ``assignment`` must hold: names, fp32, shapes."""
        chosen = set(assignment.tensors)
        return tuple(
            TensorSpec(t.name, DType.F32, t.shape) for t in self.manifest if not chosen or t.name in chosen
        )

    def describe(self) -> str:
        return "gradualdiff: every site, the whole trainable state"

    def check_site(self, *, lora_rank: int) -> None:
        """Refuse a joining site whose declared capabilities this method cannot use."""

    def initial_manifest(self) -> tuple[TensorSpec, ...]:
        """What round 0's state holds: the trainable tensors, and whatever the method keeps beside them."""
        return self.manifest

    def next_state(
        self, previous: StateReader, uploads: Sequence[RoundUpload], spool: Spool
    ) -> dict[str, torch.Tensor]:
        """Methods that do not fold uploads as they stream in: the round's new trainable state."""
        raise NotImplementedError(f"{type(self).__name__} folds uploads as they stream in")


class FlexLoraPlan(MethodPlan):
    """FlexLoRA: site i trains a rank-r_i slice of the run's rank-R adapters; the close runs the SVD."""

    streaming_fold = False

    def __init__(self, spec: TrainingSpec, manifest: Sequence[TensorSpec], sites: Sequence[str]) -> None:
        super().__init__(spec, manifest, sites)
        if spec.mode is not TrainMode.LORA:
            raise ValueError("method flexlora needs mode = lora")
        self.max_rank = spec.lora.rank
        pairs = lora_pairs([t.name for t in manifest])
        if not pairs:
            raise ValueError("method flexlora: the initial state holds no lora_A/lora_B pairs")
        shapes = {t.name: t.shape for t in manifest}
        for a, b in pairs.values():
            if shapes[a][0] != self.max_rank or shapes[b][1] != self.max_rank:
                raise ValueError(
                    f"method flexlora: {a} has rank {shapes[a][0]} but training.lora.rank is {self.max_rank}; "
                    "write the initial state at the run's maximum rank"
                )

    def check_site(self, *, lora_rank: int) -> None:
        if lora_rank > self.max_rank:
            raise InvalidArgument(
                f"capabilities.lora_rank is {lora_rank}; this run's adapters have rank {self.max_rank} "
                "(training.lora.rank), the most a site may train",
                field="capabilities.lora_rank",
                limit=self.max_rank,
            )

    def next_state(
        self, previous: StateReader, uploads: Sequence[RoundUpload], spool: Spool
    ) -> dict[str, torch.Tensor]:
        """The SVD redistribution of the sample-weighted full-size ΔW (server.flexlora_round)."""
        flex = []
        for u in uploads:
            rank = self.rank_of(u.declared_rank)
            flex.append(
                FlexUpload(
                    upload_id=u.upload_id,
                    layout=u.layout,
                    rank=rank,
                    weight=float(u.sample_count),
                    manifest=self.upload_manifest(Assignment(lora_rank=rank)),
                )
            )
        return flexlora_next_state(previous, flex, spool, alpha=self.spec.lora.alpha)

    def rank_of(self, declared: int) -> int:
        return declared if 0 < declared <= self.max_rank else self.max_rank

    def assignment(self, round_number: int, site_id: str, declared_rank: int = 0) -> Assignment:
        return Assignment(lora_rank=self.rank_of(declared_rank))

    def upload_manifest(self, assignment: Assignment) -> tuple[TensorSpec, ...]:
        r = assignment.lora_rank or self.max_rank
        out = []
        for t in self.manifest:
            shape = t.shape
            if is_lora_a(t.name):
                shape = (r, *shape[1:])
            elif is_lora_b(t.name):
                shape = (shape[0], r, *shape[2:])
            out.append(TensorSpec(t.name, DType.F32, shape))
        return tuple(out)

    def describe(self) -> str:
        return f"flexlora: rank-r_i adapters (r_i <= {self.max_rank}), SVD redistribution"


class CyBgdPlan(MethodPlan):
    """FedCyBGD: per round, the site(s) whose turn it is train one decoder block.

    A cycle is N rounds with N ≥ L sites (the authors' table: site c trains block c mod L), and L
    rounds with N < L in the cyclic modes (the block cycle of server.cybgd: round k of a cycle
    trains the k-th block and the sites take the rounds in turn), so that every block is trained
    once a cycle whatever N.
    """

    def __init__(
        self,
        spec: TrainingSpec,
        manifest: Sequence[TensorSpec],
        sites: Sequence[str],
        *,
        mode: str = cybgd.CyBgdMode.ASCENDING,
        block_pattern: str = cybgd.DEFAULT_PREFIX_PATTERN,
        download_fraction: float = 1.0,
        travel: bool = False,
    ) -> None:
        """``mode`` is a CyBgdMode or its value (ValueError on another); ``download_fraction`` is in
        (0, 1], as server.config.CyBgdConfig checks when the configuration is built."""
        super().__init__(spec, manifest, sites)
        self.travel = travel  # the AdamW moments travel with the block (cybgd.optimizer_state = travel)
        # Parsed here too: a plan built without a configuration (tests, tools) fails now, not mid-run.
        self.mode = cybgd.CyBgdMode(mode)
        self.download_fraction = download_fraction
        if not self.sites:
            raise ValueError(
                "method fedcybgd needs the sites listed in the configuration (their order is the cycle)"
            )
        self.blocks = cybgd.find_blocks([t.name for t in manifest], block_pattern)
        if not self.blocks:
            raise ValueError(f"method fedcybgd: no tensor name matches the block pattern {block_pattern!r}")
        self.uniform_weights = self.mode is cybgd.CyBgdMode.AGG  # the authors' aggregate_params: a plain mean
        self._members = {
            b: tuple(t.name for t in manifest if cybgd.block_of(t.name, self.blocks) == b)
            for b in self.blocks
        }

    def initial_manifest(self) -> tuple[TensorSpec, ...]:
        if not self.travel or any(OPTIMIZER_MARK in t.name for t in self.manifest):
            return self.manifest
        return tuple(with_optimizer_state(self.manifest))

    @property
    def turns_per_cycle(self) -> int:
        return len(self._turns(0))

    def _turns(self, cycle: int) -> list[tuple[int, list[int]]]:
        """Cycle ``cycle``'s turns in order: (block index, the site indexes that train it)."""
        return _turns(self.mode, len(self.sites), len(self.blocks), cycle, self.spec.seed)

    def turn(self, round_number: int) -> tuple[int, int, list[str]]:
        """Round ``round_number`` (1-based) as (cycle, block index, the sites that train it)."""
        per = self.turns_per_cycle
        cycle, index = divmod(round_number - 1, per)
        block, members = self._turns(cycle)[index]
        return cycle, block, [self.sites[c] for c in members]

    def assignment(self, round_number: int, site_id: str, declared_rank: int = 0) -> Assignment:
        _, block, members = self.turn(round_number)
        if site_id not in members:
            return Assignment(trains=False)
        prefix = self.blocks[block]
        return Assignment(
            tensors=self._members[prefix],
            block=prefix,
            download_blocks=self._download(round_number, site_id, block),
        )

    def _download(self, round_number: int, site_id: str, own: int) -> tuple[str, ...]:
        """The site's own block (it must train from the latest copy, or its upload would not
        replace it [INFERRED: the authors' random subset may leave it out]) and a random
        ceil(p·n) of the n other blocks that earlier rounds trained."""
        if self.download_fraction >= 1:
            return ()
        updated = sorted({self.turn(n)[1] for n in range(1, round_number)} - {own})
        rng = random.Random(f"fedcybgd-download/{self.spec.seed}/{round_number}/{site_id}")
        chosen = cybgd.download_subset(updated, self.download_fraction, rng) if updated else []
        return tuple(self.blocks[b] for b in sorted({own, *chosen}))

    def describe(self) -> str:
        return (
            f"fedcybgd ({self.mode}): {len(self.blocks)} blocks, {len(self.sites)} sites, "
            f"{self.turns_per_cycle} round(s) per cycle"
        )


@lru_cache(maxsize=64)
def _turns(mode: str, n_sites: int, n_blocks: int, cycle: int, seed: int) -> list[tuple[int, list[int]]]:
    pairs = cybgd.schedule(mode, n_sites, n_blocks, cycle + 1, seed)[cycle]
    if mode != "agg":
        return [(b, [c]) for c, b in pairs]
    turns: list[tuple[int, list[int]]] = []
    for c, b in pairs:
        if turns and turns[-1][0] == b:
            turns[-1][1].append(c)
        else:
            turns.append((b, [c]))
    return turns


def with_optimizer_state(
    manifest: Sequence[TensorSpec], pattern: str = cybgd.DEFAULT_PREFIX_PATTERN
) -> list[TensorSpec]:
    """FedCyBGD with optimizer_state = "travel": the AdamW moments of every block parameter and one
    step count per block, as tensors beside the weights (zero at round 0)."""
    blocks = cybgd.find_blocks([t.name for t in manifest], pattern)
    out = list(manifest)
    for t in manifest:
        if cybgd.block_of(t.name, blocks) is not None:
            out.append(TensorSpec(f"{t.name}{OPTIMIZER_MARK}exp_avg", DType.F32, t.shape))
            out.append(TensorSpec(f"{t.name}{OPTIMIZER_MARK}exp_avg_sq", DType.F32, t.shape))
    out += [TensorSpec(f"{b}{OPTIMIZER_MARK}step", DType.F32, (1,)) for b in blocks]
    return out


def make_plan(
    spec: TrainingSpec,
    manifest: Sequence[TensorSpec],
    sites: Sequence[str],
    *,
    cybgd_mode: cybgd.CyBgdMode = cybgd.CyBgdMode.ASCENDING,
    download_fraction: float = 1.0,
    travel: bool = False,
) -> MethodPlan:
    """The plan for the run's method (ValueError names what the configuration lacks)."""
    if spec.method is Method.FLEXLORA:
        return FlexLoraPlan(spec, manifest, sites)
    if spec.method is Method.FEDCYBGD:
        return CyBgdPlan(
            spec, manifest, sites, mode=cybgd_mode, download_fraction=download_fraction, travel=travel
        )
    return MethodPlan(spec, manifest, sites)


def plan_of(config: ServerConfig, manifest: Sequence[TensorSpec]) -> MethodPlan:
    """The run's plan: its method, over ``manifest``, for the sites the configuration lists."""
    return make_plan(
        config.training,
        manifest,
        list(config.site_tokens),
        cybgd_mode=config.cybgd.mode,
        download_fraction=config.cybgd.download_fraction,
        travel=config.cybgd.optimizer_state is CyBgdOptimizerState.TRAVEL,
    )
