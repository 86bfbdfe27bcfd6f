"""Moving deltas: fetching and applying the global state, pushing a site's delta with resume.

Applying is ``state[name] += diff[name]`` in fp32, tensor by tensor, in the
order the chain arrives: exactly the additions the aggregator made, so a
worker's state equals the aggregator's bit for bit.

A delta is decoded as it arrives and written to a spool file (raw values,
piece by piece); once all of it has arrived and checked, the spool is read
back a few MiB at a time and added into the state in place. No full-size
buffer exists on the host: the state is the one copy (docs/worker.md).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
import torch

from client.delta_stub import DeltaStub
from common.codec import DeltaStreamDecoder, allocate, iter_chunks
from common.codec.decoder import DecodedPiece, place_piece
from common.delta import MIB, Chunk, DeltaHeader, DeltaKind, PayloadLayout
from common.errors import is_round_over, reason_of, status_of
from common.pb.gradualdiff.v1 import federation_pb2
from common.retry import TRANSIENT, Retrier, RetryPolicy
from common.spec import OPTIMIZER_MARK

logger = logging.getLogger(__name__)

# Worth another try for a worker: the aggregator away, slow or busy (common.retry.TRANSIENT:
# UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED), a restart of the aggregator (which a call may
# see as CANCELLED or INTERNAL), a stream cut mid-way (ABORTED; a closed round is told apart first,
# by ``is_round_over``), damaged bytes (DATA_LOSS). RESOURCE_EXHAUSTED is also what the aggregator
# answers to an upload over a limit (LimitExceeded), which no retry changes: the policy gives that
# code only a few tries (RetryPolicy.limited_on).
RESUMABLE: frozenset[grpc.StatusCode] = TRANSIENT | frozenset(
    {
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
    }
)
# The longest a worker waits for an aggregator that is away, per call, by default (gdfed work
# --max-wait-s): an aggregator restarting, or upgraded, is back well within it.
MAX_WAIT_S = 600.0
# An upload: waits of up to 30 s, for up to MAX_WAIT_S from the failure; a try that moved bytes
# starts the bound again (one try of a large payload may itself take long).
PUSH = RetryPolicy(max_delay=30.0, max_elapsed=MAX_WAIT_S, retry_on=RESUMABLE)
# How much of a spooled delta is read back and applied at a time: the host's working memory while
# applying, whatever the size of a tensor.
APPLY_BYTES = 4 * MIB
# A spooled delta decodes each shard as soon as it has arrived, one at a time: one compressed and one
# decoded shard in memory instead of up to three and two (DeltaStreamDecoder.MAX_PENDING), at the
# cost of receiving and decoding in turn. GPT-2 small's first fetch: ~120 MB above the state
# instead of ~210 MB (bench.worker, docs/worker.md).
SPOOL_PENDING = 0


@dataclass(frozen=True, slots=True)
class Synced:
    round: int
    bytes: int
    deltas: int
    snapshot: bool


# Times a push asks the offset again after WRONG_OFFSET before the error counts as the push's.
OFFSET_RACES = 3


class RoundOver(Exception):
    """The round this upload was for is closed; the worker moves on to the next."""


class Sync:
    """Fetches and applies the global state; calling it again after a failure resumes safely.

    A FetchDiff stream carries a chain of deltas. Each is decoded as its chunks
    arrive (download and decoding overlap, and the compressed bytes are never
    all held) into buffers of its own, and applied to ``state`` only once all
    of it has decoded and checked: a delta is applied whole or not at all.
    ``round`` advances as each one is applied, so when the stream breaks after
    some deltas, the next call asks for the rest from there; starting again
    from the round first held would add those differences twice.

    ``spare``: tensors the caller no longer needs (a worker's last upload),
    decoded into where they fit the manifest instead of fresh memory; the
    buffers of each applied difference are reused for the next one in the
    chain. Fresh memory costs a page fault per page, and on VMs that return
    freed pages to their host much more (docs/performance.md).

    Without ``spare`` (a worker keeps none: docs/worker.md), each delta is
    decoded into a spool file in ``spool_dir`` (the system's temporary
    directory when None; a worker gives its state directory) and applied from
    it a few MiB at a time: working memory of a few shards, not a delta.
    """

    def __init__(
        self,
        stub: DeltaStub,
        metadata: tuple[tuple[str, str], ...],
        site_id: str,
        held_round: int,
        state: dict[str, torch.Tensor],
        *,
        snapshot: bool = False,
        only_prefixes: Sequence[str] = (),
        progress: Callable[[int], None] = lambda n: None,
        timeout: float = 3600,
        spare: Mapping[str, torch.Tensor] | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._site_id = site_id
        self._state = state
        self._want_snapshot = snapshot
        self._only = tuple(only_prefixes)
        self._progress = progress
        self._timeout = timeout
        self._spare: Mapping[str, torch.Tensor] = spare or {}
        self._spool_dir = spool_dir
        self.round = held_round
        self.bytes = 0
        self.deltas = 0
        self.snapshot = False

    def __call__(self) -> Synced:
        request = federation_pb2.FetchDiffRequest(
            site_id=self._site_id,
            have_round=self.round,
            snapshot=self._want_snapshot and not self.snapshot,
            only_prefixes=list(self._only),
        )
        current: _Incoming | None = None
        try:
            # Each chunk's data is a view of its message (client.delta_stub), gone with the chunk.
            for chunk in self._stub.FetchDiff(request, metadata=self._metadata, timeout=self._timeout):
                if chunk.header is not None:
                    if current is not None:
                        self._finish(current)
                    current = _Incoming(
                        chunk.header,
                        self._state,
                        self.round,
                        partial=bool(self._only),
                        spare=self._spare,
                        spool_dir=self._spool_dir,
                    )
                    self._spare = {}  # the decode owns them now
                assert current is not None
                current.feed(chunk)
                self.bytes += len(chunk.data)
                self._progress(len(chunk.data))
            if current is not None:
                self._finish(current)
                current = None
        finally:
            if current is not None:
                current.close()
        return Synced(self.round, self.bytes, self.deltas, self.snapshot)

    def _finish(self, incoming: _Incoming) -> None:
        self.round = incoming.apply()
        self.snapshot |= incoming.header.kind is DeltaKind.SNAPSHOT
        self.deltas += 1
        if incoming.header.kind is DeltaKind.DIFF:
            # Added into the state, not adopted by it (a snapshot may hand its buffers to the
            # state): free for the next difference of the chain.
            self._spare = incoming.buffers


class _Incoming:
    """One delta of a FetchDiff stream, decoded as it arrives apart from the state.

    Into ``spare`` buffers (of the manifest's tensors) when the caller has them, else into a
    spool file of the pieces' raw values, in the order they decode.
    """

    def __init__(
        self,
        header: DeltaHeader,
        state: dict[str, torch.Tensor],
        held: int,
        *,
        partial: bool,
        spare: Mapping[str, torch.Tensor],
        spool_dir: Path | None = None,
    ) -> None:
        self.header = header
        self._state = state
        names = {t.name for t in header.spec.manifest}
        if header.kind is DeltaKind.SNAPSHOT:
            known = set(state) | {t.name for t in header.spec.manifest if OPTIMIZER_MARK in t.name}
            if names != known and not (partial and names <= known):
                raise ValueError(
                    f"snapshot of round {header.round} has other tensors than this worker trains"
                )
        else:
            if header.base_round != held:
                raise ValueError(
                    f"difference of round {header.round} applies to round {header.base_round}; "
                    f"this worker holds {held}"
                )
            # Optimizer state travelling with FedCyBGD blocks is zero at round 0: a worker that started
            # from its own copy of the base model holds none of it yet.
            if not {n for n in names if OPTIMIZER_MARK not in n} <= set(state):
                raise ValueError(
                    f"difference of round {header.round} names tensors this worker does not train"
                )
        self.buffers: dict[str, torch.Tensor] = {}
        self._spool: _Spool | None = None
        if spare:
            self.buffers = allocate(header.spec.manifest, reuse=spare)
            self._decoder = DeltaStreamDecoder(into=self.buffers)
        else:
            self._spool = _Spool(spool_dir)
            self._decoder = DeltaStreamDecoder(max_pending=SPOOL_PENDING)

    def feed(self, chunk: Chunk) -> None:
        self._place(self._decoder.feed(chunk))

    def _place(self, pieces: list[DecodedPiece]) -> None:
        for piece in pieces:
            if self._spool is not None:
                self._spool.write(piece)
            else:
                place_piece(self.buffers[piece.name], piece)

    def apply(self) -> int:
        """Check that the whole delta arrived and decoded, then apply it; returns the round reached."""
        self._place(self._decoder.finish())
        state = self._state
        for spec in self.header.spec.manifest:
            if OPTIMIZER_MARK in spec.name and spec.name not in state:
                state[spec.name] = torch.zeros(spec.shape)
        if self._spool is not None:
            self._apply_spooled(self._spool)
        elif self.header.kind is DeltaKind.SNAPSHOT:
            for name, value in self.buffers.items():
                # The held state mirrors the aggregator's, which may differ in shape from what this
                # site's model trains (FlexLoRA: rank-R adapters, sliced to the site's rank per round).
                if tuple(state[name].shape) == tuple(value.shape):
                    state[name].copy_(value)
                else:
                    state[name] = value.to(state[name].dtype)
        else:
            for name, value in self.buffers.items():
                state[name].add_(value.to(state[name].dtype))
        return self.header.round

    def _apply_spooled(self, spool: _Spool) -> None:
        state, snapshot = self._state, self.header.kind is DeltaKind.SNAPSHOT
        for spec in self.header.spec.manifest:
            held = state[spec.name]
            if snapshot and tuple(held.shape) != tuple(spec.shape):
                # As with buffers: the snapshot's shape wins (FlexLoRA's rank-R adapters).
                state[spec.name] = torch.empty(spec.shape, dtype=held.dtype)
            elif not held.is_contiguous():
                state[spec.name] = held.contiguous()
        for name, start, values in spool.read_back():
            target = state[name].view(-1)[start : start + values.numel()]
            if snapshot:
                target.copy_(values)
            else:
                target.add_(values.to(target.dtype))
        spool.close()

    def close(self) -> None:
        self._decoder.close()
        if self._spool is not None:
            self._spool.close()


class _Spool:
    """The decoded pieces of one delta, as raw bytes in an anonymous file, read back a slice at a time."""

    def __init__(self, directory: Path | None) -> None:
        # Unlinked at once: nothing is left behind by a worker that dies mid-fetch.
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by close())
        self._pieces: list[tuple[str, int, int, torch.dtype]] = []

    def write(self, piece: DecodedPiece) -> None:
        count = piece.values.numel()
        if count:
            self._file.write(piece.values.view(torch.uint8).numpy().data)
            self._pieces.append((piece.name, piece.start, count, piece.values.dtype))

    def read_back(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(name, first element, values) for every piece in the order written, <= APPLY_BYTES each.

        The values live in one reused buffer: each is valid until the next is taken.
        """
        self._file.flush()
        self._file.seek(0)
        buffer = np.empty(APPLY_BYTES, dtype=np.uint8)
        for name, start, count, dtype in self._pieces:
            size = torch.empty(0, dtype=dtype).element_size()
            step = APPLY_BYTES // size
            for first in range(0, count, step):
                n = min(step, count - first)
                view = buffer[: n * size]
                self._read_exactly(view.data, name)
                yield name, start + first, torch.from_numpy(view).view(dtype)

    def _read_exactly(self, into: memoryview, name: str) -> None:
        done = 0
        while done < len(into):
            got = self._file.readinto(into[done:])
            if not got:
                raise OSError(f"the spool of {name!r} ended early")
            done += got

    def close(self) -> None:
        self._file.close()


class Outbound(Protocol):
    """A payload a push streams: stored whole (StoredPayload) or still being encoded (GrowingPayload)."""

    @property
    def layout(self) -> PayloadLayout | None:
        """The whole payload's layout once it is all written; None while it is still growing."""
        ...

    def chunks(self, header: DeltaHeader, *, start: int = 0) -> Iterator[Chunk]:
        """The payload's chunks from offset ``start``, the first carrying ``header``."""
        ...


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """A payload already written whole to ``path`` (an upload resumed by a restarted worker)."""

    path: Path
    layout: PayloadLayout

    def result(self) -> PayloadLayout:
        """The layout (as GrowingPayload's owner answers once its encoder is done)."""
        return self.layout

    def chunks(self, header: DeltaHeader, *, start: int = 0) -> Iterator[Chunk]:
        # The generator owns the file: gRPC reads it on a thread of its own, which may still be
        # between two chunks when the call has failed, so the file must not be closed under it.
        with self.path.open("rb") as source:
            yield from iter_chunks(header, self.layout, source, start=start)


def payload_chunks(payload: Outbound, header: DeltaHeader, start: int) -> Iterator[Chunk]:
    """What one try of a push sends: ``payload`` from ``start`` (the fault tests slow it down here)."""
    return payload.chunks(header, start=start)


def push(
    stub: DeltaStub,
    metadata: tuple[tuple[str, str], ...],
    header: DeltaHeader,
    payload: Outbound,
    *,
    retrier: Retrier | None = None,
    progress: Callable[[int], None] = lambda n: None,
    timeout: float = 3600,
    resume: bool = False,
) -> federation_pb2.PushReceipt:
    """Stream a payload; after a failure, ask where to resume and send the rest (``retrier``: ``PUSH``).

    ``payload`` may still be growing: each try sends what is written and waits for the rest, and
    a resume may start anywhere in it, also past what is written so far.
    ``resume``: the upload may have been started by an earlier process; ask where it stands first.

    Raises:
        RoundOver: the round closed, or the upload is not wanted in it (nothing of it counts).
        grpc.RpcError: a failure ``retrier`` does not retry, or the last once it gives up.
        Exception: whatever reading ``payload`` raised (the encoder's error), as it was raised.
    """
    resuming = resume
    # The offset the aggregator last said it committed: the retrier's sign that the push is moving
    # (bytes merely handed to gRPC are no sign: a try may queue some before it finds the link down).
    committed = [0]

    def attempt() -> federation_pb2.PushReceipt:
        # WRONG_OFFSET: another stream of this upload (one the link cut, still draining on the
        # aggregator) committed more after we asked; ask again rather than give the upload up.
        for _ in range(OFFSET_RACES):
            try:
                return stream()
            except grpc.RpcError as exc:
                if reason_of(exc) != "WRONG_OFFSET":
                    raise
                logger.info("[upload] %s: %s; asking the offset again", header.upload_id, exc.details())
        return stream()

    def stream() -> federation_pb2.PushReceipt:
        nonlocal resuming
        start = 0
        if resuming:
            offset = stub.GetUploadOffset(
                federation_pb2.UploadOffsetRequest(site_id=header.site_id, upload_id=header.upload_id),
                metadata=metadata,
                timeout=30,
            )
            if offset.complete:
                return federation_pb2.PushReceipt(
                    upload_id=header.upload_id, round=header.round, accepted=True, duplicate=True
                )
            start = committed[0] = offset.committed_offset
            layout = payload.layout
            logger.info(
                "[upload] resuming %s at offset %d of %s (what the aggregator committed)",
                header.upload_id,
                start,
                layout.total_bytes if layout is not None else "a payload still being encoded",
            )
        resuming = True
        failed: list[BaseException] = []
        try:
            return stub.PushDelta(
                _messages(payload, header, start, progress, failed), metadata=metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            if failed:
                # gRPC cancels the call when the request iterator raises; what matters is why.
                raise failed[0] from None
            over = is_round_over(exc) or status_of(exc) is grpc.StatusCode.FAILED_PRECONDITION
            if over and reason_of(exc) != "WRONG_OFFSET":
                raise RoundOver(exc.details() or "") from None
            raise

    return (retrier or Retrier(PUSH)).call("upload", attempt, progress=lambda: committed[0])


def _messages(
    payload: Outbound,
    header: DeltaHeader,
    start: int,
    progress: Callable[[int], None],
    failed: list[BaseException],
) -> Iterator[Chunk]:
    try:
        for chunk in payload_chunks(payload, header, start):
            progress(len(chunk.data))
            yield chunk
    except Exception as exc:
        failed.append(exc)
        raise
