"""The safetensors header of a shard: written by the encoder, checked by the decoder.

A shard's decompressed form is a plain safetensors file (8-byte little-endian
header length, JSON header padded with spaces to 8 bytes, then the data), so
`safetensors.torch.load` reads it. We write the header ourselves rather than
call `safetensors.torch.save`, which would copy every byte of the shard into
one Python bytes object before we could compress it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

from common.delta import Piece, TensorSpec
from common.dtypes import DType, itemsize
from common.errors import MalformedShard

_LEN = struct.Struct("<Q")


def build_header(pieces: Sequence[Piece], manifest: Sequence[TensorSpec], wire: Sequence[DType]) -> bytes:
    """Header bytes (length prefix included) for ``pieces`` stored back to back in order."""
    entries: dict[str, object] = {}
    offset = 0
    for piece in pieces:
        size = piece.count * itemsize(wire[piece.tensor])
        entries[manifest[piece.tensor].name] = {
            "dtype": wire[piece.tensor].name,
            "shape": [piece.count],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return _LEN.pack(len(text)) + text


def check_header(
    raw: bytes, pieces: Sequence[Piece], manifest: Sequence[TensorSpec], wire: Sequence[DType]
) -> None:
    """Raise MalformedShard unless ``raw`` is exactly the header that describes ``pieces``.

    The shard spec in the (already validated) delta header is the source of
    truth; the safetensors header must agree with it entry for entry, so that
    a shard file is never read by offsets nobody checked.
    """
    if len(raw) < 8:
        raise MalformedShard(f"safetensors header is {len(raw)} bytes; needs at least 8", field="header")
    (length,) = _LEN.unpack_from(raw)
    if length != len(raw) - 8:
        raise MalformedShard(
            f"safetensors header length field says {length} bytes, frame holds {len(raw) - 8}",
            field="header.length",
        )
    try:
        entries = json.loads(raw[8:].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError: bad UTF-8, bad JSON, or an integer over Python's 4300-digit limit;
        # RecursionError: arrays nested deeper than the parser's recursion limit.
        raise MalformedShard(f"safetensors header is not valid JSON: {exc}", field="header") from None
    if not isinstance(entries, dict):
        raise MalformedShard("safetensors header is not a JSON object", field="header")
    entries.pop("__metadata__", None)
    names = [manifest[p.tensor].name for p in pieces]
    if len(entries) != len(pieces) or set(entries) != set(names):
        raise MalformedShard(
            f"safetensors header lists {len(entries)} tensors, the shard spec {len(pieces)}; "
            "names must match one to one",
            field="header.tensors",
        )
    offset = 0
    for piece, name in zip(pieces, names, strict=True):
        entry = entries[name]
        size = piece.count * itemsize(wire[piece.tensor])
        want = {
            "dtype": wire[piece.tensor].name,
            "shape": [piece.count],
            "data_offsets": [offset, offset + size],
        }
        # == would let 4.0 or true stand for 4 or 1; safetensors refuses them, so the check is by type too.
        if (
            not isinstance(entry, dict)
            or entry != want
            or any(type(v) is not int for v in (*entry["shape"], *entry["data_offsets"]))
        ):
            raise MalformedShard(
                f"safetensors entry {name!r} is {entry!r}; the shard spec implies {want!r} "
                "(dtype, 1-D shape and back-to-back offsets)",
                field=f"header[{name!r}]",
            )
        offset += size
