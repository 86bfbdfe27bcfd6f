"""Turning a closed round's sum into the next global state: difference, state file, snapshot.

    mean  = Σ n_i Δ_i / Σ n_i                      (server.aggregate.WeightedSum)
    D_r   = optimizer(mean)                         (FedAvg: D_r = lr · mean)
    θ_r   = θ_{r-1} + decode(encode(D_r))           (what every worker will compute, bit for bit)

D_r is stored as an encoded payload (what FetchDiff streams), θ_r as a plain
safetensors file (the base of the next round) and as an encoded snapshot
(what a site without history fetches). Everything is done tensor by tensor;
the accumulator is freed as the difference is formed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from common.buffers import ReusableBuffer
from common.codec import BROADCAST_SHARD_BYTES, decode_file, encode, validate_layout
from common.codec.compact import CompactAssembler, is_lossy
from common.codec.decoder import DecodedPiece, ShardDecoder
from common.delta import Cast, Codec, DeltaHeader, DeltaKind, PayloadLayout, TensorSpec
from common.dtypes import DType
from common.files import rewrite
from common.serde import header_to_proto, layout_to_bytes
from common.statefile import StateReader, write_state
from server.accumulation import Accumulation
from server.blobs import BlobStore
from server.influence import squared_norm
from server.optimizers import ServerOptimizer
from server.spool import Spool
from server.spooled import SpooledUpload


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """An encoded payload in the blob store, with its serialized header and layout (what
    FetchDiff cuts its chunks and shard specs by)."""

    blob: str
    header: bytes
    nbytes: int
    layout: bytes


@dataclass(frozen=True, slots=True)
class Published:
    diff: StoredPayload
    state_blob: str
    seconds: float


class LazyState(Mapping[str, torch.Tensor]):
    """A state file seen as a mapping that reads each tensor only when asked."""

    def __init__(self, reader: StateReader) -> None:
        self._reader = reader
        self._names = [t.name for t in reader.manifest]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._reader.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def store_payload(
    blobs: BlobStore,
    tensors: Mapping[str, torch.Tensor],
    codec: Codec,
    *,
    run_id: str,
    round_number: int,
    base_round: int,
    kind: DeltaKind,
    manifest: Sequence[TensorSpec] | None = None,
) -> tuple[StoredPayload, PayloadLayout]:
    """Encode ``tensors`` into the blob store, with the header a FetchDiff stream will carry.

    Written over a spent blob's blocks when the store has one (a round's
    difference takes the place of one the collector dropped).
    """
    temp = blobs.temp_path(".payload")
    with _removed_on_error(temp), rewrite(temp, blobs.recycler) as sink:
        layout = encode(tensors, codec, sink, manifest=manifest, shard_bytes=BROADCAST_SHARD_BYTES)
    blob = blobs.adopt(temp, layout.digest.hex())
    header = DeltaHeader(
        spec=layout.spec, run_id=run_id, round=round_number, base_round=base_round, kind=kind
    )
    head = header_to_proto(header).SerializeToString()
    return StoredPayload(blob, head, layout.total_bytes, layout_to_bytes(layout)), layout


def store_initial_state(
    blobs: BlobStore, init: Path, run_id: str
) -> tuple[str, StoredPayload, tuple[TensorSpec, ...]]:
    """Round 0: copy the initial trainable state into the store and encode its snapshot.

    The round-0 snapshot's size also stands in for later snapshots' sizes
    until they are encoded (weights compress alike from round to round).
    """
    reader = StateReader(init)
    temp = blobs.temp_path(".safetensors")
    digest = write_state(temp, reader.manifest, lambda spec: reader.read(spec.name))
    state_blob = blobs.adopt(temp, digest)
    snapshot = store_snapshot(blobs, state_blob, run_id, 0)
    return state_blob, snapshot, StateReader(blobs.path(state_blob)).manifest


def publish(
    *,
    acc: Accumulation,
    optimizer: ServerOptimizer,
    blobs: BlobStore,
    previous_state: str,
    run_id: str,
    round_number: int,
    base_round: int,
    broadcast: Codec,
    scratch: ReusableBuffer | None = None,
) -> Published:
    """Form D_r from the round's sum, store it, and store θ_r = θ_{r-1} + D_r (see publish_diff)."""
    start = time.perf_counter()
    diff: dict[str, torch.Tensor] = {}
    for name, mean in acc.sum.mean():
        diff[name] = optimizer.step(name, mean)
    return publish_diff(
        diff,
        blobs=blobs,
        previous_state=previous_state,
        run_id=run_id,
        round_number=round_number,
        base_round=base_round,
        broadcast=broadcast,
        started=start,
        scratch=scratch,
    )


