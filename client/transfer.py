"""Moving deltas: fetching and applying the global state, pushing a site's delta with resume.

Applying is ``state[name] += diff[name]`` in fp32, tensor by tensor, in the
order the chain arrives: exactly the additions the aggregator made, so a
worker's state equals the aggregator's bit for bit.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from common.codec import decode_chunks, iter_chunks
from common.delta import Chunk, DeltaHeader, DeltaKind
from common.pb.gradualdiff.v1 import federation_pb2
from common.serde import chunk_from_proto, chunk_to_proto
from common.spec import OPTIMIZER_MARK

logger = logging.getLogger(__name__)

# Worth another try: the network, a restart of the aggregator, a stream cut mid-way, damaged bytes.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
}


@dataclass(frozen=True, slots=True)
class Synced:
    round: int
    bytes: int
    deltas: int
    snapshot: bool


class RoundOver(Exception):
    """The round this upload was for is closed; the worker moves on to the next."""


def fetch(
    stub: Any,
    metadata: tuple[tuple[str, str], ...],
    site_id: str,
    held_round: int,
    state: dict[str, torch.Tensor],
    *,
    snapshot: bool = False,
    only_prefixes: Sequence[str] = (),
    progress: Callable[[int], None] = lambda n: None,
    timeout: float = 3600,
) -> Synced:
    """Bring ``state`` (held at ``held_round``) to the latest published round, in place.

    With ``only_prefixes`` only those tensors are fetched (a partial snapshot) and overwritten.
    """
    request = federation_pb2.FetchDiffRequest(
        site_id=site_id, have_round=held_round, snapshot=snapshot, only_prefixes=list(only_prefixes)
    )
    current: list[Chunk] = []
    round_number, nbytes, deltas, got_snapshot = held_round, 0, 0, False
    for message in stub.FetchDiff(request, metadata=metadata, timeout=timeout):
        chunk = chunk_from_proto(message)
        if chunk.header is not None and current:
            round_number, was_snapshot = _apply(current, state, round_number, partial=bool(only_prefixes))
            got_snapshot |= was_snapshot
            deltas += 1
            current = []
        current.append(chunk)
        nbytes += len(chunk.data)
        progress(len(chunk.data))
    if current:
        round_number, was_snapshot = _apply(current, state, round_number, partial=bool(only_prefixes))
        got_snapshot |= was_snapshot
        deltas += 1
    return Synced(round_number, nbytes, deltas, got_snapshot)


def _apply(
    chunks: list[Chunk], state: dict[str, torch.Tensor], held: int, *, partial: bool = False
) -> tuple[int, bool]:
    header = chunks[0].header
    assert header is not None
    names = {t.name for t in header.layout.manifest}
    for spec in header.layout.manifest:
        # Optimizer state travelling with FedCyBGD blocks is zero at round 0: a worker that started
        # from its own copy of the base model holds none of it yet.
        if OPTIMIZER_MARK in spec.name and spec.name not in state:
            state[spec.name] = torch.zeros(spec.shape)
    if header.kind is DeltaKind.SNAPSHOT:
        if names != set(state) and not (partial and names <= set(state)):
            raise ValueError(f"snapshot of round {header.round} has other tensors than this worker trains")
        for spec in header.layout.manifest:
            # The held state mirrors the aggregator's, which may differ in shape from what this
            # site's model trains (FlexLoRA: rank-R adapters, sliced to the site's rank per round).
            if tuple(state[spec.name].shape) != tuple(spec.shape):
                state[spec.name] = torch.empty(spec.shape, dtype=state[spec.name].dtype)
        decode_chunks(chunks, into=state)
        return header.round, True
    if header.base_round != held:
        raise ValueError(
            f"difference of round {header.round} applies to round {header.base_round}; this worker holds {held}"
        )
    if not names <= set(state):
        raise ValueError(f"difference of round {header.round} names tensors this worker does not train")
    _, diff = decode_chunks(chunks)
    for name, value in diff.items():
        state[name].add_(value.to(state[name].dtype))
    return header.round, False


def push(
    stub: Any,
    metadata: tuple[tuple[str, str], ...],
    header: DeltaHeader,
    payload: Path,
    *,
    attempts: int = 8,
    progress: Callable[[int], None] = lambda n: None,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = 3600,
) -> federation_pb2.PushReceipt:
    """Stream a payload, resuming from the acknowledged offset after each failure (exponential backoff, full jitter)."""
    start = 0
    for attempt in range(attempts):
        if attempt:
            offset = stub.GetUploadOffset(
                federation_pb2.UploadOffsetRequest(site_id=header.site_id, upload_id=header.upload_id),
                metadata=metadata,
                timeout=30,
            )
            if offset.complete:
                return federation_pb2.PushReceipt(
                    upload_id=header.upload_id, round=header.round, accepted=True, duplicate=True
                )
            start = offset.committed_offset
        try:
            with payload.open("rb") as source:
                messages = (
                    chunk_to_proto(c) for c in _counted(iter_chunks(header, source, start=start), progress)
                )
                receipt: federation_pb2.PushReceipt = stub.PushDelta(
                    messages, metadata=metadata, timeout=timeout
                )
                return receipt
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            if (
                code is grpc.StatusCode.ABORTED and "closed" in details
            ) or code is grpc.StatusCode.FAILED_PRECONDITION:
                raise RoundOver(details) from None
            if code not in RETRYABLE or attempt == attempts - 1:
                raise
            wait = random.uniform(0, min(30.0, 0.5 * 2**attempt))
            logger.warning(
                "[upload] %s: %s; resuming in %.1fs (attempt %d)", code.name, details, wait, attempt + 2
            )
            sleep(wait)
    raise AssertionError("unreachable")


def _counted(chunks: Any, progress: Callable[[int], None]) -> Any:
    for chunk in chunks:
        progress(len(chunk.data))
        yield chunk
