"""FlexLoRA: fold heterogeneous-rank LoRA uploads into one full-size ΔW, then give each rank its SVD slice.

FlexLoRA (Bai et al., arXiv 2402.11505, NeurIPS 2024; authors' code ``alibaba/FederatedScope`` branch
``FlexLoRA`` @ 1cb1ab76, ``fed_utils/model_aggregation.py``), per adapted matrix W ∈ R^{d_out×d_in}::

    p_i = n_i / Σ_{j∈S_t} n_j                          weights over the round's selected clients only
    ΔW  = Σ_{i∈S_t} p_i · (α/r_i) · B_i A_i             B_i: (d_out, r_i), A_i: (r_i, d_in); ranks may differ
    ΔW  = U Σ Vᵀ                                         SVD in fp32
    B^(r) = U[:, :r] · diag(σ_1..σ_r) / (α/r)            all of Σ goes into B (the up-projection)
    A^(r) = V[:, :r]ᵀ                                    orthonormal rows
    ⇒ (α/r)·B^(r)A^(r) = the best rank-r approximation of ΔW (Eckart–Young)

Each client of rank r starts the next round from (A^(r), B^(r)). ΔW *replaces* the adapter; the base W0 is
never modified here. Streaming, one module at a time (server memory: one full-size fp32 ΔW)::

    acc = ModuleSum(d_out, d_in, alpha=16.0)
    for factors, n in uploads_of_this_module:      # as they arrive
        acc.add(factors, n)
    per_rank = acc.finish(ranks={8, 30, 200})        # {r: LoraFactors(a=(r, d_in), b=(d_out, r))}

Pure tensor math: no gRPC, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from server.optimizers import all_finite

__all__ = ["SVD_METHODS", "LoraFactors", "ModuleSum", "full_update", "redistribute"]

SVD_METHODS = ("full", "randomized")


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA pair for one adapted matrix: W' = W0 + (α/r)·B·A.

    Attributes:
        a: the down-projection A, shape (r, d_in).
        b: the up-projection B, shape (d_out, r).

    No validation on construction (factors arrive off the wire); ``full_update`` and
    ``ModuleSum.add`` check shapes before using them.
    """

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)

    @property
    def rank(self) -> int:
        """r, the number of rows of A."""
        return int(self.a.shape[0])


def _problem(factors: LoraFactors, d_out: int, d_in: int) -> str | None:
    """What is wrong with ``factors`` for a (d_out, d_in) matrix, or None when nothing is."""
    a, b = factors.a, factors.b
    if a.ndim != 2 or b.ndim != 2:
        return f"A and B must be 2-D, got A {tuple(a.shape)} and B {tuple(b.shape)}"
    if not (a.is_floating_point() and b.is_floating_point()):
        return f"A and B must be floating point, got {a.dtype} and {b.dtype}"
    if a.shape[0] != b.shape[1]:
        return (
            f"ranks disagree: A {tuple(a.shape)} has r={a.shape[0]} but B {tuple(b.shape)} has r={b.shape[1]}"
        )
    if a.shape[0] < 1:
        return "rank must be at least 1, got A with 0 rows"
    if b.shape[0] != d_out or a.shape[1] != d_in:
        return (
            f"B·A is {b.shape[0]}×{a.shape[1]} but this module is {d_out}×{d_in} "
            f"(A {tuple(a.shape)}, B {tuple(b.shape)}); was the upload for another module?"
        )
    return None


def _check_weight(n: float) -> float:
    n = float(n)
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"weight n must be finite and ≥ 0 (a number of training examples), got {n}")
    return n


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (LoRA scaling numerator, the authors hard-code 16) must be > 0, got {alpha}")
    return alpha


