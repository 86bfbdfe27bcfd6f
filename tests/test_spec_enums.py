"""Every IntEnum that mirrors a wire enum has the generated enum's names and values, all of them.

A mirror may leave out ``*_UNSPECIFIED`` (0: "not set", never a value the code
branches on) and nothing else; it may not add a member the wire does not have.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest

from common.delta import Cast, DeltaKind, Lossy
from common.dtypes import DType
from common.pb.gradualdiff.v1 import admin_pb2, delta_pb2, federation_pb2
from common.spec import (
    BaseDtype,
    Device,
    Directive,
    LocalOptimizer,
    LrSchedule,
    Method,
    Phase,
    Quantization,
    TrainMode,
)
from server.records import RoundState, SiteState

# (mirror, generated enum (an EnumTypeWrapper at run time), the prefix of its value names)
MIRRORS: list[tuple[type[enum.IntEnum], Any, str]] = [
    (Method, federation_pb2.Method, "METHOD_"),
    (TrainMode, federation_pb2.TrainMode, "TRAIN_MODE_"),
    (Directive, federation_pb2.Directive, "DIRECTIVE_"),
    (Phase, federation_pb2.Phase, "PHASE_"),
    (Device, federation_pb2.Device, "DEVICE_"),
    (RoundState, federation_pb2.RoundState, "ROUND_STATE_"),
    (SiteState, admin_pb2.SiteState, "SITE_STATE_"),
    (DType, delta_pb2.DType, "DTYPE_"),
    (Cast, delta_pb2.Cast, "CAST_"),
    (Lossy, delta_pb2.Lossy, "LOSSY_"),
    (DeltaKind, delta_pb2.DeltaKind, "DELTA_KIND_"),
    (BaseDtype, federation_pb2.BaseDtype, "BASE_DTYPE_"),
    (Quantization, federation_pb2.Quantization, "QUANTIZATION_"),
    (LocalOptimizer, federation_pb2.LocalOptimizer, "LOCAL_OPTIMIZER_"),
    (LrSchedule, federation_pb2.LrSchedule, "LR_SCHEDULE_"),
]


@pytest.mark.parametrize(("mirror", "wire", "prefix"), MIRRORS, ids=[m.__name__ for m, _, _ in MIRRORS])
def test_the_mirror_equals_its_wire_enum(mirror: type[enum.IntEnum], wire: Any, prefix: str) -> None:
    assert issubclass(mirror, enum.IntEnum)
    names = list(wire.keys())
    assert all(name.startswith(prefix) for name in names), (prefix, names)
    on_wire = {name.removeprefix(prefix): int(value) for name, value in wire.items()}
    mirrored = {member.name: member.value for member in mirror}
    if on_wire.get("UNSPECIFIED") == 0:
        mirrored.setdefault("UNSPECIFIED", 0)
    assert mirrored == on_wire
