"""Protobuf <-> domain conversion for the delta messages and the TrainingSpec, in symmetric pairs.

``*_from_proto`` functions also validate what protobuf cannot: enum values we
know, byte lengths, non-negative sizes. Deeper checks (limits, manifest
agreement, each shard against the manifest) belong to common.codec.layout
(``validate_spec``, ``LayoutBuilder``).

The DeltaChunk, the one message carrying payload bytes, also has a framing of
its own (``chunk_to_wire``/``chunk_from_wire``): the same wire bytes, with
``data`` sliced out of the received message instead of copied. A stored
layout and a list of shard specs have byte forms for storage only
(``layout_to_bytes``, ``shards_to_bytes``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from common.codec import protowire as wire
from common.delta import (
    Cast,
    Chunk,
    Codec,
    DeltaHeader,
    DeltaKind,
    Digest,
    Lossy,
    PayloadLayout,
    PayloadSpec,
    Piece,
    ShardSpec,
    TensorSpec,
    UploadMetrics,
)
from common.dtypes import DType
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.pb.gradualdiff.v1 import federation_pb2
from common.serde_stats import STATS_LIMITS as STATS_LIMITS
from common.serde_stats import training_stats_from_proto as training_stats_from_proto
from common.serde_stats import training_stats_to_proto as training_stats_to_proto
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
        digest=pb.Digest.ValueType(int(codec.digest)),
    )


def codec_from_proto(msg: pb.Codec) -> Codec:
    return Codec(
        cast=_enum(Cast, msg.cast, "codec.cast"),
        byte_shuffle=msg.byte_shuffle,
        block_bytes=msg.block_bytes,
        zstd_level=msg.zstd_level,
        lossy=_enum(Lossy, msg.lossy, "codec.lossy"),
        topk_fraction=msg.topk_fraction,
        digest=_enum(Digest, msg.digest, "codec.digest"),
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
        digest=shard.digest,
        pieces=[pb.Piece(tensor=p.tensor, start=p.start, count=p.count) for p in shard.pieces],
        frame_bytes=list(shard.frame_bytes),
    )


def shard_from_proto(msg: pb.ShardSpec) -> ShardSpec:
    return ShardSpec(
        compressed_bytes=msg.compressed_bytes,
        raw_bytes=msg.raw_bytes,
        digest=bytes(msg.digest),
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
    spec = header.spec
    return pb.DeltaHeader(
        run_id=header.run_id,
        round=header.round,
        site_id=header.site_id,
        upload_id=header.upload_id,
        sample_count=header.sample_count,
        codec=codec_to_proto(spec.codec),
        manifest=[tensor_spec_to_proto(t) for t in spec.manifest],
        base_round=header.base_round,
        kind=pb.DeltaKind.ValueType(int(header.kind)),
        metrics=metrics_to_proto(header.metrics),
        sites=header.sites,
    )


def spec_from_proto(msg: pb.DeltaHeader) -> PayloadSpec:
    """The codec and manifest of a header."""
    return PayloadSpec(
        codec=codec_from_proto(msg.codec),
        manifest=tuple(tensor_spec_from_proto(t, i) for i, t in enumerate(msg.manifest)),
    )


def header_from_proto(msg: pb.DeltaHeader) -> DeltaHeader:
    return DeltaHeader(
        spec=spec_from_proto(msg),
        run_id=msg.run_id,
        round=msg.round,
        site_id=msg.site_id,
        upload_id=msg.upload_id,
        sample_count=msg.sample_count,
        base_round=msg.base_round,
        kind=_enum(DeltaKind, msg.kind, "kind"),
        metrics=metrics_from_proto(msg.metrics),
        sites=msg.sites,
    )


def header_to_bytes(header: DeltaHeader) -> bytes:
    """A header as serialized protobuf, for storage."""
    return header_to_proto(header).SerializeToString()


def header_from_bytes(raw: bytes) -> DeltaHeader:
    """A header stored as serialized protobuf (``header_to_bytes``), read back."""
    msg = pb.DeltaHeader()
    msg.ParseFromString(raw)
    return header_from_proto(msg)


def chunk_to_proto(chunk: Chunk) -> pb.DeltaChunk:
    msg = pb.DeltaChunk(offset=chunk.offset, data=bytes(chunk.data), crc32=chunk.crc32, last=chunk.last)
    if chunk.header is not None:
        msg.header.CopyFrom(header_to_proto(chunk.header))
    if chunk.shard is not None:
        msg.shard.CopyFrom(shard_to_proto(chunk.shard))
    return msg


def chunk_from_proto(msg: pb.DeltaChunk) -> Chunk:
    header = header_from_proto(msg.header) if msg.HasField("header") else None
    shard = shard_from_proto(msg.shard) if msg.HasField("shard") else None
    return Chunk(offset=msg.offset, data=msg.data, crc32=msg.crc32, last=msg.last, header=header, shard=shard)


def chunk_to_wire(chunk: Chunk) -> bytes:
    """``chunk`` as a serialized DeltaChunk, the same bytes as ``chunk_to_proto(chunk).SerializeToString()``;
    ``data`` is copied once, into the result."""
    parts: list[bytes | memoryview] = []
    if chunk.header is not None:
        _put_message(parts, 1, header_to_proto(chunk.header).SerializeToString())
    if chunk.offset:
        parts += [b"\x10", wire.varint(chunk.offset)]
    if len(chunk.data):
        parts += [b"\x1a", wire.varint(len(chunk.data)), chunk.data]
    if chunk.crc32:
        parts += [b"\x25", chunk.crc32.to_bytes(4, "little")]
    if chunk.last:
        parts.append(b"\x28\x01")
    if chunk.shard is not None:
        _put_message(parts, 6, shard_to_proto(chunk.shard).SerializeToString())
    return b"".join(parts)


def chunk_from_wire(raw: bytes) -> Chunk:
    """A serialized DeltaChunk read as protobuf reads it, but with ``data`` a view into ``raw`` (no copy).

    Raises:
        InvalidArgument: (reason MALFORMED_REQUEST) the bytes are not a DeltaChunk;
            or what ``chunk_from_proto`` raises for its header or shard.
    """
    view = memoryview(raw)
    offset = crc = 0
    last = False
    data: memoryview = view[:0]
    headers: list[memoryview] = []
    shards: list[memoryview] = []
    try:
        for number, wire_type, value in wire.fields(view):
            if isinstance(value, memoryview):
                if number == 1:
                    headers.append(value)
                elif number == 3:
                    data = value
                elif number == 6:
                    shards.append(value)
            elif (number, wire_type) == (2, wire.VARINT):
                offset = value
            elif (number, wire_type) == (4, wire.I32):
                crc = value
            elif (number, wire_type) == (5, wire.VARINT):
                last = value != 0
        header_msg = _merged(pb.DeltaHeader(), headers)
        shard_msg = _merged(pb.ShardSpec(), shards)
    except (wire.WireError, DecodeError) as exc:
        raise InvalidArgument(
            f"the request is not a gradualdiff.v1.DeltaChunk: {exc}", reason="MALFORMED_REQUEST"
        ) from None
    return Chunk(
        offset=offset,
        data=data,
        crc32=crc,
        last=last,
        header=header_from_proto(header_msg) if headers else None,
        shard=shard_from_proto(shard_msg) if shards else None,
    )


def _put_message(parts: list[bytes | memoryview], number: int, body: bytes) -> None:
    parts += [wire.tag(number, wire.LEN), wire.varint(len(body)), body]


M = TypeVar("M", pb.DeltaHeader, pb.ShardSpec)


def _merged(msg: M, occurrences: Sequence[memoryview]) -> M:
    # A message field that occurs more than once is merged, each occurrence parsed on its own.
    for part in occurrences:
        msg.MergeFromString(bytes(part))
    return msg


def layout_to_bytes(layout: PayloadLayout) -> bytes:
    """A whole layout for storage (never sent): codec and manifest, shards, size and digest.

    As protobuf bytes of ``{DeltaHeader spec = 1; repeated ShardSpec shards = 2;
    uint64 total_bytes = 3; bytes digest = 4}`` (no such message is declared: it
    does not travel).
    """
    spec = pb.DeltaHeader(
        codec=codec_to_proto(layout.codec), manifest=[tensor_spec_to_proto(t) for t in layout.manifest]
    )
    parts: list[bytes | memoryview] = []
    _put_message(parts, 1, spec.SerializeToString())
    for shard in layout.shards:
        _put_message(parts, 2, shard_to_proto(shard).SerializeToString())
    parts += [wire.tag(3, wire.VARINT), wire.varint(layout.total_bytes)]
    _put_message(parts, 4, layout.digest)
    return b"".join(parts)


def layout_from_bytes(raw: bytes) -> PayloadLayout:
    """A layout stored by ``layout_to_bytes``, read back (InvalidArgument if the bytes are not one)."""
    spec = pb.DeltaHeader()
    shards: list[ShardSpec] = []
    total, digest = 0, b""
    try:
        for number, wire_type, value in wire.fields(memoryview(raw)):
            if (number, wire_type) == (3, wire.VARINT):
                total = int(value)
            elif not isinstance(value, memoryview):
                raise wire.WireError(f"field {number} of wire type {wire_type}")
            elif number == 1:
                spec.MergeFromString(bytes(value))
            elif number == 2:
                shards.append(shard_from_proto(pb.ShardSpec.FromString(bytes(value))))
            elif number == 4:
                digest = bytes(value)
    except (wire.WireError, DecodeError) as exc:
        raise InvalidArgument(f"not a stored payload layout: {exc}", field="layout") from None
    payload = spec_from_proto(spec)
    return PayloadLayout(payload.codec, payload.manifest, tuple(shards), total, digest)


def shards_to_bytes(shards: Sequence[ShardSpec]) -> bytes:
    """Shard specs for storage (an upload's accepted so far): protobuf bytes of ``{repeated ShardSpec shards = 1}``."""
    parts: list[bytes | memoryview] = []
    for shard in shards:
        _put_message(parts, 1, shard_to_proto(shard).SerializeToString())
    return b"".join(parts)


def shards_from_bytes(raw: bytes) -> tuple[ShardSpec, ...]:
    """Shard specs stored by ``shards_to_bytes``, read back (InvalidArgument if the bytes are not such)."""
    try:
        return tuple(
            shard_from_proto(pb.ShardSpec.FromString(bytes(value)))
            for number, _, value in wire.fields(memoryview(raw))
            if number == 1 and isinstance(value, memoryview)
        )
    except (wire.WireError, DecodeError) as exc:
        raise InvalidArgument(f"not stored shard specs: {exc}", field="shards") from None


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
        upload_codec=_upload_codec(msg, default.upload_codec),
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


def _upload_codec(msg: federation_pb2.TrainingSpec, default: Codec) -> Codec:
    if not msg.HasField("upload_codec"):
        return default
    codec = codec_from_proto(msg.upload_codec)
    # A spec recorded before Codec.digest existed names none: the default digest, not a refusal.
    return codec if codec.digest != Digest.UNSPECIFIED else dataclasses.replace(codec, digest=default.digest)


def _lora_from_proto(msg: federation_pb2.LoraSpec, default: LoraSpec) -> LoraSpec:
    return LoraSpec(
        rank=msg.rank or default.rank,
        alpha=msg.alpha or default.alpha,
        dropout=msg.dropout,
        target_modules=tuple(msg.target_modules) or default.target_modules,
    )