class ModuleSum:
    """Streaming FlexLoRA sum for one adapted matrix: S = Σ_i n_i·(α/r_i)·B_i A_i in an fp32 buffer.

    Memory is one (d_out, d_in) fp32 buffer whatever the number of clients; each ``add`` is one
    in-place ``addmm_`` (no full-size temporary). ``finish``/``delta_w`` divide the buffer by Σn in
    place, after which ``add`` raises. Not thread-safe: callers serialise ``add``/``finish``.

    Example:
        >>> acc = ModuleSum(4, 3, alpha=16.0)
        >>> acc.add(LoraFactors(a=torch.ones(2, 3), b=torch.ones(4, 2)), n=10)
        >>> sorted(acc.finish([1, 2]))
        [1, 2]
    """

    def __init__(
        self, d_out: int, d_in: int, alpha: float, *, device: torch.device | str | None = None
    ) -> None:
        """Zero a (d_out, d_in) fp32 accumulator.

        Raises:
            ValueError: non-positive dimensions or alpha.
        """
        if d_out < 1 or d_in < 1:
            raise ValueError(f"module shape must be positive, got {d_out}×{d_in}")
        self.d_out = d_out
        self.d_in = d_in
        self.alpha = _check_alpha(alpha)
        self._sum = torch.zeros(d_out, d_in, dtype=torch.float32, device=device)  # (d_out, d_in)
        self._total = 0.0
        self._count = 0
        self._finished = False

    @property
    def count(self) -> int:
        """How many uploads were added."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Σ n over the added uploads."""
        return self._total

    def add(self, factors: LoraFactors, n: float) -> None:
        """Fold n·(α/r)·B·A, computed in fp32 whatever the factors' dtype (bf16/fp16 are upcast first).

        Raises:
            ValueError: wrong shapes, ranks that disagree, a negative or non-finite weight.
            RuntimeError: the sum has already been finished.
        """
        if self._finished:
            raise RuntimeError(
                "this ModuleSum is finished (divided by Σn); start a new one for the next round"
            )
        problem = _problem(factors, self.d_out, self.d_in)
        if problem is not None:
            raise ValueError(problem)
        n = _check_weight(n)
        a = factors.a.to(device=self._sum.device, dtype=torch.float32)  # (r, d_in)
        b = factors.b.to(device=self._sum.device, dtype=torch.float32)  # (d_out, r)
        # Pitfall (1): the α/r_i factor. Without it a rank-r_i client is rescaled by r_j/r_i against others.
        self._sum.addmm_(b, a, alpha=n * self.alpha / factors.rank)
        self._total += n
        self._count += 1

    def delta_w(self) -> torch.Tensor:
        """The weighted mean ΔW = S/Σn, (d_out, d_in) fp32. Finishes the sum (divides in place, once).

        Returns the internal buffer, not a copy: the full-size ΔW the server may also store.

        Raises:
            ValueError: nothing was added, or Σn = 0.
        """
        if not self._finished:
            if self._count == 0 or self._total <= 0:
                raise ValueError(
                    f"no weight to divide by: {self._count} uploads with Σn={self._total}; "
                    "FlexLoRA needs at least one client with n > 0 in the round"
                )
            self._sum.div_(self._total)
            self._finished = True
        return self._sum

    def finish(self, ranks: Iterable[int], *, method: str = "full") -> dict[int, LoraFactors]:
        """ΔW = S/Σn, then ``redistribute(ΔW, ranks, alpha, method=method)``. May be called again."""
        return redistribute(self.delta_w(), ranks, self.alpha, method=method)


def full_update(clients: Sequence[tuple[LoraFactors, float]], alpha: float) -> torch.Tensor:
    """ΔW = Σ_i p_i·(α/r_i)·B_i A_i with p_i = n_i/Σ_j n_j over the given clients only.

    Computed in fp32 (factors in bf16/fp16 are upcast before the product; pitfall (2)). Ranks may differ
    between clients; all must describe the same (d_out, d_in) matrix. Same result as feeding the clients
    to a ``ModuleSum`` in order, which is what this does.

    Args:
        clients: (factors, n_i) per client of this round; n_i = number of training examples (≥ 0).
        alpha: LoRA α (the authors hard-code 16; merge_rate = α/r).

    Returns:
        ΔW, shape (d_out, d_in), fp32, on the first client's device.

    Raises:
        ValueError: no clients, Σn = 0, a negative weight, or a client whose shapes are wrong
            (the message names the client's index in ``clients``).

    Example:
        >>> f = LoraFactors(a=torch.eye(2, 3), b=torch.ones(4, 2))
        >>> full_update([(f, 1.0), (f, 3.0)], alpha=2.0).shape
        torch.Size([4, 3])
    """
    if not clients:
        raise ValueError("full_update needs at least one client")
    first = clients[0][0]
    if first.b.ndim != 2 or first.a.ndim != 2:
        raise ValueError(
            f"client 0: A and B must be 2-D, got A {tuple(first.a.shape)} and B {tuple(first.b.shape)}"
        )
    d_out, d_in = int(first.b.shape[0]), int(first.a.shape[1])
    for i, (factors, n) in enumerate(clients):
        problem = _problem(factors, d_out, d_in)
        if problem is not None:
            raise ValueError(f"client {i}: {problem}")
        try:
            _check_weight(n)
        except ValueError as e:
            raise ValueError(f"client {i}: {e}") from None
    acc = ModuleSum(d_out, d_in, alpha, device=first.a.device)
    for factors, n in clients:
        acc.add(factors, n)
    return acc.delta_w()


def _check_ranks(ranks: Iterable[int]) -> list[int]:
    given = list(ranks)
    for r in given:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks must be integers ≥ 1, got {r!r}")
    return sorted(set(given))