def publish_diff(
    diff: dict[str, torch.Tensor],
    *,
    blobs: BlobStore,
    previous_state: str,
    run_id: str,
    round_number: int,
    base_round: int,
    broadcast: Codec,
    started: float | None = None,
    scratch: ReusableBuffer | None = None,
) -> Published:
    """Store the global difference D_r and the state θ_r = θ_{r-1} + D_r (``diff`` is consumed).

    With an exact broadcast the state file is written on a thread of its own
    while the difference is encoded: the encoder keeps both cores busy, the
    state writer mostly waits on reads, writes and the fsync, and workers wait
    for the whole publication. (Measured on a GPT-2-small state: encode
    1.2–1.4 s, state write + fsync 0.6–2.3 s.) Both are done before this
    returns, so a published round still names a state file that is on disk.

    The previous state is read one tensor at a time, into ``scratch`` when
    given (a daemon keeps it from round to round: no page faults on it).
    """
    start = time.perf_counter() if started is None else started
    previous = StateReader(blobs.path(previous_state))
    manifest = previous.manifest

    def store_diff() -> tuple[StoredPayload, PayloadLayout]:
        return store_payload(
            blobs,
            diff,
            broadcast,
            run_id=run_id,
            round_number=round_number,
            base_round=base_round,
            kind=DeltaKind.DIFF,
            manifest=fp32_manifest(manifest),
        )

    def store_state(applied: Mapping[str, torch.Tensor]) -> str:
        temp = blobs.temp_path(".safetensors")
        # write_state asks for one tensor at a time and writes it before asking for the next,
        # so one buffer of the largest tensor's size holds each in turn.
        lease = scratch.lease(max((t.nbytes for t in manifest), default=0)) if scratch is not None else None
        try:
            with _removed_on_error(temp):
                digest = write_state(
                    temp,
                    manifest,
                    lambda spec: _apply(previous.read(spec.name, lease), applied[spec.name]),
                    blobs.recycler,
                )
        finally:
            if scratch is not None and lease is not None:
                scratch.give_back(lease)
        return blobs.adopt(temp, digest)

    if broadcast.cast is Cast.NONE:
        # Nothing mutates ``diff`` (the encoder copies what it shuffles; _apply adds into the fresh read).
        with ThreadPoolExecutor(1, thread_name_prefix="gdfed-state") as writer:
            state_future = writer.submit(store_state, diff)
            stored_diff, _ = store_diff()
            state_blob = state_future.result()
    else:
        stored_diff, layout = store_diff()
        # Workers apply the decoded (rounded) difference; so must the state here.
        with blobs.path(stored_diff.blob).open("rb") as source:
            state_blob = store_state(decode_file(source, layout))
    return Published(stored_diff, state_blob, time.perf_counter() - start)


def store_snapshot(blobs: BlobStore, state_blob: str, run_id: str, round_number: int) -> StoredPayload:
    """Encode the state after ``round_number`` as a SNAPSHOT payload (done when first asked for)."""
    state = StateReader(blobs.path(state_blob))
    snapshot, _ = store_payload(
        blobs,
        LazyState(state),
        Codec(),
        run_id=run_id,
        round_number=round_number,
        base_round=0,
        kind=DeltaKind.SNAPSHOT,
        manifest=state.manifest,
    )
    return snapshot


@contextmanager
def _removed_on_error(temp: Path) -> Iterator[None]:
    """Delete the half-written ``temp`` if writing it fails: on a full disk, each failed attempt
    would otherwise take more of the space the next one needs."""
    try:
        yield
    except BaseException:
        for path in (temp, temp.with_name(temp.name + ".tmp")):  # write_state's own temp too
            with suppress(OSError):
                path.unlink(missing_ok=True)
        raise


def _apply(previous: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    # In the state's own dtype, exactly as a worker's `param.add_(diff)` does it.
    return previous.add_(diff.to(previous.dtype))


def fp32_manifest(manifest: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The manifest with every tensor fp32: what deltas and differences of a state travel as."""
    return tuple(TensorSpec(t.name, DType.F32, t.shape) for t in manifest)


def rebuild(
    acc: Accumulation,
    uploads: Sequence[SpooledUpload],
    spool: Spool,
    norms: Mapping[str, float] | None = None,
) -> None:
    """Fold accepted uploads into a fresh accumulation from their spools, in acceptance order.

    Each folds scaled by the round's clipping bound (``acc.bounds``); with clipping on, an
    upload whose norm is not in ``norms`` is read twice: once to measure it, once to fold it.
    An intermediate's partial sum folds with weight 1, never clipped (``Accumulation.mark_partial``).
    """
    for upload in uploads:
        upload_id, layout = upload.upload_id, upload.layout
        validate_layout(layout)
        scale = 1.0
        if upload.partial:
            acc.mark_partial(upload_id)
        elif acc.summing and math.isfinite(acc.bounds.clip):
            known = (norms or {}).get(upload_id)
            norm = known if known is not None else measure(upload_id, layout, spool, acc.manifest)
            scale = acc.bounds.scale(norm)
        for index, pieces in _decoded(upload_id, layout, spool):
            digest = layout.shards[index].digest
            acc.fold(upload_id, index, pieces, upload.sample_count, layout.spec, scale=scale, digest=digest)
        acc.accept(upload_id, upload.sample_count)


def measure(upload_id: str, layout: PayloadLayout, spool: Spool, manifest: Sequence[TensorSpec]) -> float:
    """The global L2 norm of a spooled upload (lossy ones as their dense deltas)."""
    assembler = CompactAssembler(layout, manifest) if is_lossy(layout.codec) else None
    squares = 0.0
    for _, pieces in _decoded(upload_id, layout, spool):
        if assembler is None:
            squares += sum(squared_norm(p.values) for p in pieces)
        else:
            for tensor in assembler.add(pieces):
                squares += sum(squared_norm(values) for _, values in tensor.ranges())
    return math.sqrt(squares)


def _decoded(upload_id: str, layout: PayloadLayout, spool: Spool) -> Iterator[tuple[int, list[DecodedPiece]]]:
    decoder = ShardDecoder(layout.spec)
    offsets = layout.shard_offsets()
    for index, shard in enumerate(layout.shards):
        data = spool.read(upload_id, offsets[index], shard.compressed_bytes)
        yield index, list(decoder.decode(index, shard, data))
