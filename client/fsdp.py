"""Full fine-tuning sharded across a site's ranks (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Each rank holds 1/N of every parameter (rows, dim 0, as ``torch.chunk`` cuts them), its gradient
and its optimizer state; a layer's full weights exist only while that layer runs. What moves
between rank 0 and the others is one tensor at a time:

    scatter_into      rank 0's full tensor ─> each rank's rows (only those travel to it)
    gather_to_leader  each rank's rows ─> the full tensor on rank 0 (the others hold none)

So no rank ever holds the whole trainable state but rank 0's host copy the worker keeps anyway.
Gradients are reduce-scattered by FSDP itself (a mean over ranks, as DDP's), inside backward.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from client import distributed
from client.distributed import SiteGroup
from client.model import LoadedModel, load_model
from common.errors import InvalidArgument
from common.spec import Method, TrainingSpec, TrainMode


def check_spec(spec: TrainingSpec) -> None:
    """Refuse what FSDP does not shard here: LoRA (it fits one device: DDP) and FedCyBGD's blocks.

    Raises:
        InvalidArgument: naming the training setting and what to run instead.
    """
    if spec.mode is TrainMode.LORA:
        raise InvalidArgument(
            'gdfed work --fsdp shards full fine-tuning; this run trains LoRA adapters (training.mode = "lora"), '
            "which fit one device: drop --fsdp (the ranks then train as DDP)",
            field="training.mode",
        )
    if spec.method is not Method.GRADUALDIFF:
        raise InvalidArgument(
            f"gdfed work --fsdp trains the whole model each round, not training.method = "
            f"{spec.method.name.lower()}'s blocks or adapters: drop --fsdp",
            field="training.method",
        )


def load_sharded(model_dir: Path, spec: TrainingSpec, group: SiteGroup) -> LoadedModel:
    """The model loaded whole on the CPU, then sharded across the ranks (``shard_model``).

    Every rank reads the whole model once on the host (the shards alone go to the device): host
    memory of one model per rank while loading, freed as it is sharded.
    """
    check_spec(spec)
    return shard_model(load_model(model_dir, spec, torch.device("cpu")), group)


def shard_model(loaded: LoadedModel, group: SiteGroup) -> LoadedModel:
    """``loaded`` (whole, on the CPU) sharded across the group's ranks, its shards on this rank's device.

    Each block the model names as indivisible (transformers' ``_no_split_modules``: a decoder
    layer) is its own FSDP unit, then the root: a layer's weights are gathered only while it runs.
    """
    mesh = init_device_mesh(group.device.type, (group.world,))
    model = loaded.model
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return replace(loaded, device=group.device)


def _rows(param: torch.Tensor, world: int) -> tuple[DTensor, int, int]:
    """The DTensor, its rows and the rows per rank (the last ranks may have fewer, or none)."""
    if not isinstance(param, DTensor) or list(param.placements) != [Shard(0)]:
        raise ValueError(f"a parameter sharded on dim 0 (FSDP2) was expected, not {type(param).__name__}")
    rows = param.shape[0]
    return param, rows, math.ceil(rows / world)


def scatter_into(group: SiteGroup, param: torch.Tensor, full: torch.Tensor | None) -> None:
    """Write rank 0's ``full`` value of ``param`` into each rank's shard of it (the others pass None)."""
    sharded, rows, chunk = _rows(param, group.world)
    local = sharded.to_local()
    rest = tuple(sharded.shape[1:])
    mine = torch.empty((chunk, *rest), dtype=local.dtype, device=group.device)
    pieces: list[torch.Tensor] | None = None
    if group.leader:
        if full is None or tuple(full.shape) != tuple(sharded.shape):
            shape = None if full is None else tuple(full.shape)
            raise ValueError(f"rank 0 must give the full tensor of shape {tuple(sharded.shape)}, not {shape}")
        source = full.to(group.device, local.dtype)
        pieces = []
        for r in range(group.world):
            piece = torch.zeros((chunk, *rest), dtype=local.dtype, device=group.device)
            lo, hi = min(rows, r * chunk), min(rows, (r + 1) * chunk)
            piece[: hi - lo] = source[lo:hi]
            pieces.append(piece)
    distributed.collective(f"scattering a {tuple(sharded.shape)} tensor", dist.scatter, mine, pieces, 0)
    with torch.no_grad():
        local.copy_(mine[: local.shape[0]])


def gather_to_leader(group: SiteGroup, param: torch.Tensor) -> torch.Tensor | None:
    """The full value of the sharded ``param`` on rank 0 (on its device); None on the others."""
    sharded, rows, chunk = _rows(param, group.world)
    local = sharded.to_local().detach()
    mine = torch.zeros((chunk, *tuple(sharded.shape[1:])), dtype=local.dtype, device=group.device)
    mine[: local.shape[0]] = local
    pieces = [torch.empty_like(mine) for _ in range(group.world)] if group.leader else None
    distributed.collective(f"gathering a {tuple(sharded.shape)} tensor", dist.gather, mine, pieces, 0)
    if pieces is None:
        return None
    return torch.cat(pieces)[:rows]
