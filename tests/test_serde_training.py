"""TrainingSpec <-> federation_pb2.TrainingSpec: a round trip keeps every field; unset reads as the default."""

from __future__ import annotations

import pytest

from common.delta import Cast, Codec, Lossy
from common.errors import InvalidArgument
from common.pb.gradualdiff.v1 import federation_pb2
from common.serde import training_spec_from_proto, training_spec_to_proto
from common.spec import LoraSpec, Method, TrainingSpec, TrainMode

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
    ),
    seed=7,
    prox_mu=0.25,
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


@pytest.mark.parametrize(("field", "name"), [("method", "training.method"), ("mode", "training.mode")])
def test_an_unknown_enum_value_is_refused_naming_its_field(field: str, name: str) -> None:
    msg = federation_pb2.TrainingSpec()
    setattr(msg, field, 99)
    with pytest.raises(InvalidArgument, match=f"{name} has unknown value 99") as info:
        training_spec_from_proto(msg)
    assert type(info.value) is InvalidArgument and info.value.field == name
