"""The protobuf wire format by hand, for the one message whose bytes must not be copied (DeltaChunk).

Just enough to walk a message's top-level fields the way upb (the protobuf
runtime in use) does: varints of at most 10 bytes truncated to 64 bits; tags
of at most 5 bytes, below 2^32, field number not 0; groups skipped whole and
matched; anything else (a wire type of 6 or 7, a stray end-group, a length
past the end) refused. common.serde builds chunk_to_wire/chunk_from_wire on it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_U64 = (1 << 64) - 1
_MAX_GROUP_DEPTH = 100  # upb's default recursion limit


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    """``value`` (0 <= value < 2^64) as a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def read_varint(buf: memoryview, pos: int, max_bytes: int = 10) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = 0
    for i in range(max_bytes):
        if pos + i >= len(buf):
            raise WireError("a varint runs past the end")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value & _U64, pos + i + 1
    raise WireError(f"a varint is longer than {max_bytes} bytes")


def read_tag(buf: memoryview, pos: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag)."""
    value, end = read_varint(buf, pos, 5)
    if value >= 1 << 32 or value >> 3 == 0:
        raise WireError(f"bad tag {value}")
    return value >> 3, value & 7, end


def _skip_group(buf: memoryview, pos: int, number: int, depth: int) -> int:
    if depth > _MAX_GROUP_DEPTH:
        raise WireError("groups nest too deep")
    while True:
        if pos >= len(buf):
            raise WireError("a group is not closed")
        inner, wire_type, pos = read_tag(buf, pos)
        if wire_type == EGROUP:
            if inner != number:
                raise WireError(f"group {number} closed as {inner}")
            return pos
        _value, pos = _read_value(buf, pos, inner, wire_type, depth + 1)


def _read_value(
    buf: memoryview, pos: int, number: int, wire_type: int, depth: int
) -> tuple[int | memoryview, int]:
    if wire_type == VARINT:
        return read_varint(buf, pos)
    if wire_type == I64:
        if pos + 8 > len(buf):
            raise WireError("a fixed64 runs past the end")
        return int(struct.unpack_from("<Q", buf, pos)[0]), pos + 8
    if wire_type == I32:
        if pos + 4 > len(buf):
            raise WireError("a fixed32 runs past the end")
        return int(struct.unpack_from("<I", buf, pos)[0]), pos + 4
    if wire_type == LEN:
        size, pos = read_varint(buf, pos)
        if size > len(buf) - pos:
            raise WireError(f"a field of {size} bytes runs past the end")
        return buf[pos : pos + size], pos + size
    if wire_type == SGROUP:
        return 0, _skip_group(buf, pos, number, depth)
    raise WireError(f"wire type {wire_type} of field {number}")


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Each top-level field as (number, wire type, value): an int, or for LEN a slice of ``buf`` (no copy).

    Groups are checked and skipped (value 0); the caller ignores what it does not know.
    """
    pos = 0
    while pos < len(buf):
        number, wire_type, pos = read_tag(buf, pos)
        value, pos = _read_value(buf, pos, number, wire_type, 0)
        yield number, wire_type, value
