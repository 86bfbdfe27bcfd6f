"""Closing a FlexLoRA round: rebuild each site's adapters, form ΔW module by module, SVD, next state.

The run's state holds rank-R adapters (R = training.lora.rank, the largest
rank a site may train). A site of rank r_i starts from the slice

    A_i⁰ = A^(R)[:r_i]        B_i⁰ = (r_i/R) · B^(R)[:, :r_i]

which is exactly FlexLoRA's (A^(r_i), B^(r_i)) = (V_rᵀ, U_r Σ_r / (α/r)) when
A^(R), B^(R) came from the SVD, and uploads the differences ΔA_i, ΔB_i
against it (GradualDiff-Fed: only what changed travels). Here, per adapted
matrix, the server rebuilds A_i = A_i⁰ + ΔA_i, B_i = B_i⁰ + ΔB_i, folds
ΔW = Σ p_i (α/r_i) B_i A_i in fp32 (server.flexlora.ModuleSum), takes the SVD
and keeps the rank-R factors as the next state; FlexLoRA replaces the
adapter each round, so the published difference is new − old.

Memory: full-size ΔW buffers exist only for one group of modules at a time
(``budget_bytes``); each group reads the accepted uploads back from their
spools, so the server never holds ΔW for the whole model at once. Uploads
are adapter-sized (small against ΔW), one at a time.

[INFERRED] Broadcasting the rank-R state and letting each site slice it is
our reading: the authors' simulation hands each client its rank-r slice
directly. It makes a site's download the rank-R size whatever its rank, and
keeps one published difference (and one chain) for every site.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.codec.compact import decode_dense, is_lossy
from common.codec.decoder import ShardDecoder, place_piece
from common.codec.decoder import allocate as allocate_tensors
from common.delta import PayloadLayout, TensorSpec
from common.lora import lora_pairs, slice_a, slice_b
from common.statefile import StateReader
from server.flexlora import LoraFactors, ModuleSum
from server.spool import Spool

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class FlexUpload:
    """An accepted upload of the round: its spool, its layout (recorded at acceptance), its rank,
    its weight n_i."""

    upload_id: str
    layout: PayloadLayout
    rank: int
    weight: float
    manifest: tuple[TensorSpec, ...]  # the dense fp32 tensors it stands for (rank-r_i shapes)


def start_factors(a_state: torch.Tensor, b_state: torch.Tensor, rank: int) -> LoraFactors:
    """The rank-``rank`` slice of rank-R adapters (what a site of that rank starts from)."""
    return LoraFactors(a=slice_a(a_state, rank), b=slice_b(b_state, rank))


def next_state(
    previous: StateReader,
    uploads: Sequence[FlexUpload],
    spool: Spool,
    *,
    alpha: float,
    svd: str = "full",
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> dict[str, torch.Tensor]:
    """The rank-R adapters after the round (every tensor of the state; non-LoRA tensors are kept)."""
    names = [t.name for t in previous.manifest]
    pairs = lora_pairs(names)
    shapes = {t.name: t.shape for t in previous.manifest}
    out: dict[str, torch.Tensor] = {n: previous.read(n) for n in names if not _in_pairs(n, pairs)}
    for group in _groups(pairs, shapes, budget_bytes):
        sums: dict[str, ModuleSum] = {}
        starts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in group:
            a_name, b_name = pairs[module]
            d_out, d_in = shapes[b_name][0], shapes[a_name][1]
            sums[module] = ModuleSum(d_out, d_in, alpha)
            starts[module] = (previous.read(a_name), previous.read(b_name))
        for upload in uploads:
            tensors = _read_upload(upload, spool, [n for m in group for n in pairs[m]])
            for module in group:
                a_name, b_name = pairs[module]
                base = start_factors(*starts[module], upload.rank)
                factors = LoraFactors(a=base.a + tensors[a_name], b=base.b + tensors[b_name])
                sums[module].add(factors, upload.weight)
        for module in group:
            a_name, b_name = pairs[module]
            big = int(starts[module][0].shape[0])
            factors = sums.pop(module).finish([big], method=svd)[big]
            out[a_name], out[b_name] = factors.a.contiguous(), factors.b.contiguous()
        logger.info(
            "[flexlora] %d module(s) redistributed at rank %s",
            len(group),
            sorted({int(starts[m][0].shape[0]) for m in group}),
        )
    return {n: out[n] for n in names}


def _in_pairs(name: str, pairs: dict[str, tuple[str, str]]) -> bool:
    return any(name in pair for pair in pairs.values())


def _groups(
    pairs: dict[str, tuple[str, str]], shapes: dict[str, tuple[int, ...]], budget: int
) -> list[list[str]]:
    """Modules in groups whose full-size fp32 ΔW buffers fit ``budget`` together (at least one each)."""
    groups: list[list[str]] = [[]]
    used = 0
    for module, (a_name, b_name) in pairs.items():
        size = shapes[b_name][0] * shapes[a_name][1] * 4
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(module)
        used += size
    return [g for g in groups if g]


def _read_upload(upload: FlexUpload, spool: Spool, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    """The ``wanted`` tensors of one spooled upload (already verified when it was accepted)."""
    layout = upload.layout
    if is_lossy(layout.codec):
        # Compact parts (top-k, int8) expand to dense tensors; this also checks them.
        with spool.path(upload.upload_id).open("rb") as source:
            return decode_dense(layout, source, upload.manifest, wanted=wanted)
    keep = set(wanted)
    manifest = [t for t in layout.manifest if t.name in keep]
    tensors = allocate_tensors(manifest)
    decoder = ShardDecoder(layout.spec)
    offsets = layout.shard_offsets()
    for index, shard in enumerate(layout.shards):
        names = {layout.manifest[p.tensor].name for p in shard.pieces}
        if not names & keep:
            continue
        data = spool.read(upload.upload_id, offsets[index], shard.compressed_bytes)
        for piece in decoder.decode(index, shard, data):
            if piece.name in keep:
                place_piece(tensors[piece.name], piece)
    return tensors
