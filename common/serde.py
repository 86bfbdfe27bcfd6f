"""Protobuf <-> domain conversion for the delta messages and the TrainingSpec, in symmetric pairs.

``*_from_proto`` functions also validate what protobuf cannot: enum values we
know, byte lengths, non-negative sizes. Deeper checks (limits, manifest
agreement) belong to ``common.codec.layout.validate_layout``.
"""

from __future__ import annotations

import enum
import math
from typing import TypeVar

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
    TrainingStats,
    UploadMetrics,
)
from common.dtypes import DType
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.pb.gradualdiff.v1 import federation_pb2
from common.spec import (
    BaseDtype,
    LocalOptimizer,
    LoraSpec,
    LrSchedule,
    Method,
    Quantization,
    TrainingSpec,
    TrainMode,
)

E = TypeVar("E", bound=enum.IntEnum)


def _enum(kind: type[E], value: int, field: str) -> E:
    try:
        return kind(value)
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
        cast=_enum(Cast, msg.cast, "codec.cast"),
        byte_shuffle=msg.byte_shuffle,
        block_bytes=msg.block_bytes,
        zstd_level=msg.zstd_level,
        lossy=_enum(Lossy, msg.lossy, "codec.lossy"),
        topk_fraction=msg.topk_fraction,
    )


def tensor_spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=pb.DType.ValueType(int(spec.dtype)), shape=list(spec.shape))


def tensor_spec_from_proto(msg: pb.TensorSpec, index: int) -> TensorSpec:
    field = f"manifest[{index}]"
    if msg.dtype == pb.DTYPE_UNSPECIFIED:
        raise InvalidArgument(f"{field}.dtype is unspecified", field=f"{field}.dtype")
    return TensorSpec(msg.name, _enum(DType, msg.dtype, f"{field}.dtype"), tuple(msg.shape))


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
        training=training_stats_to_proto(metrics.training),
    )


# The most a site's training figures may say: past any real site, yet no corrupt or hostile value
# passes for a measurement (tokens: exact as a JSON number).
STATS_LIMITS: dict[str, float] = {
    "tokens_per_second": 1e9,
    "step_seconds": 7 * 86400.0,
    "peak_memory_bytes": float(2**50),
    "ranks": 65536,
    "tokens": float(2**53),
}


def training_stats_to_proto(stats: TrainingStats) -> pb.TrainingStats:
    return pb.TrainingStats(
        tokens_per_second=stats.tokens_per_second,
        step_seconds=stats.step_seconds,
        peak_memory_bytes=stats.peak_memory_bytes,
        peak_is_accelerator=stats.peak_is_accelerator,
        ranks=stats.ranks,
        tokens=stats.tokens,
    )


def training_stats_from_proto(msg: pb.TrainingStats, field: str = "training") -> TrainingStats:
    """The figures as sent, each finite, >= 0 and within ``STATS_LIMITS``.

    Raises:
        InvalidArgument: naming the field (``training.step_seconds``, under ``field``) and its limit.
    """
    for name, limit in STATS_LIMITS.items():
        value = getattr(msg, name)
        if not (math.isfinite(value) and 0 <= value <= limit):
            raise InvalidArgument(
                f"{field}.{name} is {value}; must be finite, >= 0 and <= {limit:g}",
                field=f"{field}.{name}",
                limit=limit,
            )
    return TrainingStats(
        tokens_per_second=msg.tokens_per_second,
        step_seconds=msg.step_seconds,
        peak_memory_bytes=msg.peak_memory_bytes,
        peak_is_accelerator=msg.peak_is_accelerator,
        ranks=msg.ranks,
        tokens=msg.tokens,
    )


