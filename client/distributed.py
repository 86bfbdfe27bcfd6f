"""One site on several processes: the process group, and the collectives its ranks share.

``torchrun --nproc-per-node N`` (or ``gdfed work --nproc N``) starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK in their environment. Each takes one device (``cuda:LOCAL_RANK``,
NCCL) or the CPU (gloo). Rank 0 alone talks to the aggregator; what the others need goes
through the helpers here:

    broadcast_object   a round's small instructions (pickled, broadcast_object_list)
    broadcast_state    the round's start state, tensor by tensor (never one flat copy)
    agree              rank 0's yes/no (stop training?) taken by every rank
    reduce_gradients   DDP: each gradient averaged across ranks, in flat buckets per dtype
    summed             numbers (the loss) summed across ranks

A collective that fails (another rank died, and gloo saw its socket close) raises ``RankLost``,
which names what the site was doing. Under NCCL a dead peer is not seen by the survivors' calls;
torchrun, which watches its processes, stops them (client.site_launch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import InvalidArgument

# Gradients are reduced in flat buckets of at most this many bytes: few calls, and a full
# fine-tune does not need a second full copy of its gradients for the reduction.
BUCKET_BYTES = 256 * 1024 * 1024
# A follower waits on rank 0 for as long as rank 0 waits on the aggregator (a paused run: days).
# A rank that dies is noticed by torchrun and by the closed connections, not by this timeout.
logger = logging.getLogger(__name__)

WAIT = timedelta(days=7)
# How long the last barrier waits for the other ranks before the group is torn down anyway.
STOP_WAIT = timedelta(seconds=60)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankLost(RuntimeError):
    """A collective failed: another rank of this site stopped (or this one was told to)."""


@dataclass(frozen=True, slots=True)
class SiteGroup:
    """This process's place in its site: rank of world, and its device and backend."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" on CUDA, "gloo" on the CPU

    @property
    def leader(self) -> bool:
        """Rank 0: the one that talks to the aggregator."""
        return self.rank == 0


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """What a receiving rank allocates for one broadcast tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of several (torchrun's variables are set, WORLD_SIZE > 1)."""
    world = os.environ.get("WORLD_SIZE", "")
    return all(key in os.environ for key in _ENV) and world.isdigit() and int(world) > 1


def group_from_env(device: str = "auto") -> SiteGroup:
    """This rank's place from torchrun's environment, with its device.

    ``device``: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is present, else the CPU), ``cuda``
    or ``cpu``. A numbered device would put every rank on one GPU: choose the GPUs with
    CUDA_VISIBLE_DEVICES instead.

    Raises:
        InvalidArgument: a variable that is not a number in range, or a numbered ``device``.
    """
    values = {}
    for key in _ENV:
        text = os.environ.get(key, "")
        if not text.isdigit():
            raise InvalidArgument(f"{key} = {text!r} must be a number >= 0 (torchrun sets it)", field=key)
        values[key] = int(text)
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if not 0 <= rank < world:
        raise InvalidArgument(f"RANK = {rank} must be below WORLD_SIZE = {world}", field="RANK")
    if ":" in device:
        raise InvalidArgument(
            f"--device {device} with several processes would put every rank on one device; give "
            "--device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES",
            field="device",
        )
    if device not in ("auto", "cuda", "cpu"):
        raise InvalidArgument(f"--device {device} must be auto, cuda or cpu with --nproc", field="device")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and local >= torch.cuda.device_count():
        raise InvalidArgument(
            f"local rank {local} has no GPU: {torch.cuda.device_count()} visible "
            "(CUDA_VISIBLE_DEVICES); use --nproc <= the GPUs this machine has",
            field="nproc",
        )
    chosen = torch.device("cuda", local) if cuda else torch.device("cpu")
    return SiteGroup(rank, world, local, chosen, "nccl" if cuda else "gloo")


def start(group: SiteGroup) -> None:
    """Join the site's process group (torchrun's rendezvous gives the address)."""
    if group.device.type == "cuda":
        torch.cuda.set_device(group.device)
        dist.init_process_group(
            group.backend, timeout=WAIT, device_id=group.device, rank=group.rank, world_size=group.world
        )
    else:
        dist.init_process_group(group.backend, timeout=WAIT, rank=group.rank, world_size=group.world)


