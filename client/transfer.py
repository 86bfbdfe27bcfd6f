"""Moving deltas: fetching and applying the global state, pushing a site's delta with resume.

Applying is ``state[name] += diff[name]`` in fp32, tensor by tensor, in the
order the chain arrives: exactly the additions the aggregator made, so a
worker's state equals the aggregator's bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from common.codec import DeltaStreamDecoder, allocate, iter_chunks
from common.codec.decoder import place_piece
from common.delta import Chunk, DeltaHeader, DeltaKind
from common.errors import is_round_over, status_of
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2, federation_pb2_grpc
from common.retry import TRANSIENT, Retrier, RetryPolicy
from common.serde import chunk_from_proto, chunk_to_proto
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


@dataclass(frozen=True, slots=True)
class Synced:
    round: int
    bytes: int
    deltas: int
    snapshot: bool


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
    """

    def __init__(
        self,
        stub: federation_pb2_grpc.FederationStub,
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
            for message in self._stub.FetchDiff(request, metadata=self._metadata, timeout=self._timeout):
                chunk = chunk_from_proto(message)
                if chunk.header is not None:
                    if current is not None:
                        self._finish(current)
                    current = _Incoming(
                        chunk.header, self._state, self.round, partial=bool(self._only), spare=self._spare
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
    """One delta of a FetchDiff stream, decoded as it arrives into buffers apart from the state."""

    def __init__(
        self,
        header: DeltaHeader,
        state: dict[str, torch.Tensor],
        held: int,
        *,
        partial: bool,
        spare: Mapping[str, torch.Tensor],
    ) -> None:
        self.header = header
        self._state = state
        names = {t.name for t in header.layout.manifest}
        if header.kind is DeltaKind.SNAPSHOT:
            known = set(state) | {t.name for t in header.layout.manifest if OPTIMIZER_MARK in t.name}
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
        self.buffers = allocate(header.layout.manifest, reuse=spare)
        self._decoder = DeltaStreamDecoder(into=self.buffers)

    def feed(self, chunk: Chunk) -> None:
        for piece in self._decoder.feed(chunk):
            place_piece(self.buffers[piece.name], piece)

    def apply(self) -> int:
        """Check that the whole delta arrived and decoded, then apply it; returns the round reached."""
        for piece in self._decoder.finish():
            place_piece(self.buffers[piece.name], piece)
        state = self._state
        for spec in self.header.layout.manifest:
            if OPTIMIZER_MARK in spec.name and spec.name not in state:
                state[spec.name] = torch.zeros(spec.shape)
        if self.header.kind is DeltaKind.SNAPSHOT:
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

    def close(self) -> None:
        self._decoder.close()


def push(
    stub: federation_pb2_grpc.FederationStub,
    metadata: tuple[tuple[str, str], ...],
    header: DeltaHeader,
    payload: Path,
    *,
    retrier: Retrier | None = None,
    progress: Callable[[int], None] = lambda n: None,
    timeout: float = 3600,
    resume: bool = False,
) -> federation_pb2.PushReceipt:
    """Stream a payload; after a failure, ask where to resume and send the rest (``retrier``: ``PUSH``).

    ``resume``: the upload may have been started by an earlier process; ask where it stands first.

    Raises:
        RoundOver: the round closed, or the upload is not wanted in it (nothing of it counts).
        grpc.RpcError: a failure ``retrier`` does not retry, or the last once it gives up.
    """
    resuming = resume
    # The offset the aggregator last said it committed: the retrier's sign that the push is moving
    # (bytes merely handed to gRPC are no sign: a try may queue some before it finds the link down).
    committed = [0]

    def attempt() -> federation_pb2.PushReceipt:
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
            logger.info(
                "[upload] resuming %s at offset %d of %d (what the aggregator committed)",
                header.upload_id,
                start,
                header.layout.total_bytes,
            )
        resuming = True
        try:
            return stub.PushDelta(
                _messages(header, payload, start, progress), metadata=metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            if is_round_over(exc) or status_of(exc) is grpc.StatusCode.FAILED_PRECONDITION:
                raise RoundOver(exc.details() or "") from None
            raise

    return (retrier or Retrier(PUSH)).call("upload", attempt, progress=lambda: committed[0])


def _messages(
    header: DeltaHeader, payload: Path, start: int, progress: Callable[[int], None]
) -> Iterator[delta_pb2.DeltaChunk]:
    # The generator owns the file: gRPC reads it on a thread of its own, which may still be between
    # two chunks when the call has failed, so the file must not be closed under it by the caller.
    with payload.open("rb") as source:
        for chunk in iter_chunks(header, source, start=start):
            progress(len(chunk.data))
            yield chunk_to_proto(chunk)
