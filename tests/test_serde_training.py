"""TrainingSpec <-> federation_pb2.TrainingSpec: a round trip keeps every field; unset reads as the default."""

from __future__ import annotations

import pytest

from common.delta import Cast, Codec, Digest, Lossy
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.pb.gradualdiff.v1 import federation_pb2
from common.serde import codec_to_proto, training_spec_from_proto, training_spec_to_proto
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

NOTHING_DEFAULT = TrainingSpec(
    method=Method.FEDCYBGD,
    mode=TrainMode.LORA,
    trainable_patterns=(r"\.q_proj\.", r"\.v_proj\."),
    lora=LoraSpec(rank=4, alpha=32.0, dropout=0.0, target_modules=("q_proj", "k_proj", "o_proj")),
    local_steps=3,
    batch_size=2,
    learning_rate=3e-3,
    max_seq_len=64,
    upload_codec=Codec(
        cast=Cast.BF16,
        byte_shuffle=False,
        block_bytes=4096,
        zstd_level=3,
        lossy=Lossy.TOPK,
        topk_fraction=0.01,
        digest=Digest.SHA256,
    ),
    seed=7,
    prox_mu=0.25,
    base_dtype=BaseDtype.FP16,
    quantization=Quantization.NF4,
    gradient_checkpointing=True,
    micro_batch_size=1,
    max_grad_norm=0.3,
    optimizer=LocalOptimizer.PAGED_ADAMW_8BIT,
    lr_schedule=LrSchedule.COSINE,
    min_learning_rate=1e-6,
    warmup_steps=5,
    schedule_rounds=40,
)


@pytest.mark.parametrize("spec", [TrainingSpec(), NOTHING_DEFAULT], ids=["defaults", "nothing-default"])
def test_a_spec_survives_the_wire(spec: TrainingSpec) -> None:
    raw = training_spec_to_proto(spec).SerializeToString()
    assert training_spec_from_proto(federation_pb2.TrainingSpec.FromString(raw)) == spec


def test_what_is_unset_reads_as_the_default() -> None:
    assert training_spec_from_proto(federation_pb2.TrainingSpec()) == TrainingSpec()
    # A zero whose default is not zero (proto3 cannot tell it from unset) reads as the default too.
    assert training_spec_from_proto(federation_pb2.TrainingSpec(local_steps=3)) == TrainingSpec(local_steps=3)
    # A LoraSpec sent empty: its dropout of 0 is taken as sent (no dropout is a setting of its own).
    lora = training_spec_from_proto(federation_pb2.TrainingSpec(lora=federation_pb2.LoraSpec())).lora
    assert lora == LoraSpec(dropout=0.0)
    # An upload codec recorded before Codec.digest existed names none: the default digest (BLAKE3).
    codec = federation_pb2.TrainingSpec(upload_codec=codec_to_proto(Codec(cast=Cast.BF16)))
    codec.upload_codec.digest = pb.DIGEST_UNSPECIFIED
    assert training_spec_from_proto(codec).upload_codec == Codec(cast=Cast.BF16, digest=Digest.BLAKE3)


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("method", "training.method"),
        ("mode", "training.mode"),
        ("base_dtype", "training.base_dtype"),
        ("quantization", "training.quantization"),
        ("optimizer", "training.optimizer"),
        ("lr_schedule", "training.lr_schedule"),
    ],
)
def test_an_unknown_enum_value_is_refused_naming_its_field(field: str, name: str) -> None:
    msg = federation_pb2.TrainingSpec()
    setattr(msg, field, 99)
    with pytest.raises(InvalidArgument, match=f"{name} has unknown value 99") as info:
        training_spec_from_proto(msg)
    assert type(info.value) is InvalidArgument and info.value.field == name


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"batch_size": 8, "micro_batch_size": 3}, "training.micro_batch_size", "must divide"),
        ({"max_grad_norm": float("nan")}, "training.max_grad_norm", "finite number >= 0"),
        ({"learning_rate": 1e-4, "min_learning_rate": 1e-3}, "training.min_learning_rate", "is above"),
        ({"quantization": Quantization.NF4}, "training.quantization", 'needs training.mode = "lora"'),
    ],
)
def test_a_spec_out_of_its_limits_is_refused_from_the_wire_too(
    changes: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument, match=words) as info:
        TrainingSpec(**changes)  # type: ignore[arg-type]
    assert info.value.field == field
    # The same limits hold for what a worker reads off the wire.
    msg = training_spec_to_proto(TrainingSpec())
    for name, value in changes.items():
        setattr(msg, name, int(value) if isinstance(value, Quantization) else value)
    with pytest.raises(InvalidArgument, match=words):
        training_spec_from_proto(msg)


def test_a_zero_step_count_is_refused_where_it_can_be_said() -> None:
    # On the wire a zero reads as the default (proto3), so only a spec built in code can say it.
    with pytest.raises(InvalidArgument, match=r"training\.local_steps = 0 must be >= 1"):
        TrainingSpec(local_steps=0)


def test_accumulation_splits_the_optimizer_batch() -> None:
    assert TrainingSpec(batch_size=8).accumulation_steps == 1
    spec = TrainingSpec(batch_size=8, micro_batch_size=2)
    assert (spec.micro_batch, spec.accumulation_steps) == (2, 4)
