"""The aggregation rule: a streaming weighted sum of client deltas, then a server optimizer step.

One round, tensor by tensor, never holding more than the accumulator::

    acc = WeightedSum(specs)                      # one fp64 zero tensor per manifest entry
    for each accepted client k:                   # n_k = its number of training examples
        for each chunk (name, start, values) of Δ_k:
            acc.fold(name, start, values, weight=n_k)
        acc.add_weight(n_k)
    opt = make_optimizer("fedadam", lr=1e-2)      # lives across rounds; persist opt.state_dict()
    for name, mean_delta in acc.mean():           # Δ̄ = Σ n_k Δ_k / Σ n_k, fp32, accumulator freed as we go
        theta[name] += opt.step(name, mean_delta)  # D = FedAvg: Δ̄; FedAdam: η·m/(√v+τ); ...

The weighted sum lives here, the optimizers in server.optimizers; both are pure tensor math (no
gRPC, no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from common.buffers import ReusableBuffer

# Elements converted per pass when a chunk's dtype differs from the accumulator's: a same-dtype
# add_ is 3-5x faster than a mixed-dtype one, and 4M elements bound the scratch at 32 MiB (fp64).
_CONVERT_CHUNK = 1 << 22


class WeightedSum:
    """Streaming weighted sum Σ_k n_k·Δ_k over a fixed manifest, folded chunk by chunk.

    Memory is one accumulator per manifest tensor (fp64 by default: 8 bytes per element)
    plus a scratch buffer of at most 4M elements, whatever the number of clients.
    Folding cannot be undone: validate a contribution before folding it. Not thread-safe;
    callers serialise ``fold``/``add_weight``.

    Reproducibility. Take fp64 accumulation, K contributions with fp32 (or bf16/fp16) values Δ_i
    and integer weights 1 ≤ n_i ≤ 2^29, W = Σ n_i ≤ 2^53 and A = Σ n_i·|Δ_i| per element.
    Every product n_i·Δ_i is exact in fp64 (24 + 29 ≤ 53 significant bits), so each fold
    rounds once, and the first fold into zero is exact:

    * the same contributions folded in the same order, however each contribution is split
      into chunks, give a bit-identical result;
    * any order gives an fp64 sum Ŝ with |Ŝ − S| ≤ (K−1)·u·A, u = 2^-53, S the exact sum
      (recursive summation, Rump 2012, BIT 52:201). After the one correctly rounded division
      by W, the fp64 means m1, m2 of two orders differ per element by at most
      ``δ = [2(K−1)u + 2u(1 + (K−1)u)]·A/W ≤ K·2^-52·A/W·(1 + 2^-53)``;
    * after the final rounding to fp32, the results r1, r2 differ by at most
      ``δ + ulp32(max(|r1|, |r2|))``: one fp32 ulp plus the absolute term.
      The same bound holds between a result and an fp64 reference such as
      ``np.average(Δ, weights=n)``, whose own error obeys the same (K-1)·2^-53·A-plus-division bound.

    Non-integer weights add one more rounding per product (up to 2^-53·n_i·|Δ_i|); a fixed
    order and fixed chunking is then still deterministic, but a different chunking may not be.
    """

    def __init__(
        self,
        specs: Sequence[tuple[str, tuple[int, ...]]],
        *,
        dtype: torch.dtype = torch.float64,
        memory: ReusableBuffer | None = None,
    ) -> None:
        """Allocate one zeroed accumulator per ``(name, shape)`` in ``specs``.

        Args:
            specs: The round's manifest: tensor names and shapes, in the order ``mean()`` yields them.
            dtype: ``torch.float64`` (default, see the class docstring) or ``torch.float32`` (half
                the memory, no reproducibility bound).
            memory: For fp32, where the accumulators live: leased from it as one block (zeroed
                here) and handed back by :meth:`release`, so a daemon's rounds reuse the same
                pages. (fp64 sums free each accumulator as ``mean()`` converts it, so they do not.)

        Raises:
            ValueError: On an unsupported dtype, a duplicate name or a negative dimension.
        """
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"accumulator dtype must be torch.float64 or torch.float32, got {dtype}")
        self._dtype = dtype
        seen: set[str] = set()
        for name, shape in specs:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the manifest; names must be unique")
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension in shape {tuple(shape)}")
            seen.add(name)
        self._memory = memory if dtype == torch.float32 else None
        self._lease: torch.Tensor | None = None
        self._acc: dict[str, torch.Tensor] = {}
        if self._memory is None:
            for name, shape in specs:
                self._acc[name] = torch.zeros(tuple(shape), dtype=dtype)
        else:
            sizes = [math.prod(shape) for _, shape in specs]
            self._lease = self._memory.lease(4 * sum(sizes))
            flat = self._lease.view(torch.float32).zero_()
            offset = 0
            for (name, shape), size in zip(specs, sizes, strict=True):
                self._acc[name] = flat[offset : offset + size].view(tuple(shape))
                offset += size
        self._scratch: torch.Tensor | None = None
        self._total_weight = 0.0
        self._count = 0
        self._spent = False

    @property
    def total_weight(self) -> float:
        """Σ n_k over the contributions registered with ``add_weight``."""
        return self._total_weight

    @property
    def count(self) -> int:
        """Number of ``add_weight`` calls, i.e. of accepted contributions."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held now: the live accumulators plus the conversion scratch buffer."""
        held = sum(t.numel() * t.element_size() for t in self._acc.values())
        if self._scratch is not None:
            held += self._scratch.numel() * self._scratch.element_size()
        return held

    def fold(self, name: str, start: int, values: torch.Tensor, weight: float) -> None:
        """Add ``weight * values`` to elements ``[start, start + len(values))`` of tensor ``name``.

        Args:
            name: A tensor of the manifest.
            start: Offset of ``values[0]`` in the flattened (row-major) tensor.
            values: 1-D float tensor (fp32, bf16, fp16 or fp64) on the accumulator's device.
            weight: The contribution's weight n_k; pass the same value to ``add_weight`` once.

        Raises:
            ValueError: On an unknown name, a range outside the tensor, non-1-D or non-float values,
                or a non-finite weight; the accumulator is untouched.
            RuntimeError: After ``mean()``.
        """
        self._check_live("fold")
        acc = self._acc.get(name)
        if acc is None:
            raise ValueError(
                f"tensor {name!r} is not in this round's manifest ({len(self._acc)} tensors); "
                "fold only the names the WeightedSum was built with"
            )
        if values.dim() != 1 or not values.is_floating_point():
            raise ValueError(
                f"tensor {name!r}: values must be a 1-D float tensor, got {values.dim()}-D {values.dtype}; "
                "flatten the chunk and keep it floating point"
            )
        n, total = values.numel(), acc.numel()
        if start < 0 or start + n > total:
            raise ValueError(
                f"tensor {name!r}: range [{start}, {start + n}) is outside [0, {total}); "
                "check the chunk offset against the manifest shape"
            )
        if values.device != acc.device:
            raise ValueError(
                f"tensor {name!r}: values are on {values.device}, the accumulator on {acc.device}"
            )
        if not math.isfinite(weight):
            raise ValueError(f"tensor {name!r}: weight must be finite, got {weight}")
        dst = acc.view(-1)[start : start + n]
        if values.dtype == self._dtype or torch.promote_types(values.dtype, self._dtype) != self._dtype:
            dst.add_(values, alpha=weight)  # same dtype, or wider than the accumulator (rare)
            return
        # Exact upcast into a reused buffer, then a same-dtype add_ (see _CONVERT_CHUNK).
        scratch = self._scratch_for(n)
        for lo in range(0, n, _CONVERT_CHUNK):
            hi = min(lo + _CONVERT_CHUNK, n)
            buf = scratch[: hi - lo]
            buf.copy_(values[lo:hi])
            dst[lo:hi].add_(buf, alpha=weight)

    def add_weight(self, n: float) -> None:
        """Register one accepted contribution of weight ``n`` (call once per contribution).

        Raises:
            ValueError: If ``n`` is negative or not finite.
            RuntimeError: After ``mean()``.
        """
        self._check_live("add_weight")
        if not (math.isfinite(n) and n >= 0):
            raise ValueError(f"contribution weight must be finite and >= 0, got {n}")
        self._total_weight += n
        self._count += 1

    def mean(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, Σ n_k Δ_k / Σ n_k)`` as fp32, tensor by tensor, in manifest order.

        Each accumulator is released before its result is yielded, so peak memory stays about
        the accumulator's size. Afterwards the object is spent.

        Raises:
            ValueError: If ``total_weight`` is 0 (nothing to average); the object stays usable.
            RuntimeError: If ``mean()`` was already called.
        """
        self._check_live("mean")
        if self._total_weight == 0:
            raise ValueError(
                "total weight is 0: no contribution was registered with add_weight(), nothing to average"
            )
        self._spent = True
        self._scratch = None
        return self._drain(self._total_weight)

    def totals(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, Σ n_k Δ_k)`` as fp32, tensor by tensor, in manifest order: the sum itself,
        not divided (an intermediate aggregator's partial sum, server.upstream.forward).

        As ``mean()``: each accumulator is released as it is yielded (with a ``memory`` lease,
        the fp32 results are views of it until ``release``), and the object is spent afterwards.
        """
        self._check_live("totals")
        self._spent = True
        self._scratch = None
        return self._drain(1.0)  # x / 1.0 is exact: the fp32 sum, or the fp64 one rounded once

    def _drain(self, total_weight: float) -> Iterator[tuple[str, torch.Tensor]]:
        while self._acc:
            name = next(iter(self._acc))
            acc = self._acc.pop(name)
            # In place: one correctly rounded fp64 division, then one rounding to fp32.
            out = acc.div_(total_weight).to(torch.float32)
            del acc
            yield name, out

    def release(self) -> None:
        """Hand the accumulators' memory back for the next round's sum.

        Call only once nothing reads the tensors ``mean()`` yielded any more (they
        are views of that memory); afterwards the object is spent.
        """
        self._spent = True
        self._acc.clear()
        if self._memory is not None and self._lease is not None:
            self._memory.give_back(self._lease)
        self._lease = None

    def _scratch_for(self, n: int) -> torch.Tensor:
        size = min(n, _CONVERT_CHUNK)
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=self._dtype)
        return self._scratch

    def _check_live(self, what: str) -> None:
        if self._spent:
            raise RuntimeError(
                f"WeightedSum.{what}(): mean() was already called; start a new WeightedSum per round"
            )
