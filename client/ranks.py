"""What rank 0 of a site does for its other ranks, and what it tells them.

The worker (client.worker) runs on rank 0 alone and calls its ``Ranks`` at two points:

    loading(spec)        after Join: the others load the same model with the run's spec
    train_round(...)     each round: the others get the round's instructions and start state,
                         every rank trains its part of each global batch, gradients averaged

``Solo`` is one process (nothing to tell anyone). ``Leader`` is rank 0 of several:

* DDP (LoRA, or a model that fits one device): every rank holds the whole trainable state,
  gradients are averaged each step (client.distributed), so the state trained on rank 0 is
  the site's and nothing needs gathering for the upload.
* FSDP (``--fsdp``, full fine-tuning): the ranks train a sharded copy (client.fsdp); the start
  state is scattered to it and the trained state gathered back, a tensor at a time, into the
  worker's whole model on rank 0's host.

When the worker is done, ``Leader.finish`` lets the others go. The followers' side is
client.rank_follower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from client import distributed, fsdp
from client.data import Batch, Example
from client.distributed import SiteGroup, TensorLayout
from client.model import LoadedModel
from client.train import RoundTraining, train_round
from common.errors import InvalidArgument
from common.spec import TrainingSpec


@dataclass(frozen=True, slots=True)
class LoadOrder:
    """Load the model as the run trains it, whole (DDP) or sharded (``fsdp``)."""

    spec: TrainingSpec
    fsdp: bool = False


@dataclass(frozen=True, slots=True)
class RoundOrder:
    """Train round ``number``: the data order's seed, what trains, and the start state's layout."""

    number: int
    spec: TrainingSpec
    seed: int
    params: tuple[str, ...]
    carried: tuple[str, ...]
    layout: tuple[TensorLayout, ...]


@dataclass(frozen=True, slots=True)
class StopOrder:
    """The worker is done (the run finished, or it gave up): leave."""

    reason: str


class Ranks(Protocol):
    """The worker's hooks for the site's other ranks."""

    def loading(self, spec: TrainingSpec) -> None:
        """The run's spec is known (Join): the other ranks may load the model."""

    def train_round(
        self,
        loaded: LoadedModel,
        spec: TrainingSpec,
        data: Iterator[Batch],
        start: Mapping[str, torch.Tensor],
        params: Sequence[str],
        carried: Sequence[str],
        held_out: Sequence[Example],
        *,
        number: int,
        seed: int,
        on_step: Callable[[int, float, int], None],
        should_stop: Callable[[], bool],
    ) -> RoundTraining:
        """``client.train.train_round`` on every rank; ``seed`` is the one ``data`` was ordered with."""
        ...


class Solo:
    """One process: the site trains alone."""

    def loading(self, spec: TrainingSpec) -> None:
        pass

    def train_round(
        self,
        loaded: LoadedModel,
        spec: TrainingSpec,
        data: Iterator[Batch],
        start: Mapping[str, torch.Tensor],
        params: Sequence[str],
        carried: Sequence[str],
        held_out: Sequence[Example],
        *,
        number: int,
        seed: int,
        on_step: Callable[[int, float, int], None],
        should_stop: Callable[[], bool],
    ) -> RoundTraining:
        return train_round(
            loaded,
            spec,
            data,
            start,
            params,
            carried,
            held_out,
            on_step=on_step,
            should_stop=should_stop,
            round_number=number,
        )


SOLO = Solo()


class Leader:
    """Rank 0 of a site on several processes: DDP, or FSDP with ``model_dir`` (full fine-tuning)."""

    def __init__(self, group: SiteGroup, *, fsdp_model: Path | None = None) -> None:
        if not group.leader:
            raise ValueError(f"rank {group.rank} is not the leader; rank 0 is")
        self.group = group
        self._fsdp_model = fsdp_model
        # FSDP: the sharded model the ranks train; the worker's own stays whole on the host,
        # holding the round's start and, after the gather, its trained values.
        self._sharded: LoadedModel | None = None

    def loading(self, spec: TrainingSpec) -> None:
        if self._fsdp_model is not None:
            try:
                fsdp.check_spec(spec)
            except InvalidArgument as exc:
                self.finish(str(exc))
                raise
        distributed.broadcast_object(self.group, LoadOrder(spec, fsdp=self._fsdp_model is not None))
        if self._fsdp_model is not None:
            self._sharded = fsdp.load_sharded(self._fsdp_model, spec, self.group)

    def train_round(
        self,
        loaded: LoadedModel,
        spec: TrainingSpec,
        data: Iterator[Batch],
        start: Mapping[str, torch.Tensor],
        params: Sequence[str],
        carried: Sequence[str],
        held_out: Sequence[Example],
        *,
        number: int,
        seed: int,
        on_step: Callable[[int, float, int], None],
        should_stop: Callable[[], bool],
    ) -> RoundTraining:
        g, sharded = self.group, self._sharded
        if sharded is None:
            # The model already holds ``start`` (the worker loaded it); the carried optimizer state
            # lives in ``start`` alone.
            model = dict(loaded.model.named_parameters())
            values = {name: model[name].detach() for name in loaded.trainable} | {
                n: start[n] for n in carried
            }
            layout = distributed.layout_of(values, [*loaded.trainable, *carried])
        else:
            layout = ()  # each rank knows its shards' shapes
        order = RoundOrder(number, spec, seed, tuple(params), tuple(carried), layout)
        distributed.broadcast_object(g, order)
        if sharded is None:
            for _ in distributed.broadcast_state(g, layout, values):
                pass
        else:
            shards = dict(sharded.model.named_parameters())
            for name in sharded.trainable:
                fsdp.scatter_into(g, shards[name], start[name])
        trained = train_round(
            loaded if sharded is None else sharded,
            spec,
            data,
            start,
            params,
            carried,
            held_out,
            on_step=on_step,
            # Every rank stops at the same step, or the others would wait in a collective forever.
            should_stop=lambda: distributed.agree(g, should_stop()),
            round_number=number,
            shard=(g.rank, g.world),
            # FSDP reduces (a mean over ranks) inside backward; DDP's is ours.
            reduce_gradients=distributed.gradient_reducer(g) if sharded is None else None,
        )
        if sharded is not None:
            # The trained state, gathered a tensor at a time into the worker's whole model, where
            # the worker reads the round's difference from.
            trained.state.clear()
            whole = dict(loaded.model.named_parameters())
            with torch.no_grad():
                for name in sharded.trainable:
                    full = fsdp.gather_to_leader(g, shards[name])
                    assert full is not None  # rank 0's
                    whole[name].copy_(full)
        # Each rank's loss is over its part of the batches: the site's is their mean.
        (loss,) = distributed.summed(g, [trained.result.mean_loss])
        return replace(trained, result=replace(trained.result, mean_loss=loss / g.world))

    def finish(self, reason: str) -> None:
        """Let the other ranks go (the worker is done)."""
        distributed.broadcast_object(self.group, StopOrder(reason))
