"""Scripted sites that ride out faults the way a worker does: retry, ask where to resume, go on.

A ``ResilientSite`` joins, heartbeats from a thread, waits for rounds and pushes the deltas it is
given (no model: the campaign decides every byte, so runs are reproducible and comparable bit for
bit). Each call is retried on the statuses a worker retries (``common.retry``: UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) and on ABORTED (a stream cut short); an upload resumes at
the offset the daemon says it committed. An upload is *acknowledged* when a receipt with
``accepted`` arrives: the campaign then requires it to count exactly once.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from bench.reliability.daemon import FAST_RECONNECT, token_of
from common.channel import auth_metadata
from common.codec import decode_chunks, encode, iter_chunks
from common.delta import Chunk, Codec, DeltaHeader, DeltaKind, PayloadLayout, UploadMetrics
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2, federation_pb2_grpc
from common.serde import chunk_from_proto, chunk_to_proto

T = TypeVar("T")
State = dict[str, torch.Tensor]
RETRIED = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        # A connection cut mid-frame can end a call with these on the client's side alone; the
        # daemon's log is checked for tracebacks separately, so a real INTERNAL is not hidden.
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


TAKING_UPLOADS = (
    federation_pb2.ROUND_STATE_OPEN,
    federation_pb2.ROUND_STATE_TRAINING,
    federation_pb2.ROUND_STATE_COLLECTING,
)


class GaveUp(RuntimeError):
    """A call kept failing past the site's deadline, or failed with a status not retried."""


@dataclass
class Upload:
    """One encoded upload: its header, payload and layout (the shard specs its chunks carry)."""

    header: DeltaHeader
    payload: bytes
    layout: PayloadLayout


@dataclass
class Ack:
    """What the daemon acknowledged for an upload."""

    upload_id: str
    round: int
    duplicate: bool
    sends: int  # streams it took