def _randomized_svd(
    m: torch.Tensor, q: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-q SVD of m (d_out, d_in) by randomized range finding (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    Same algorithm as ``torch.svd_lowrank``, but the Gaussian test matrix is drawn from a private,
    seeded ``torch.Generator``: ``svd_lowrank`` draws from the global RNG, so making it deterministic
    would mean reseeding global state, which races with anything else in the process using it.
    """
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(m.shape[1], q, generator=gen, device=m.device, dtype=m.dtype)  # (d_in, q)
    basis = torch.linalg.qr(m @ omega).Q  # (d_out, q)
    for _ in range(niter):  # subspace iteration, re-orthonormalised each half-step for stability
        z = torch.linalg.qr(m.T @ basis).Q  # (d_in, q)
        basis = torch.linalg.qr(m @ z).Q  # (d_out, q)
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)  # (q, q), (q,), (q, d_in)
    return basis @ u_small, s, vh


def redistribute(
    delta_w: torch.Tensor,
    ranks: Iterable[int],
    alpha: float,
    *,
    method: str = "full",
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
) -> dict[int, LoraFactors]:
    """Split ΔW into one (A^(r), B^(r)) per rank: B = U_r·diag(σ_1..σ_r)/(α/r), A = V_rᵀ.

    All of Σ goes into B, as in the authors' code (pitfall (4): a √Σ split is a different method), so A has
    orthonormal rows and (α/r)·B·A is the best rank-r approximation of ΔW: Frobenius error² = Σ_{i>r} σ_i².
    The SVD runs in fp32 (ΔW is upcast if needed); the factors come back fp32 on ΔW's device, each
    owning its memory. Singular vectors are defined up to sign (and rotation within repeated σ); the
    product (α/r)·B·A is what is determined.

    Ranks above k = min(d_out, d_in) [our choice, INFERRED; the authors' ``truncate()`` also zero-pads]:
    the factors are zero-padded to shape (r, d_in)/(d_out, r), so (α/r)·B·A = ΔW exactly, but rows k..r−1
    of A and columns k..r−1 of B are zero. Those padded components get zero gradient in both factors
    and stay dead; the first k already represent any ΔW, so nothing is lost. Raising instead would make
    a client's configured rank unusable on a small model.

    Args:
        delta_w: ΔW, shape (d_out, d_in), finite.
        ranks: the ranks in use; duplicates are merged.
        alpha: LoRA α (> 0).
        method: ``"full"`` — ``torch.linalg.svd(full_matrices=False)``, as the authors (``torch.svd``);
            ``"randomized"`` — a seeded randomized SVD of the top q = max(r) + ``oversample`` triplets with
            ``niter`` subspace iterations [INFERRED speed-up, valid because only the top max(r) vectors are
            used]. Exact up to the spectrum's decay: the top-r product matches the full SVD's closely when
            σ_r ≫ σ_{q+1}; with a flat tail it is a near-optimal, not optimal, rank-r approximation.
            Deterministic for a given ``seed``; falls back to the full SVD when q ≥ min(d_out, d_in).

    Returns:
        {r: LoraFactors(a=(r, d_in), b=(d_out, r))} for each distinct rank.

    Raises:
        ValueError: ΔW not 2-D or not finite, a rank < 1, alpha ≤ 0, unknown method, negative oversample/niter.

    Example:
        >>> dw = torch.outer(torch.arange(4.0), torch.ones(3))
        >>> f = redistribute(dw, [1], alpha=16.0)[1]
        >>> torch.allclose(16.0 * f.b @ f.a, dw, atol=1e-5)
        True
    """
    alpha = _check_alpha(alpha)
    wanted = _check_ranks(ranks)
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    if oversample < 0 or niter < 0:
        raise ValueError(f"oversample and niter must be ≥ 0, got {oversample} and {niter}")
    if delta_w.ndim != 2:
        raise ValueError(f"ΔW must be 2-D (d_out, d_in), got shape {tuple(delta_w.shape)}")
    m = delta_w.to(torch.float32)  # (d_out, d_in)
    if not all_finite(m):
        raise ValueError("ΔW has NaN or Inf entries; a client upload was probably corrupt or diverged")
    if not wanted:
        return {}
    d_out, d_in = m.shape
    k = min(d_out, d_in)
    q = min(wanted[-1] + oversample, k)
    if method == "randomized" and q < k:
        u, s, vh = _randomized_svd(m, q, niter, seed)  # (d_out, q), (q,), (q, d_in)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    out: dict[int, LoraFactors] = {}
    for r in wanted:
        kept = min(r, k)
        b = torch.zeros(d_out, r, dtype=torch.float32, device=m.device)  # (d_out, r)
        a = torch.zeros(r, d_in, dtype=torch.float32, device=m.device)  # (r, d_in)
        b[:, :kept] = u[:, :kept] * (s[:kept] * (r / alpha))  # U_r·diag(σ)/(α/r)
        a[:kept] = vh[:kept]
        out[r] = LoraFactors(a=a, b=b)
    return out
