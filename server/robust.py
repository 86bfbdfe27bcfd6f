"""Robust aggregation rules: coordinate-wise trimmed mean and median, from the accepted uploads' spools.

    trimmed_mean   per coordinate j, sort the K values Δ_(1)[j] ≤ … ≤ Δ_(K)[j] of the round's
                   uploads, drop t at each end, and average the K − 2t left:
                   t = aggregation.trim_count, or ⌊aggregation.trim_fraction · K⌋
    median         the same with t = ⌊(K − 1)/2⌋: the middle value, or the mean of the two middle ones

t is capped at ⌊(K − 1)/2⌋, so at least one value is left (a warning says so). The result is the
round's mean delta Δ̄: the server optimizer (FedAvg, FedAdam...) steps with it as with the mean.

**Weighting.** Unweighted: each accepted upload counts once per coordinate, whatever its
``sample_count`` (weighted by it, one site claiming many samples could own the median). Each upload
enters clipped as the round's bounds say, min(1, clip/‖Δ_i‖)·Δ_i (server.influence). In a FedCyBGD
``agg`` round a tensor is ranked over the uploads that carry it, and is 0 where none does.

**Cost.** These rules cannot stream: a coordinate's result needs all K of its values. At the close
the accepted uploads are read back from their spools a group of tensors at a time: consecutive
tensors whose K copies fit ``aggregation.buffer_bytes``, a tensor larger than that alone. Peak memory
is max(buffer_bytes, 4 · K · the largest tensor's elements) bytes, plus a sort workspace of about
4M values · 12 bytes, plus the published difference (the model's size in fp32, as for every rule),
never K times the model. Each upload's shards are decoded about once (a shard across two groups
twice; a lossy upload once per group, its compact parts expanded whole). The sort dominates:
on 2 cores, 0.5 s per 4M coordinates for K = 10, 5 s for K = 32 (an idle machine); the close of
a 16.8M-element model with K = 10 took 35 s on a shared, heavily loaded one, against under a
second for the streaming mean. Opt in where robustness is worth that.

**Determinism.** The kept values are summed in sorted order in fp64, then rounded to fp32 once: the
result does not depend on the order the uploads were accepted in, and a round rebuilt after a
restart publishes the same state. (With t = 0 nothing is sorted: the unweighted mean, summed in
acceptance order, which a rebuild keeps.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from common.codec import validate_layout
from common.codec.compact import CompactAssembler, plan
from common.codec.decoder import ShardDecoder
from common.delta import PayloadLayout, TensorSpec
from common.dtypes import DType
from server.config import AggregationConfig, AggregationRule
from server.influence import RoundBounds
from server.privacy import RoundPrivacy
from server.publish import measure
from server.records import RoundRecord, RunRecord, UploadRecord
from server.spool import Spool
from server.spooled import spooled_upload

logger = logging.getLogger(__name__)

# Values sorted at a time: the sort's workspace (values and int64 indices) stays near 48 MiB.
_SORT_ELEMENTS = 1 << 22


@dataclass(frozen=True, slots=True)
class Combined:
    """How a round's uploads were combined, as the round's record (and the run's, with DP) keep it."""

    rule: str  # mean, trimmed_mean, median; svd (FlexLoRA)
    trimmed: int = 0  # values dropped per side and coordinate
    privacy: RoundPrivacy | None = None  # the noise added and the epsilon spent (DP rounds)

    def note(self, record: RoundRecord, run: RunRecord) -> None:
        """Write it into the published round's record and the run's."""
        record.aggregation_rule = self.rule
        record.trimmed_per_side = self.trimmed
        p = self.privacy
        if p is not None:
            record.dp_noise_multiplier, record.dp_noise_std = p.noise_multiplier, p.noise_std
            record.dp_sample_rate, record.dp_epsilon = p.sample_rate, p.epsilon
        self.note_run(run)

    def note_run(self, run: RunRecord) -> None:
        """The privacy spent by the run so far, with DP (nothing otherwise)."""
        p = self.privacy
        if p is not None:
            run.dp_epsilon, run.dp_delta = p.epsilon, p.delta
            run.dp_noise_multiplier, run.dp_rounds = p.noise_multiplier, p.rounds


@dataclass(frozen=True, slots=True)
class RankedUpload:
    """An accepted upload as a robust rule reads it: its spool, its layout (recorded at acceptance),
    its clip factor."""

    upload_id: str
    layout: PayloadLayout
    scale: float = 1.0  # min(1, clip/‖Δ‖)


def ranked_uploads(
    accepted: Sequence[UploadRecord],
    norms: dict[str, float],
    bounds: RoundBounds,
    spool: Spool,
    manifest: Sequence[TensorSpec],
) -> list[RankedUpload]:
    """The accepted uploads with their clip factors; an upload whose norm is not in ``norms`` (a failed
    attempt dropped the round's accumulation) is measured from its spool, and its norm added there."""
    uploads = []
    for u in accepted:
        layout = spooled_upload(u).layout
        if u.upload_id not in norms:
            norms[u.upload_id] = measure(u.upload_id, layout, spool, manifest)
        uploads.append(RankedUpload(u.upload_id, layout, bounds.scale(norms[u.upload_id])))
    if uploads:
        logger.info(
            "[round] round=%d: %d upload(s) to rank, read back from their spools",
            accepted[0].round,
            len(uploads),
        )
    return uploads


def trim_per_side(config: AggregationConfig, uploads: int) -> int:
    """How many values of each coordinate the rule drops at each end, for ``uploads`` values."""
    most = max(0, (uploads - 1) // 2)
    if config.rule is AggregationRule.MEDIAN:
        return most
    if config.rule is AggregationRule.TRIMMED_MEAN:
        wanted = config.trim_count or math.floor(config.trim_fraction * uploads)
        return min(wanted, most)
    return 0


def robust_means(
    uploads: Sequence[RankedUpload],
    spool: Spool,
    manifest: Sequence[TensorSpec],
    config: AggregationConfig,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, Δ̄)`` for every tensor of ``manifest``, in its order, fp32, under ``config``'s rule.

    Raises:
        RuntimeError: a spool no longer holds all of an accepted upload (it was checked when it was
            accepted, so the disk changed under it); the publication fails and is tried again.
    """
    dense = tuple(TensorSpec(t.name, DType.F32, t.shape) for t in manifest)
    readers = [_Reader(u, spool, dense) for u in uploads]
    holders = {t.name: [r for r in readers if t.name in r.names] for t in dense}
    capped = {trim_per_side(config, len(h)) for h in holders.values() if h}
    wanted = config.trim_count or math.floor(config.trim_fraction * len(uploads))
    if config.rule is AggregationRule.TRIMMED_MEAN and wanted > min(capped, default=wanted):
        logger.warning(
            "[round] trimmed mean: %d upload(s) leave room to drop %d value(s) per side, not %d",
            len(uploads),
            min(capped),
            wanted,
        )
    for group in _groups(dense, {n: len(h) for n, h in holders.items()}, config.buffer_bytes):
        stacks = {t.name: torch.empty((len(holders[t.name]), t.numel), dtype=torch.float32) for t in group}
        rows_of: dict[_Reader, dict[str, torch.Tensor]] = {}
        for t in group:
            for k, reader in enumerate(holders[t.name]):
                rows_of.setdefault(reader, {})[t.name] = stacks[t.name][k]
        for reader, rows in rows_of.items():
            reader.read_into(rows)
        for t in group:
            stack = stacks.pop(t.name)
            if not stack.shape[0]:
                yield t.name, torch.zeros(t.shape, dtype=torch.float32)
                continue
            yield t.name, ranked_mean(stack, trim_per_side(config, stack.shape[0])).view(t.shape)
            del stack


def ranked_mean(stack: torch.Tensor, trim: int) -> torch.Tensor:
    """Per column of ``stack`` [K, n]: the mean of its values once the ``trim`` lowest and highest are
    dropped (fp64 sum in sorted order, rounded to fp32 once)."""
    count, n = stack.shape
    keep = count - 2 * trim
    out = torch.empty(n, dtype=torch.float32)
    cols = max(1, _SORT_ELEMENTS // max(1, count))
    for lo in range(0, n, cols):
        block = stack[:, lo : lo + cols]
        if trim:
            block = torch.sort(block.contiguous(), dim=0).values[trim : count - trim]
        total = block[0].to(torch.float64)
        for i in range(1, keep):  # row by row: a fixed order of additions
            total += block[i]
        out[lo : lo + cols] = total.div_(keep)
    return out


def _groups(manifest: Sequence[TensorSpec], counts: dict[str, int], budget: int) -> list[list[TensorSpec]]:
    """Consecutive tensors whose K fp32 copies fit ``budget`` together (at least one per group)."""
    groups: list[list[TensorSpec]] = [[]]
    used = 0
    for t in manifest:
        size = 4 * t.numel * counts[t.name]
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += size
    return [g for g in groups if g]


class _Reader:
    """One accepted upload's spool, read back tensor group by tensor group."""

    def __init__(self, upload: RankedUpload, spool: Spool, manifest: Sequence[TensorSpec]) -> None:
        layout = upload.layout
        validate_layout(layout)
        self.upload = upload
        self._spool = spool
        self._manifest = manifest
        carried = {t.name for t in layout.manifest}
        # Wire tensor name -> the round tensor it is (a part of); lossy tensors travel as several.
        self._source_of = {
            part.name: source.name for source in plan(manifest, layout.codec) for part in source.parts
        }
        self.names = {self._source_of[n] for n in carried if n in self._source_of}

    def read_into(self, rows: dict[str, torch.Tensor]) -> None:
        """Fill each ``rows[name]`` (flat fp32) with the upload's tensor ``name``, clipped."""
        layout = self.upload.layout
        assembler = CompactAssembler(layout, self._manifest)  # checks the layout against the round's
        decoder = ShardDecoder(layout.spec)
        offsets = layout.shard_offsets()
        filled = dict.fromkeys(rows, 0)
        for index, shard in enumerate(layout.shards):
            names = {self._source_of.get(layout.manifest[p.tensor].name) for p in shard.pieces}
            if not names & filled.keys():
                continue
            data = self._spool.read(self.upload.upload_id, offsets[index], shard.compressed_bytes)
            for tensor in assembler.add(decoder.decode(index, shard, data)):
                row = rows.get(tensor.name)
                if row is None:
                    continue
                for start, values in tensor.ranges():
                    row[start : start + values.numel()].copy_(values)
                    filled[tensor.name] += values.numel()
        short = [n for n, got in filled.items() if got != rows[n].numel()]
        if short:
            raise RuntimeError(
                f"upload {self.upload.upload_id!r}: its spool gave {filled[short[0]]} of "
                f"{rows[short[0]].numel()} values of {short[0]!r}; it cannot be read back"
            )
        if self.upload.scale != 1.0:
            for row in rows.values():
                row.mul_(self.upload.scale)
