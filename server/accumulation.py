"""The open round's running weighted sum, and who has contributed to it.

Shards are folded as they arrive, before their upload is complete; an upload
that then fails (damaged, cut off and never resumed, dropped when the round
closes) leaves part of itself in the sum. The accumulation remembers which
uploads folded anything and which were accepted, so the round knows when
its sum is *dirty* and must be rebuilt from the accepted uploads' spools
before it is published. The global state is never touched by a rejected
upload.

A lossy upload (top-k or int8, ``common.codec.compact``) arrives as compact
tensors; each upload gets a CompactAssembler here, which hands a tensor over
(checked) once all of its compact parts have arrived, and it is folded as
``n_i · dense`` range by range. The assembler lives as long as the round's
accumulation, so a cut and resumed stream keeps the parts already received.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from common.buffers import ReusableBuffer
from common.codec.compact import CompactAssembler, is_lossy
from common.codec.decoder import DecodedPiece
from common.delta import PayloadLayout, TensorSpec
from server.aggregate import WeightedSum

ACCUMULATORS = {"fp32": torch.float32, "fp64": torch.float64}


class Accumulation:
    """A WeightedSum for one round, guarded by a lock, with its contributors."""

    def __init__(
        self,
        round_number: int,
        manifest: Sequence[TensorSpec],
        precision: str = "fp32",
        *,
        summing: bool = True,
        uniform: bool = False,
        memory: ReusableBuffer | None = None,
    ) -> None:
        if precision not in ACCUMULATORS:
            raise ValueError(f"accumulator must be one of {sorted(ACCUMULATORS)}, got {precision!r}")
        self.round = round_number
        self.precision = precision
        # Not summing (FlexLoRA, whose close reads the spools): shards are still decoded, so every
        # upload is verified as it streams in, but nothing is added and no sum is allocated.
        self.summing = summing
        # Uniform: every upload weighs 1, not its sample count (FedCyBGD's agg mode: a plain mean).
        self.uniform = uniform
        self.sum = WeightedSum(
            [(t.name, t.shape) for t in manifest] if summing else [],
            dtype=ACCUMULATORS[precision],
            memory=memory,
        )
        self.manifest = tuple(manifest)
        self._assemblers: dict[str, CompactAssembler] = {}  # lossy uploads in progress
        self.lock = threading.Lock()
        self._folded: dict[str, set[int]] = {}
        self.accepted: list[str] = []
        self.detached = False

    def fold(
        self,
        upload_id: str,
        shard: int,
        pieces: Sequence[DecodedPiece],
        weight: int,
        layout: PayloadLayout | None = None,
    ) -> bool:
        """Add ``weight * piece`` for each piece of one shard; False (nothing added) once the round has closed.

        A shard already folded for this upload is skipped: an upload id names
        one header, and a header's hash tree names every byte, so a resumed or
        restarted upload re-sends the same shard and must not count it twice.
        ``layout`` (the upload's) is needed when its codec is lossy: the pieces
        are then compact tensors, each folded densified once it is complete.

        Raises:
            InvalidArgument: a lossy upload's compact data is invalid (nothing of that tensor is added).
        """
        with self.lock:
            if self.detached:
                return False
            done = self._folded.setdefault(upload_id, set())
            if shard in done:
                return True
            done.add(shard)
            weight = 1 if self.uniform else weight
            if not self.summing:
                # Lossy ones too: their tensors may differ in shape from this manifest (FlexLoRA's
                # ranks); the close reads the spools back through common.codec.compact.decode_dense,
                # which checks the compact data against the upload's own manifest.
                return True
            if layout is not None and is_lossy(layout.codec):
                self._fold_compact(upload_id, pieces, weight, layout)
                return True
            for piece in pieces:
                self.sum.fold(piece.name, piece.start, piece.values, float(weight))
            return True

    def _fold_compact(
        self, upload_id: str, pieces: Sequence[DecodedPiece], weight: int, layout: PayloadLayout
    ) -> None:
        assembler = self._assemblers.get(upload_id)
        if assembler is None:
            assembler = self._assemblers[upload_id] = CompactAssembler(layout, self.manifest)
        for tensor in assembler.add(pieces):  # checked before any of it is added
            for start, values in tensor.ranges():
                self.sum.fold(tensor.name, start, values, float(weight))
        if assembler.finished:
            del self._assemblers[upload_id]

    def accept(self, upload_id: str, weight: int) -> bool:
        """Count a fully folded upload's weight; False once the round has closed."""
        with self.lock:
            if self.detached:
                return False
            self.sum.add_weight(1.0 if self.uniform else float(weight))
            self.accepted.append(upload_id)
            return True

    def folded_shards(self, upload_id: str) -> set[int]:
        with self.lock:
            return set(self._folded.get(upload_id, ()))

    def detach(self) -> None:
        """Stop all further folds (waits for one in progress): the round is closing."""
        with self.lock:
            self.detached = True

    def release(self) -> None:
        """Detach, and hand the sum's memory back for the next round (see WeightedSum.release).

        Only once the published difference, which is made of that memory, is
        encoded and applied.
        """
        with self.lock:
            self.detached = True
            self.sum.release()

    @property
    def dirty(self) -> bool:
        """Whether uploads that were not accepted left something in the sum."""
        with self.lock:
            return bool(set(self._folded) - set(self.accepted))
