"""Random and mutated protobuf messages for the fuzz loop, from the messages' own descriptors.

``random_message`` fills a message of any type with values chosen to hurt: integers at their
type's limits, NaN, infinities and 3e38, empty and very long strings, unknown enum numbers,
repeated fields of several items, nested messages a few levels deep. ``mutate`` takes a valid
message (a real Join, a real upload's chunk) and changes, clears or randomises a few of its
fields, so the daemon's checks past the first one are reached too. Every message stays
well-formed on the wire (undecodable bytes are another probe, see ``bench.reliability.fuzz``).
"""

from __future__ import annotations

import math
import random
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor as _FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)
F = _FieldDescriptor
# Fields as both protobuf backends type them (the upb one at run time).
FieldDescriptor = Any

_INT_LIMITS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.0e38, -3.4e38, 1e308, math.nan, math.inf, -math.inf]
_STRINGS = [
    "",
    "a",
    "b",
    "site-a",
    "../../etc/passwd",
    "x" * 5000,
    "é\u202e\x00",
    "round/1",
    "a b",
    "*",
    "%s%n",
    "\U0001f600",
]


def _int(rng: random.Random, kind: int) -> int:
    low, high = _INT_LIMITS[kind]
    choice = rng.random()
    if choice < 0.3:
        return rng.choice([low, high, 0, 1, -1 if low < 0 else 2])
    if choice < 0.7:
        return rng.randint(max(low, -3), min(high, 20))
    return rng.randint(low, high)


def _float(rng: random.Random, kind: int) -> float:
    value = rng.choice(_FLOATS) if rng.random() < 0.6 else rng.uniform(-1e6, 1e6)
    if kind == F.TYPE_FLOAT and math.isfinite(value) and abs(value) > 3.4e38:
        return math.copysign(3.4e38, value)  # a float field cannot hold it
    return value


def scalar(rng: random.Random, field: FieldDescriptor) -> Any:
    """A hostile value for one (non-message) field."""
    kind = field.type
    if kind in _INT_LIMITS:
        return _int(rng, kind)
    if kind in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return _float(rng, kind)
    if kind == F.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == F.TYPE_STRING:
        if rng.random() < 0.7:
            return rng.choice(_STRINGS)
        return "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(1, 40)))
    if kind == F.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 7, 64, 1024, 70000]))
    if kind == F.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [v.number for v in field.enum_type.values]
        return rng.choice(numbers) if rng.random() < 0.8 else rng.randint(-5, 1000)
    raise ValueError(f"no scalar for field type {kind}")


def _set_random(rng: random.Random, message: Message, field: FieldDescriptor, depth: int) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        target = getattr(message, field.name)
        key_field, value_field = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        for _ in range(rng.randint(0, 3)):
            key = scalar(rng, key_field)
            if value_field.message_type is not None:
                fill(rng, target[key], depth + 1)
            else:
                target[key] = scalar(rng, value_field)
        return
    repeated = field.is_repeated
    if field.message_type is not None:
        if repeated:
            items = getattr(message, field.name)
            for _ in range(rng.randint(0, 4)):
                fill(rng, items.add(), depth + 1)
        else:
            sub = getattr(message, field.name)
            sub.SetInParent()
            fill(rng, sub, depth + 1)
        return
    if repeated:
        getattr(message, field.name).extend(scalar(rng, field) for _ in range(rng.randint(0, 6)))
    else:
        setattr(message, field.name, scalar(rng, field))


def fill(rng: random.Random, message: Message, depth: int = 0) -> Message:
    """Set a random subset of ``message``'s fields to hostile values (nested up to 3 levels)."""
    for field in message.DESCRIPTOR.fields:
        if depth > 3 and field.message_type is not None:
            continue
        if rng.random() < 0.5:
            _set_random(rng, message, field, depth)
    return message


def random_message(rng: random.Random, kind: type[M]) -> M:
    message = kind()
    fill(rng, message)
    return message


def _fields_of(message: Message, path: tuple[str, ...] = ()) -> list[tuple[Message, FieldDescriptor]]:
    """Every (holder, field) reachable through the set sub-messages of ``message``."""
    out: list[tuple[Message, FieldDescriptor]] = []
    for field in message.DESCRIPTOR.fields:
        out.append((message, field))
        sub = field.message_type
        if (
            sub is not None
            and not field.is_repeated
            and not sub.GetOptions().map_entry
            and message.HasField(field.name)
        ):
            out += _fields_of(getattr(message, field.name), (*path, field.name))
    return out


def mutate(rng: random.Random, valid: M) -> M:
    """A copy of ``valid`` with one to three of its fields (nested ones too) cleared or randomised."""
    message = type(valid)()
    message.CopyFrom(valid)
    fields = _fields_of(message)
    for _ in range(rng.randint(1, 3) if fields else 0):
        holder, field = rng.choice(fields)
        if rng.random() < 0.25:
            holder.ClearField(field.name)
        else:
            if field.is_repeated or field.message_type is not None:
                holder.ClearField(field.name)
            _set_random(rng, holder, field, 2)
    return message
