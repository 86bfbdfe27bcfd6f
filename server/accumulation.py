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

Bounded influence (``server.influence``): each upload's global L2 norm is
summed up shard by shard as it folds. Its shards fold at full weight while the
norm so far is within the round's clipping bound; once it is over, the upload
is *held*: nothing more of it is added, and if it is accepted the sum is dirty
and rebuilt at close, where each upload folds as ``n_i · min(1, clip/‖Δ_i‖) · Δ_i``
(its norm now known). Honest rounds pay nothing; a round with a clipped upload
decodes the accepted spools once more. An upload over ``max_norm`` is refused,
and one whose ``n_i·‖Δ_i‖`` would take the sum near the accumulator's range
too: ``Σ n_i·‖Δ_i‖`` bounds every element of the sum, so it cannot overflow.

Partial sums (``mark_partial``; docs/operator.md "A tree of aggregators: the root"): an
intermediate aggregator's upload already holds ``Σ n_i·Δ_i`` of its sites, so it folds with
weight 1 while ``accept`` still adds its ``Σ n_i`` to the round's weight; the mean is
``Σ_all n_i·Δ_i / Σ_all n_i``, as in a flat federation. Its norm is that of a sum, so neither
the clipping bound nor ``max_norm`` applies to it (its intermediate bounds its own sites); the
accumulator's range check (the mass) does, and keeps the sum finite.

A round whose rule is not the mean (``server.robust``: trimmed mean, median) keeps no sum
(``summing=False``) but still ``checks`` every upload as it streams in: decoded, lossy ones
assembled against this manifest, and its norm measured and bounded by ``max_norm``; the close
reads the uploads back from their spools.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from common.buffers import ReusableBuffer
from common.codec.compact import CompactAssembler, is_lossy
from common.codec.decoder import DecodedPiece
from common.delta import PayloadSpec, TensorSpec
from common.errors import InvalidArgument
from server.aggregate import WeightedSum
from server.influence import RoundBounds, squared_norm

ACCUMULATORS = {"fp32": torch.float32, "fp64": torch.float64}
# Σ n_i·‖Δ_i‖ may reach this fraction of the accumulator's largest value: the mean, and the server
# optimizer's arithmetic on it, keep a wide margin.
_MASS_HEADROOM = 2.0**-20
# A weight·clip factor below this (a delta near fp32's limit, clipped) is applied in fp64: in fp32
# it would be subnormal, or zero. Above it, a clipped upload folds as fast as any other.
_TINY_ALPHA = 2.0**-100
_SCALED_CHUNK = 1 << 20  # elements scaled in fp64 per pass


