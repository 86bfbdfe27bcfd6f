"""Scripted sites for integration tests: real gRPC calls and the common/ codec, no ML.

A ScriptedSite joins, waits for a round, fetches the global state, and
pushes a delta it is given, the way a worker would, but without a model.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from common.channel import auth_metadata
from common.codec import decode_chunks, encode, iter_chunks
from common.delta import Codec, DeltaHeader, DeltaKind, UploadMetrics
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2, federation_pb2_grpc
from common.serde import chunk_from_proto, chunk_to_proto
from server.app import create_server, shutdown
from server.config import RoundPolicy, ServerConfig

ADMIN_TOKEN = "admin-secret"


def token_of(site: str) -> str:
    return f"token-{site}"


def small_state(seed: int = 0, layers: int = 2, width: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(50, width, generator=gen) * 0.02}
    for i in range(layers):
        state[f"layers.{i}.q.weight"] = torch.randn(width, width, generator=gen) * 0.02
        state[f"layers.{i}.norm.weight"] = torch.ones(width)
    return state


def write_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def make_config(tmp: Path, sites: list[str], **overrides: object) -> ServerConfig:
    init = write_state(tmp / "init.safetensors", small_state())
    base = ServerConfig(
        listen="127.0.0.1:0",
        state_dir=tmp / "state",
        init_state=init,
        run_id="test-run",
        site_tokens={s: token_of(s) for s in sites},
        admin_token=ADMIN_TOKEN,
        heartbeat_interval_s=0.5,
        missed_beats=3,
        tick_s=0.05,
        round=RoundPolicy(),
    )
    from dataclasses import replace

    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class Aggregator:
    """A running aggregator for one test."""

    config: ServerConfig
    server: grpc.Server = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        self.server, self.port, self.coordinator = create_server(self.config)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        shutdown(self.server, self.coordinator, grace=1.0)


class ScriptedSite:
    """A site driven by the test, over real gRPC."""

    def __init__(self, target: str, site_id: str, samples: int = 10, token: str | None = None) -> None:
        self.site_id = site_id
        self.samples = samples
        self.channel = grpc.insecure_channel(target)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.metadata = auth_metadata(token if token is not None else token_of(site_id))
        self.run_id = ""

    def close(self) -> None:
        self.channel.close()

    def join(self, held_round: int = 0) -> federation_pb2.JoinReply:
        reply = self.stub.Join(
            federation_pb2.JoinRequest(
                site_id=self.site_id,
                capabilities=federation_pb2.Capabilities(num_samples=self.samples),
                held_round=held_round,
            ),
            metadata=self.metadata,
            timeout=10,
        )
        self.run_id = reply.run_id
        return reply

    def beat(self, round_number: int = 0, phase: int = 1) -> federation_pb2.HeartbeatReply:
        return self.stub.Heartbeat(
            federation_pb2.HeartbeatRequest(site_id=self.site_id, round=round_number, phase=phase),
            metadata=self.metadata,
            timeout=10,
        )

    def await_round(self, after: int = 0, wait_ms: int = 10_000) -> federation_pb2.RoundSpec:
        return self.stub.AwaitRound(
            federation_pb2.AwaitRoundRequest(site_id=self.site_id, after_round=after, wait_ms=wait_ms),
            metadata=self.metadata,
            timeout=wait_ms / 1000 + 5,
        )

    def fetch(
        self, have_round: int, snapshot: bool = False
    ) -> list[tuple[DeltaHeader, dict[str, torch.Tensor]]]:
        """Every delta of the FetchDiff stream, decoded."""
        stream = self.stub.FetchDiff(
            federation_pb2.FetchDiffRequest(site_id=self.site_id, have_round=have_round, snapshot=snapshot),
            metadata=self.metadata,
            timeout=60,
        )
        out = []
        current: list = []
        for msg in stream:
            chunk = chunk_from_proto(msg)
            if chunk.header is not None and current:
                out.append(decode_chunks(current))
                current = []
            current.append(chunk)
        if current:
            out.append(decode_chunks(current))
        return out

    def header(
        self,
        delta: dict[str, torch.Tensor],
        round_number: int,
        base_round: int,
        *,
        codec: Codec | None = None,
        upload_id: str | None = None,
        samples: int | None = None,
    ) -> tuple[DeltaHeader, bytes]:
        sink = io.BytesIO()
        layout = encode(delta, codec or Codec(), sink)
        header = DeltaHeader(
            layout=layout,
            run_id=self.run_id,
            round=round_number,
            site_id=self.site_id,
            upload_id=upload_id or f"{self.site_id}-{uuid.uuid4().hex[:8]}",
            sample_count=self.samples if samples is None else samples,
            base_round=base_round,
            kind=DeltaKind.DIFF,
            metrics=UploadMetrics(train_loss=1.0, eval_loss=2.0, steps=1),
        )
        return header, sink.getvalue()

    def chunks(
        self, header: DeltaHeader, payload: bytes, start: int = 0, chunk_bytes: int = 64 * 1024
    ) -> Iterator[delta_pb2.DeltaChunk]:
        for chunk in iter_chunks(header, io.BytesIO(payload), start=start, chunk_bytes=chunk_bytes):
            yield chunk_to_proto(chunk)

    def push(self, header: DeltaHeader, payload: bytes, start: int = 0) -> federation_pb2.PushReceipt:
        return self.stub.PushDelta(self.chunks(header, payload, start), metadata=self.metadata, timeout=60)

    def push_messages(self, messages: Iterator[delta_pb2.DeltaChunk]) -> federation_pb2.PushReceipt:
        return self.stub.PushDelta(messages, metadata=self.metadata, timeout=60)

    def offset(self, upload_id: str) -> federation_pb2.UploadOffsetReply:
        return self.stub.GetUploadOffset(
            federation_pb2.UploadOffsetRequest(site_id=self.site_id, upload_id=upload_id),
            metadata=self.metadata,
            timeout=10,
        )


def random_delta(seed: int, like: dict[str, torch.Tensor], scale: float = 1e-3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in like.items()}