def metrics_from_proto(msg: pb.UploadMetrics) -> UploadMetrics:
    values = {"train_loss": msg.train_loss, "eval_loss": msg.eval_loss, "train_seconds": msg.train_seconds}
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(
                f"metrics.{name} is {value}; must be finite and >= 0", field=f"metrics.{name}"
            )
    return UploadMetrics(
        train_loss=msg.train_loss,
        eval_loss=msg.eval_loss,
        steps=msg.steps,
        train_seconds=msg.train_seconds,
        training=training_stats_from_proto(msg.training, "metrics.training"),
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
        kind=_enum(DeltaKind, msg.kind, "kind"),
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


def training_spec_to_proto(spec: TrainingSpec) -> federation_pb2.TrainingSpec:
    """Every field of ``spec`` as it is; ``training_spec_from_proto`` reads it back equal."""
    return federation_pb2.TrainingSpec(
        method=federation_pb2.Method.ValueType(int(spec.method)),
        mode=federation_pb2.TrainMode.ValueType(int(spec.mode)),
        trainable_patterns=list(spec.trainable_patterns),
        lora=federation_pb2.LoraSpec(
            rank=spec.lora.rank,
            alpha=spec.lora.alpha,
            dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
        ),
        local_steps=spec.local_steps,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        max_seq_len=spec.max_seq_len,
        upload_codec=codec_to_proto(spec.upload_codec),
        seed=spec.seed,
        prox_mu=spec.prox_mu,
        base_dtype=federation_pb2.BaseDtype.ValueType(int(spec.base_dtype)),
        quantization=federation_pb2.Quantization.ValueType(int(spec.quantization)),
        gradient_checkpointing=spec.gradient_checkpointing,
        micro_batch_size=spec.micro_batch_size,
        max_grad_norm=spec.max_grad_norm,
        optimizer=federation_pb2.LocalOptimizer.ValueType(int(spec.optimizer)),
        lr_schedule=federation_pb2.LrSchedule.ValueType(int(spec.lr_schedule)),
        min_learning_rate=spec.min_learning_rate,
        warmup_steps=spec.warmup_steps,
        schedule_rounds=spec.schedule_rounds,
    )


def training_spec_from_proto(msg: federation_pb2.TrainingSpec) -> TrainingSpec:
    """The wire TrainingSpec as a domain object; what is unset comes from ``TrainingSpec()``.

    proto3 cannot tell zero from unset, so a zero (or empty) field whose default is
    not zero reads as that default: the method, mode, LoRA rank, alpha and target
    modules, local steps, batch size, learning rate and sequence length; an absent
    ``lora`` or ``upload_codec`` is the default one, and an unspecified base dtype,
    quantization, optimizer or schedule is AUTO, NONE, ADAMW or CONSTANT. Trainable
    patterns, seed, prox_mu, a present ``lora``'s dropout and the memory-lean
    numbers are taken as they are (0 means 0: off, or "the batch size" for
    ``micro_batch_size``).

    Raises:
        InvalidArgument: an enum value this build does not know (``field`` names it).
    """
    default = TrainingSpec()
    return TrainingSpec(
        method=_enum(Method, msg.method, "training.method") if msg.method else default.method,
        mode=_enum(TrainMode, msg.mode, "training.mode") if msg.mode else default.mode,
        trainable_patterns=tuple(msg.trainable_patterns),
        lora=_lora_from_proto(msg.lora, default.lora) if msg.HasField("lora") else default.lora,
        local_steps=msg.local_steps or default.local_steps,
        batch_size=msg.batch_size or default.batch_size,
        learning_rate=msg.learning_rate or default.learning_rate,
        max_seq_len=msg.max_seq_len or default.max_seq_len,
        upload_codec=codec_from_proto(msg.upload_codec)
        if msg.HasField("upload_codec")
        else default.upload_codec,
        seed=msg.seed,
        prox_mu=msg.prox_mu,
        base_dtype=_enum(BaseDtype, msg.base_dtype, "training.base_dtype")
        if msg.base_dtype
        else default.base_dtype,
        quantization=_enum(Quantization, msg.quantization, "training.quantization")
        if msg.quantization
        else default.quantization,
        gradient_checkpointing=msg.gradient_checkpointing,
        micro_batch_size=msg.micro_batch_size,
        max_grad_norm=msg.max_grad_norm,
        optimizer=_enum(LocalOptimizer, msg.optimizer, "training.optimizer")
        if msg.optimizer
        else default.optimizer,
        lr_schedule=_enum(LrSchedule, msg.lr_schedule, "training.lr_schedule")
        if msg.lr_schedule
        else default.lr_schedule,
        min_learning_rate=msg.min_learning_rate,
        warmup_steps=msg.warmup_steps,
        schedule_rounds=msg.schedule_rounds,
    )


def _lora_from_proto(msg: federation_pb2.LoraSpec, default: LoraSpec) -> LoraSpec:
    return LoraSpec(
        rank=msg.rank or default.rank,
        alpha=msg.alpha or default.alpha,
        dropout=msg.dropout,
        target_modules=tuple(msg.target_modules) or default.target_modules,
    )
