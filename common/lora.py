"""LoRA tensors by their peft names, and the rank-r slice of rank-R adapters (FlexLoRA).

FlexLoRA (ALGORITHMS.md §2) gives a site of rank r the factors
A^(r) = V_rᵀ and B^(r) = U_r Σ_r / (α/r). When the run's state holds the
rank-R factors of the same SVD, those are the slices

    A^(r) = A^(R)[:r]        B^(r) = (r/R) · B^(R)[:, :r]

so the aggregator and every worker compute a site's starting adapters with
this one function, bit for bit alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def lora_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Adapted module → (its lora_A name, its lora_B name), for peft parameter names."""
    a_names = {n.replace(".lora_A.", ".lora_?."): n for n in names if is_lora_a(n)}
    b_names = {n.replace(".lora_B.", ".lora_?."): n for n in names if is_lora_b(n)}
    return {
        key.split(".lora_?.")[0]: (a_names[key], b_names[key]) for key in sorted(a_names) if key in b_names
    }


def slice_a(a: torch.Tensor, rank: int) -> torch.Tensor:
    """A^(r) from A^(R): the first r rows."""
    _check_rank(rank, int(a.shape[0]))
    return a[:rank].clone()


def slice_b(b: torch.Tensor, rank: int) -> torch.Tensor:
    """B^(r) from B^(R): the first r columns, times r/R (the α/r scaling moves with the rank)."""
    big = int(b.shape[1])
    _check_rank(rank, big)
    return b[:, :rank] * (rank / big)


def slice_state(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Every lora_A/lora_B tensor of ``state`` at ``rank``; other tensors as they are."""
    out = {}
    for name, tensor in state.items():
        if is_lora_a(name):
            out[name] = slice_a(tensor, rank)
        elif is_lora_b(name):
            out[name] = slice_b(tensor, rank)
        else:
            out[name] = tensor
    return out


def _check_rank(rank: int, big: int) -> None:
    if not 0 < rank <= big:
        raise ValueError(f"LoRA rank {rank} is outside 1..{big} (the run's adapters have rank {big})")