class Accumulation:
    """A WeightedSum for one round, guarded by a lock, with its contributors."""

    def __init__(
        self,
        round_number: int,
        manifest: Sequence[TensorSpec],
        precision: str = "fp32",
        *,
        summing: bool = True,
        checked: bool | None = None,
        uniform: bool = False,
        memory: ReusableBuffer | None = None,
        bounds: RoundBounds | None = None,
    ) -> None:
        if precision not in ACCUMULATORS:
            raise ValueError(f"accumulator must be one of {sorted(ACCUMULATORS)}, got {precision!r}")
        self.round = round_number
        self.precision = precision
        # Not summing (FlexLoRA, whose close reads the spools): shards are still decoded, so every
        # upload is verified as it streams in, but nothing is added and no sum is allocated.
        self.summing = summing
        # Checked (default: when summing): lossy uploads too are assembled against this manifest
        # and measured; FlexLoRA's are not, their shapes are their ranks'.
        self.checked = summing if checked is None else checked
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
        self._folded: dict[str, dict[int, bytes]] = {}  # upload -> shard index -> its spec's digest
        self.accepted: list[str] = []
        self.detached = False
        self.bounds = bounds or RoundBounds()
        self._squares: dict[str, float] = {}  # Σ Δ² of each upload so far (fp64)
        self._held: set[str] = set()  # over the clipping bound while streaming: its folds stopped
        self._partial: set[str] = set()  # intermediates' partial sums: weight 1, not bounded per site
        self._mass = 0.0  # Σ n·scale·‖Δ‖ (so far) of everything added
        self._mass_of: dict[str, float] = {}
        self._mass_limit = torch.finfo(ACCUMULATORS[precision]).max * _MASS_HEADROOM

    def fold(
        self,
        upload_id: str,
        shard: int,
        pieces: Sequence[DecodedPiece],
        weight: int,
        payload: PayloadSpec | None = None,
        *,
        scale: float | None = None,
        digest: bytes = b"",
    ) -> bool:
        """Add ``weight * piece`` for each piece of one shard; False (nothing added) once the round has closed.

        A shard already folded for this upload is skipped: a resumed or restarted
        upload re-sends the same shard and must not count it twice. Since wire
        revision 2 a header no longer names the payload's bytes, so ``digest``
        (the shard spec's) is kept with each fold, and a shard of the same index
        with another digest is refused (``check_refold``).
        ``payload`` (the upload's codec and manifest) is needed when its codec is lossy: the pieces
        are then compact tensors, each folded densified once it is complete.
        ``scale`` (a rebuild, the upload's norm known): fold ``weight·scale·piece``;
        without it, the upload is held once its norm so far is over the clipping bound.

        Raises:
            InvalidArgument: a lossy upload's compact data is invalid (nothing of that tensor is
                added); the upload's norm is over ``max_norm``, or its weighted norm would take
                the sum near the accumulator's range (nothing of this shard is added).
        """
        with self.lock:
            if self.detached:
                return False
            done = self._folded.setdefault(upload_id, {})
            if shard in done:
                _check_same(upload_id, shard, done[shard], digest)
                return True
            done[shard] = digest
            partial = upload_id in self._partial
            weight = 1 if self.uniform or partial else weight
            if not self.checked:
                # Lossy ones too: their tensors may differ in shape from this manifest (FlexLoRA's
                # ranks); the close reads the spools back through common.codec.compact.decode_dense,
                # which checks the compact data against the upload's own manifest. A dense upload's
                # norm is still bounded by max_norm here.
                if payload is None or not is_lossy(payload.codec):
                    self._measure(upload_id, [p.values for p in pieces], bounded=not partial)
                return True
            ranges = (
                self._compact_ranges(upload_id, pieces, payload)
                if payload is not None and is_lossy(payload.codec)
                else [(p.name, p.start, p.values) for p in pieces]
            )
            norm = self._measure(upload_id, [values for _, _, values in ranges], bounded=not partial)
            if not self.summing:
                return True  # a robust rule reads the spools at the close (server.robust)
            if partial:
                scale = 1.0  # its sites were clipped by their intermediate
            elif scale is None:
                if upload_id in self._held or norm > self.bounds.clip:
                    self._held.add(upload_id)  # folded again, scaled, when the round closes
                    return True
                scale = 1.0
            self._add_mass(upload_id, weight * scale * norm)
            alpha = float(weight) * scale
            for name, start, values in ranges:
                if alpha >= _TINY_ALPHA:
                    self.sum.fold(name, start, values, alpha)
                else:
                    self._fold_scaled(name, start, values, alpha)
            return True

    def _compact_ranges(
        self, upload_id: str, pieces: Sequence[DecodedPiece], payload: PayloadSpec
    ) -> list[tuple[str, int, torch.Tensor]]:
        assembler = self._assemblers.get(upload_id)
        if assembler is None:
            assembler = self._assemblers[upload_id] = CompactAssembler(payload, self.manifest)
        ranges = [
            (tensor.name, start, values)
            for tensor in assembler.add(pieces)  # checked before any of it is added
            for start, values in tensor.ranges()
        ]
        if assembler.finished:
            del self._assemblers[upload_id]
        return ranges

    def _measure(self, upload_id: str, values: Sequence[torch.Tensor], *, bounded: bool = True) -> float:
        """Add these values to the upload's squared norm; its norm so far (refused over max_norm if ``bounded``)."""
        squares = self._squares.get(upload_id, 0.0) + sum(squared_norm(v) for v in values)
        self._squares[upload_id] = squares
        norm = math.sqrt(squares)
        if bounded:
            self.bounds.check(upload_id, norm)
        return norm

    def _add_mass(self, upload_id: str, mass: float) -> None:
        total = self._mass + mass - self._mass_of.get(upload_id, 0.0)
        if not total <= self._mass_limit:
            raise InvalidArgument(
                f"upload {upload_id!r}: its weighted norm {mass:.4g} would take the round's sum to "
                f"{total:.4g}, over the {self.precision} accumulator's safe range {self._mass_limit:.4g}",
                field="sample_count",
                limit=self._mass_limit,
            )
        self._mass = total
        self._mass_of[upload_id] = mass

    def _fold_scaled(self, name: str, start: int, values: torch.Tensor, alpha: float) -> None:
        for lo in range(0, values.numel(), _SCALED_CHUNK):
            part = values[lo : lo + _SCALED_CHUNK].to(torch.float64).mul_(alpha)
            self.sum.fold(name, start + lo, part, 1.0)

    def mark_partial(self, upload_id: str) -> None:
        """Take ``upload_id`` as an intermediate's partial sum Σ n_i·Δ_i (before any of it folds).

        Its shards fold with weight 1, unclipped and without ``max_norm``; ``accept`` is still
        given its sample_count Σ n_i, the weight it adds to the round.
        """
        with self.lock:
            self._partial.add(upload_id)

    def accept(self, upload_id: str, weight: int) -> bool:
        """Count a fully folded upload's weight (a partial sum's: its Σ n_i); False once the round has closed."""
        with self.lock:
            if self.detached:
                return False
            self.sum.add_weight(1.0 if self.uniform else float(weight))
            self.accepted.append(upload_id)
            return True

    def norm(self, upload_id: str) -> float:
        """The upload's global L2 norm over what has been decoded of it (0 before anything)."""
        with self.lock:
            return math.sqrt(self._squares.get(upload_id, 0.0))

    def norms(self) -> dict[str, float]:
        """Every measured upload's norm so far (complete for the accepted ones)."""
        with self.lock:
            return {u: math.sqrt(sq) for u, sq in self._squares.items()}

    def folded_shards(self, upload_id: str) -> set[int]:
        with self.lock:
            return set(self._folded.get(upload_id, ()))

    def check_refold(self, upload_id: str, shard: int, digest: bytes) -> bool:
        """Whether shard ``shard`` of ``upload_id`` is folded already (its fold is then skipped).

        Raises:
            InvalidArgument (UPLOAD_ID_REUSED): it was folded with another digest: the upload id
                was restarted with another payload, and what the sum holds of it is not this one.
        """
        with self.lock:
            done = self._folded.get(upload_id, {})
            if shard not in done:
                return False
            _check_same(upload_id, shard, done[shard], digest)
            return True

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
        """Whether uploads that were not accepted left something in the sum, or an accepted one is
        in it unclipped (held: it is not all in it)."""
        with self.lock:
            return bool(set(self._folded) - set(self.accepted)) or bool(self._held & set(self.accepted))


def _check_same(upload_id: str, shard: int, folded: bytes, digest: bytes) -> None:
    if digest != folded:
        raise InvalidArgument(
            f"upload {upload_id!r}: shard {shard} was folded with digest {folded.hex()[:16]}…, and now arrives "
            f"with {digest.hex()[:16]}…: the upload id was started with another payload; use a new id",
            field=f"shards[{shard}].digest",
            reason="UPLOAD_ID_REUSED",
        )
