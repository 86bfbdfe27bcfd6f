"""The open round's running weighted sum, and who has contributed to it.

Shards are folded as they arrive, before their upload is complete; an upload
that then fails (damaged, cut off and never resumed, dropped when the round
closes) leaves part of itself in the sum. The accumulation remembers which
uploads folded anything and which were accepted, so the round knows when
its sum is *dirty* and must be rebuilt from the accepted uploads' spools
before it is published. The global state is never touched by a rejected
upload.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from common.codec.decoder import DecodedPiece
from common.delta import TensorSpec
from server.aggregate import WeightedSum

ACCUMULATORS = {"fp32": torch.float32, "fp64": torch.float64}


class Accumulation:
    """A WeightedSum for one round, guarded by a lock, with its contributors."""

    def __init__(self, round_number: int, manifest: Sequence[TensorSpec], precision: str = "fp32") -> None:
        if precision not in ACCUMULATORS:
            raise ValueError(f"accumulator must be one of {sorted(ACCUMULATORS)}, got {precision!r}")
        self.round = round_number
        self.precision = precision
        self.sum = WeightedSum([(t.name, t.shape) for t in manifest], dtype=ACCUMULATORS[precision])
        self.lock = threading.Lock()
        self._folded: dict[str, set[int]] = {}
        self.accepted: list[str] = []
        self.detached = False

    def fold(self, upload_id: str, shard: int, pieces: Sequence[DecodedPiece], weight: int) -> bool:
        """Add ``weight * piece`` for each piece of one shard; False (nothing added) once the round has closed.

        A shard already folded for this upload is skipped: an upload id names
        one header, and a header's hash tree names every byte, so a resumed or
        restarted upload re-sends the same shard and must not count it twice.
        """
        with self.lock:
            if self.detached:
                return False
            done = self._folded.setdefault(upload_id, set())
            if shard in done:
                return True
            done.add(shard)
            for piece in pieces:
                self.sum.fold(piece.name, piece.start, piece.values, float(weight))
            return True

    def accept(self, upload_id: str, weight: int) -> bool:
        """Count a fully folded upload's weight; False once the round has closed."""
        with self.lock:
            if self.detached:
                return False
            self.sum.add_weight(float(weight))
            self.accepted.append(upload_id)
            return True

    def folded_shards(self, upload_id: str) -> set[int]:
        with self.lock:
            return set(self._folded.get(upload_id, ()))

    def detach(self) -> None:
        """Stop all further folds (waits for one in progress): the round is closing."""
        with self.lock:
            self.detached = True

    @property
    def dirty(self) -> bool:
        """Whether uploads that were not accepted left something in the sum."""
        with self.lock:
            return bool(set(self._folded) - set(self.accepted))
