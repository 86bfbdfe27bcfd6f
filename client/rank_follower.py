"""The ranks of a site other than rank 0: no aggregator, only rank 0's orders.

    wait for an order ─> LoadOrder: load the model (whole, or sharded: FSDP), read and tokenize
                        the site's data
                     ─> RoundOrder: take the start state (broadcast tensor by tensor; FSDP:
                        this rank's rows scattered), train this rank's part of every global
                        batch (gradients averaged with the other ranks each step), send the
                        trained shards to rank 0 (FSDP), average the loss; the upload is rank 0's
                     ─> StopOrder: leave (exit code 0)

Every rank reads the same data file and orders it with the same seeds, so the global batches
are the same everywhere and the split (``shard``) gives each rank disjoint examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from client import distributed, fsdp
from client.data import Example, read_jsonl, split, tokenize, training_batches
from client.distributed import SiteGroup
from client.model import LoadedModel, load_model
from client.ranks import LoadOrder, RoundOrder, StopOrder
from client.train import Aborted, train_round
from client.worker_config import WorkerConfig

logger = logging.getLogger(__name__)


@dataclass
class _Site:
    loaded: LoadedModel
    train: list[Example]
    held_out: list[Example]  # FSDP: every rank joins the eval's forward passes; DDP: none
    sharded: bool


def follow(config: WorkerConfig, group: SiteGroup) -> int:
    """Obey rank 0 until it says stop; an exit code (0: told to stop)."""
    if group.leader:
        raise ValueError("rank 0 leads; it runs the worker, not follow()")
    site: _Site | None = None
    while True:
        order = distributed.broadcast_object(group)
        if isinstance(order, StopOrder):
            logger.info("[rank %d] rank 0 is done: %s", group.rank, order.reason)
            return 0
        if isinstance(order, LoadOrder):
            site = _load(config, group, order)
        elif isinstance(order, RoundOrder):
            if site is None:
                raise RuntimeError(f"rank 0 sent round {order.number} before the model was loaded")
            _round(config, group, site, order)
        else:
            raise RuntimeError(f"rank 0 sent {type(order).__name__}, not an order this rank knows")


def _load(config: WorkerConfig, group: SiteGroup, order: LoadOrder) -> _Site:
    # The same records and split as rank 0's worker: the global batches must be the same.
    records = read_jsonl(config.data)
    if config.eval_data is not None:
        train_records, eval_records = records, read_jsonl(config.eval_data)
    else:
        train_records, eval_records = split(records, config.eval_fraction, config.seed)
    spec = order.spec
    if order.fsdp:
        loaded = fsdp.load_sharded(config.model, spec, group)
    else:
        loaded = load_model(config.model, spec, group.device, lora_rank=config.lora_rank)
    train = tokenize(train_records, loaded.tokenizer, spec.max_seq_len)
    held_out = tokenize(eval_records, loaded.tokenizer, spec.max_seq_len) if order.fsdp else []
    logger.info(
        "[rank %d] model loaded on %s%s, %d examples",
        group.rank,
        group.device,
        " (sharded)" if order.fsdp else "",
        len(train),
    )
    return _Site(loaded, train, held_out, order.fsdp)


def _round(config: WorkerConfig, group: SiteGroup, site: _Site, order: RoundOrder) -> None:
    loaded = site.loaded
    params = dict(loaded.model.named_parameters())
    carried: dict[str, torch.Tensor] = {}
    if site.sharded:
        for name in loaded.trainable:
            fsdp.scatter_into(group, params[name], None)
    else:
        with torch.no_grad():
            for name, tensor in distributed.broadcast_state(group, order.layout, {}):
                if name in params:
                    params[name].copy_(tensor)
                else:
                    carried[name] = tensor
    spec = order.spec
    data = training_batches(site.train, spec.batch_size, loaded.tokenizer.pad_token_id, seed=order.seed)
    try:
        trained = train_round(
            loaded,
            spec,
            data,
            carried,
            order.params,
            order.carried,
            site.held_out,
            should_stop=lambda: distributed.agree(group, False),
            round_number=order.number,
            shard=(group.rank, group.world),
            reduce_gradients=None if site.sharded else distributed.gradient_reducer(group),
        )
    except Aborted as exc:
        logger.info("[rank %d] round %d aborted: %s", group.rank, order.number, exc)
        return
    trained.state.clear()  # the upload is rank 0's
    if site.sharded:
        for name in loaded.trainable:
            fsdp.gather_to_leader(group, params[name])
    distributed.summed(group, [trained.result.mean_loss])
