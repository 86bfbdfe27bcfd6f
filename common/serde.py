"""Protobuf <-> domain conversion for the delta messages, in symmetric pairs.

``*_from_proto`` functions also validate what protobuf cannot: enum values we
know, byte lengths, non-negative sizes. Deeper checks (limits, manifest
agreement) belong to ``common.codec.layout.validate_layout``.
"""

from __future__ import annotations

import math

from common.delta import (
    Cast,
    Chunk,
    Codec,
    DeltaHeader,
    DeltaKind,
    Lossy,
    PayloadLayout,
    Piece,
    ShardSpec,
    TensorSpec,
    UploadMetrics,
)
from common.dtypes import DType
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import delta_pb2 as pb


def _enum(kind: type[DType] | type[Cast] | type[DeltaKind] | type[Lossy], value: int, field: str) -> int:
    try:
        return int(kind(value))
    except ValueError:
        raise InvalidArgument(f"{field} has unknown value {value}", field=field) from None


def codec_to_proto(codec: Codec) -> pb.Codec:
    return pb.Codec(
        cast=pb.Cast.ValueType(int(codec.cast)),
        byte_shuffle=codec.byte_shuffle,
        block_bytes=codec.block_bytes,
        zstd_level=codec.zstd_level,
        lossy=pb.Lossy.ValueType(int(codec.lossy)),
        topk_fraction=codec.topk_fraction,
    )


def codec_from_proto(msg: pb.Codec) -> Codec:
    return Codec(
        cast=Cast(_enum(Cast, msg.cast, "codec.cast")),
        byte_shuffle=msg.byte_shuffle,
        block_bytes=msg.block_bytes,
        zstd_level=msg.zstd_level,
        lossy=Lossy(_enum(Lossy, msg.lossy, "codec.lossy")),
        topk_fraction=msg.topk_fraction,
    )


def tensor_spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=pb.DType.ValueType(int(spec.dtype)), shape=list(spec.shape))


def tensor_spec_from_proto(msg: pb.TensorSpec, index: int) -> TensorSpec:
    field = f"manifest[{index}]"
    if msg.dtype == pb.DTYPE_UNSPECIFIED:
        raise InvalidArgument(f"{field}.dtype is unspecified", field=f"{field}.dtype")
    return TensorSpec(msg.name, DType(_enum(DType, msg.dtype, f"{field}.dtype")), tuple(msg.shape))


def shard_to_proto(shard: ShardSpec) -> pb.ShardSpec:
    return pb.ShardSpec(
        compressed_bytes=shard.compressed_bytes,
        raw_bytes=shard.raw_bytes,
        sha256=shard.sha256,
        pieces=[pb.Piece(tensor=p.tensor, start=p.start, count=p.count) for p in shard.pieces],
        frame_bytes=list(shard.frame_bytes),
    )


def shard_from_proto(msg: pb.ShardSpec) -> ShardSpec:
    return ShardSpec(
        compressed_bytes=msg.compressed_bytes,
        raw_bytes=msg.raw_bytes,
        sha256=bytes(msg.sha256),
        pieces=tuple(Piece(p.tensor, p.start, p.count) for p in msg.pieces),
        frame_bytes=tuple(msg.frame_bytes),
    )


def metrics_to_proto(metrics: UploadMetrics) -> pb.UploadMetrics:
    return pb.UploadMetrics(
        train_loss=metrics.train_loss,
        eval_loss=metrics.eval_loss,
        steps=metrics.steps,
        train_seconds=metrics.train_seconds,
    )


def metrics_from_proto(msg: pb.UploadMetrics) -> UploadMetrics:
    values = {"train_loss": msg.train_loss, "eval_loss": msg.eval_loss, "train_seconds": msg.train_seconds}
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(
                f"metrics.{name} is {value}; must be finite and >= 0", field=f"metrics.{name}"
            )
    return UploadMetrics(
        train_loss=msg.train_loss, eval_loss=msg.eval_loss, steps=msg.steps, train_seconds=msg.train_seconds
    )


def header_to_proto(header: DeltaHeader) -> pb.DeltaHeader:
    layout = header.layout
    return pb.DeltaHeader(
        run_id=header.run_id,
        round=header.round,
        site_id=header.site_id,
        upload_id=header.upload_id,
        sample_count=header.sample_count,
        codec=codec_to_proto(layout.codec),
        manifest=[tensor_spec_to_proto(t) for t in layout.manifest],
        shards=[shard_to_proto(s) for s in layout.shards],
        total_bytes=layout.total_bytes,
        sha256=layout.sha256,
        base_round=header.base_round,
        kind=pb.DeltaKind.ValueType(int(header.kind)),
        metrics=metrics_to_proto(header.metrics),
    )


def header_from_proto(msg: pb.DeltaHeader) -> DeltaHeader:
    layout = PayloadLayout(
        codec=codec_from_proto(msg.codec),
        manifest=tuple(tensor_spec_from_proto(t, i) for i, t in enumerate(msg.manifest)),
        shards=tuple(shard_from_proto(s) for s in msg.shards),
        total_bytes=msg.total_bytes,
        sha256=bytes(msg.sha256),
    )
    return DeltaHeader(
        layout=layout,
        run_id=msg.run_id,
        round=msg.round,
        site_id=msg.site_id,
        upload_id=msg.upload_id,
        sample_count=msg.sample_count,
        base_round=msg.base_round,
        kind=DeltaKind(_enum(DeltaKind, msg.kind, "kind")),
        metrics=metrics_from_proto(msg.metrics),
    )


def header_from_bytes(raw: bytes) -> DeltaHeader:
    """A header stored as serialized protobuf (``header_to_proto(h).SerializeToString()``), read back."""
    msg = pb.DeltaHeader()
    msg.ParseFromString(raw)
    return header_from_proto(msg)


def chunk_to_proto(chunk: Chunk) -> pb.DeltaChunk:
    msg = pb.DeltaChunk(offset=chunk.offset, data=chunk.data, crc32=chunk.crc32, last=chunk.last)
    if chunk.header is not None:
        msg.header.CopyFrom(header_to_proto(chunk.header))
    return msg


def chunk_from_proto(msg: pb.DeltaChunk) -> Chunk:
    header = header_from_proto(msg.header) if msg.HasField("header") else None
    return Chunk(offset=msg.offset, data=msg.data, crc32=msg.crc32, last=msg.last, header=header)