def stop() -> None:
    """Leave the process group (after the last collective), all ranks together.

    Without the barrier a rank could tear its gloo pairs down while a peer was still finishing
    the last collective's socket traffic, and the peer aborted ("terminate called without an
    active exception"): seen about once in five runs on a loaded machine. A rank already gone
    makes the barrier fail or time out; the group is torn down regardless.
    """
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=STOP_WAIT)
        else:
            dist.barrier()
    except RuntimeError as exc:
        logger.info("[ranks] leaving the process group without the others: %s", exc)
    dist.destroy_process_group()


def collective(what: str, call: Callable[..., object], *args: object) -> None:
    """``call(*args)``, a collective; its failure is ``RankLost``, saying it was ``what``."""
    try:
        call(*args)
    except RuntimeError as exc:  # DistBackendError and gloo's socket errors are RuntimeErrors
        raise RankLost(f"{what} failed: another rank of this site has stopped ({exc})") from exc


def broadcast_object(group: SiteGroup, value: object = None) -> object:
    """Rank 0's ``value`` on every rank (the others pass nothing)."""
    box = [value if group.leader else None]
    collective("receiving rank 0's instructions", dist.broadcast_object_list, box, 0)
    return box[0]


def broadcast_state(
    group: SiteGroup, layout: Sequence[TensorLayout], source: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 0's tensors ``layout`` (taken from ``source``), one at a time, on this rank's device.

    Each tensor yielded is a transient buffer: the caller puts it where it belongs before the
    next, so a rank holds at most one extra tensor, never a second copy of the state.
    """
    for spec in layout:
        if group.leader:
            tensor = source[spec.name].to(group.device, spec.dtype).contiguous()
        else:
            tensor = torch.empty(spec.shape, dtype=spec.dtype, device=group.device)
        collective(f"broadcasting {spec.name}", dist.broadcast, tensor, 0)
        yield spec.name, tensor


def layout_of(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> tuple[TensorLayout, ...]:
    """The layout of ``names`` in ``state``, for ``broadcast_state``."""
    return tuple(TensorLayout(n, tuple(state[n].shape), state[n].dtype) for n in names)


def agree(group: SiteGroup, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (the others' own is ignored)."""
    box = torch.tensor([int(flag) if group.leader else 0], dtype=torch.uint8, device=group.device)
    collective("agreeing on whether to stop", dist.broadcast, box, 0)
    return bool(box.item())


def summed(group: SiteGroup, values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over the ranks (every rank passes as many)."""
    box = torch.tensor(list(values), dtype=torch.float64, device=group.device)
    collective("summing the round's loss", dist.all_reduce, box)
    return [float(v) for v in box.tolist()]


def reduce_gradients(
    params: Sequence[torch.nn.Parameter], *, world: int, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Average every parameter's gradient across the ``world`` ranks, in place (DDP's arithmetic).

    Gradients are flattened into buckets of one dtype and device (at most ``bucket_bytes``
    each, a lone larger gradient its own), one all_reduce per bucket. A parameter without a
    gradient is skipped: every rank runs the same model on the same shapes, so every rank skips
    the same ones, and AdamW skips it too, as one process would.
    """
    kinds: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError("sparse gradients are not reduced across ranks; use dense embeddings")
        kinds.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in kinds.values():
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            collective("reducing gradients", dist.all_reduce, flat)
            # Dividing after the sum, as DDP does: with 2 ranks (a + b) / 2 equals one process's
            # a / 2 + b / 2 exactly, since halving is exact in binary floating point.
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(grads: Sequence[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def gradient_reducer(group: SiteGroup) -> Callable[[Sequence[torch.nn.Parameter]], None]:
    """``reduce_gradients`` for this group, as training's ``reduce_gradients`` hook."""

    def reduce(params: Sequence[torch.nn.Parameter]) -> None:
        reduce_gradients(params, world=group.world)

    return reduce