class ResilientSite:
    """A site over real gRPC (to ``target``: the daemon or the proxy) that retries through faults."""

    def __init__(
        self,
        target: str,
        site_id: str,
        samples: int,
        *,
        patience_s: float = 90.0,
        chunk_bytes: int = 16 * 1024,
    ) -> None:
        self.site_id = site_id
        self.samples = samples
        self.patience_s = patience_s
        self.chunk_bytes = chunk_bytes
        self.channel = grpc.insecure_channel(target, options=FAST_RECONNECT)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self._beat_channel = grpc.insecure_channel(target, options=FAST_RECONNECT)
        self._beat_stub = federation_pb2_grpc.FederationStub(self._beat_channel)
        self.metadata = auth_metadata(token_of(site_id))
        self.run_id = ""
        self.codes: Counter[str] = Counter()  # statuses retried, by name
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    def close(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join(10)
        self.channel.close()
        self._beat_channel.close()

    def retry(self, what: str, call: Callable[[], T], *, also: frozenset[grpc.StatusCode] = frozenset()) -> T:
        """``call()`` until it returns; retried statuses wait 0.05 s to 1 s, up to ``patience_s``."""
        deadline = time.monotonic() + self.patience_s
        wait = 0.05
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRIED and code not in also:
                    raise GaveUp(f"{self.site_id} {what}: {code.name}: {exc.details()}") from exc
                self.codes[code.name] += 1
                if time.monotonic() > deadline:
                    raise GaveUp(
                        f"{self.site_id} {what}: still {code.name} after {self.patience_s}s"
                    ) from exc
            time.sleep(wait)
            wait = min(1.0, wait * 2)

    def join(self, held_round: int = 0) -> federation_pb2.JoinReply:
        request = federation_pb2.JoinRequest(
            site_id=self.site_id,
            capabilities=federation_pb2.Capabilities(num_samples=self.samples),
            held_round=held_round,
        )
        reply: federation_pb2.JoinReply = self.retry(
            "join", lambda: self.stub.Join(request, metadata=self.metadata, timeout=5)
        )
        self.run_id = reply.run_id
        return reply

    def start_beating(self, interval: float = 0.2) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(grpc.RpcError):
                    self._beat_stub.Heartbeat(
                        federation_pb2.HeartbeatRequest(
                            site_id=self.site_id, phase=federation_pb2.PHASE_IDLE
                        ),
                        metadata=self.metadata,
                        timeout=2,
                    )

        self._beats = threading.Thread(target=loop, name=f"beat-{self.site_id}", daemon=True)
        self._beats.start()

    def await_round(self, *, after: int) -> federation_pb2.RoundSpec:
        """The first open round after round ``after`` (or the run's end)."""

        def poll() -> federation_pb2.RoundSpec:
            spec: federation_pb2.RoundSpec = self.stub.AwaitRound(
                federation_pb2.AwaitRoundRequest(site_id=self.site_id, after_round=after, wait_ms=2000),
                metadata=self.metadata,
                timeout=5,
            )
            return spec

        deadline = time.monotonic() + self.patience_s
        while True:
            spec = self.retry("await", poll)
            if spec.run_finished or (spec.round > after and spec.state in TAKING_UPLOADS):
                return spec
            if time.monotonic() > deadline:
                raise GaveUp(f"{self.site_id}: no round after {after} within {self.patience_s}s")

    def encode(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        round: int,
        base: int,
        upload_id: str,
        codec: Codec | None = None,
        samples: int | None = None,
        shard_bytes: int = 64 * 1024,
    ) -> Upload:
        sink = io.BytesIO()
        layout = encode(tensors, codec or Codec(), sink, shard_bytes=shard_bytes)
        header = DeltaHeader(
            spec=layout.spec,
            run_id=self.run_id,
            round=round,
            site_id=self.site_id,
            upload_id=upload_id,
            sample_count=self.samples if samples is None else samples,
            base_round=base,
            kind=DeltaKind.DIFF,
            metrics=UploadMetrics(train_loss=1.0, eval_loss=1.0, steps=1),
        )
        return Upload(header, sink.getvalue(), layout)

    def messages(self, upload: Upload, start: int) -> Iterator[delta_pb2.DeltaChunk]:
        source = io.BytesIO(upload.payload)
        chunks = iter_chunks(upload.header, upload.layout, source, start=start, chunk_bytes=self.chunk_bytes)
        for chunk in chunks:
            yield chunk_to_proto(chunk)

    def push(self, upload: Upload, on_message: Callable[[int], None] | None = None) -> Ack:
        """Push ``upload`` until a receipt accepts it, resuming where the daemon committed.

        ``on_message(i)`` runs before the i-th message of each stream is sent (the campaign kills
        the daemon from there, mid-upload).
        """
        upload_id = upload.header.upload_id
        sends = 0

        def offset() -> federation_pb2.UploadOffsetReply:
            reply: federation_pb2.UploadOffsetReply = self.stub.GetUploadOffset(
                federation_pb2.UploadOffsetRequest(site_id=self.site_id, upload_id=upload_id),
                metadata=self.metadata,
                timeout=5,
            )
            return reply

        def stream(start: int) -> Iterator[delta_pb2.DeltaChunk]:
            for i, message in enumerate(self.messages(upload, start)):
                if on_message is not None:
                    on_message(i)
                yield message

        deadline = time.monotonic() + self.patience_s
        while True:
            at = self.retry("offset", offset)
            sends += 1
            try:
                receipt: federation_pb2.PushReceipt = self.stub.PushDelta(
                    stream(0 if at.complete else at.committed_offset), metadata=self.metadata, timeout=30
                )
            except grpc.RpcError as exc:
                code = exc.code()
                # FAILED_PRECONDITION: a resumed stream raced a commit of the cut one; ask again.
                if code not in RETRIED and code is not grpc.StatusCode.FAILED_PRECONDITION:
                    raise GaveUp(f"{self.site_id} push {upload_id}: {code.name}: {exc.details()}") from exc
                self.codes[code.name] += 1
                if time.monotonic() > deadline:
                    raise GaveUp(
                        f"{self.site_id} push {upload_id}: {code.name} after {self.patience_s}s"
                    ) from exc
                time.sleep(0.05)
                continue
            if not receipt.accepted:
                raise GaveUp(f"{self.site_id} push {upload_id}: not accepted: {receipt}")
            return Ack(upload_id, upload.header.round, receipt.duplicate, sends)

    def snapshot(self) -> tuple[int, State]:
        """The latest published round and its whole state (FetchDiff snapshot), retried whole."""

        def fetch() -> tuple[int, State]:
            stream = self.stub.FetchDiff(
                federation_pb2.FetchDiffRequest(site_id=self.site_id, have_round=0, snapshot=True),
                metadata=self.metadata,
                timeout=30,
            )
            chunks: list[Chunk] = [chunk_from_proto(m) for m in stream]
            header, state = decode_chunks(chunks)
            return header.round, state

        return self.retry("snapshot", fetch)
