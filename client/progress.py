"""Progress bars for local training and transfers (tqdm on stderr); silent with --quiet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    """Hands out progress callbacks; with ``quiet`` they do nothing."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self._bar: Any = None

    def steps(self, description: str, total: int) -> Callable[[float], None]:
        """A callback to call after each step with its loss."""
        if self.quiet:
            return lambda loss: None
        from tqdm import tqdm

        self._bar = bar = tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)

        def update(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        return update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @contextmanager
    def bytes(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A callback to call with the size of each chunk moved."""
        if self.quiet:
            yield lambda n: None
            return
        from tqdm import tqdm

        with tqdm(
            total=total,
            desc=description,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            leave=False,
            dynamic_ncols=True,
        ) as bar:

            def update(n: int) -> None:
                bar.update(n)

            yield update
