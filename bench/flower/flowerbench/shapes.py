# mypy: ignore-errors
# (runs in its own venv under bench/, where flwr / nvflare live; the project's .venv has neither)
"""GPT-2 small's parameter shapes (a copy of bench.workload.gpt2_small_shapes: this runs in Flower's venv)."""

from __future__ import annotations

import numpy as np

STEP_STD = 1e-4
STEP_ELEMENTS = 1 << 22


def gpt2_small_shapes(quick: bool = False) -> list[tuple[int, ...]]:
    """The 148 shapes of GPT-2 small in HF order; ``quick``: every 8th one, as our benches."""
    d, ff, vocab, ctx = 768, 3072, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    shapes += [(d,), (d,)]
    if quick:
        shapes = [s for i, s in enumerate(shapes) if i % 8 == 0]
    return shapes


def initial_arrays(quick: bool) -> list[np.ndarray]:
    """Weights of std 0.02, fp32."""
    rng = np.random.default_rng(1)
    return [(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)) for s in gpt2_small_shapes(quick)]


def fixed_step(seed: int) -> np.ndarray:
    """The fixed local step: 16 MiB of Gaussian noise of std 1e-4, reused across tensors."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(STEP_ELEMENTS, dtype=np.float32) * np.float32(STEP_STD)


def add_step(arrays: list[np.ndarray], step: np.ndarray) -> None:
    """``a += step`` in place, tensor by tensor: the trivial "training" every system does."""
    for a in arrays:
        flat = a.reshape(-1)
        for lo in range(0, flat.size, STEP_ELEMENTS):
            hi = min(lo + STEP_ELEMENTS, flat.size)
            flat[lo:hi] += step[: hi - lo]
