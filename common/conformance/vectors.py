"""What a conformance vector is, and how the vectors directory stores it (index.json and one file per part).

A vector is what a receiver meets: one or more streams of serialized
``DeltaChunk`` messages (a second stream resumes an upload the first broke
off), and the manifest the receiver expects. A valid vector adds what it
decodes to; a malformed one, the refusal it must get. The messages are the
truth; the header JSON and the chunk summary in the index are there for
people to read, and are derived from them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import zstandard
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from common.codec.chunks import crc32c
from common.delta import Chunk, TensorSpec
from common.dtypes import DType
from common.errors import GdfedError
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.protogen import PROTO_DIR
from common.serde import chunk_to_proto, codec_from_proto

VECTORS_DIR = PROTO_DIR / "gradualdiff" / "v1" / "vectors"
INDEX = "index.json"
FORMAT = "gradualdiff.v1 conformance vectors 2"
# A valid vector's chunks: at most this many bytes, cut from each shard's start (a chunk never
# crosses a shard's end). Smaller than a shard and not a divisor of any frame size, so chunk and
# frame boundaries fall apart.
CHUNK_BYTES = 4096

STAGES = {
    "header": "refused from the first chunk's header alone, before any payload byte is used",
    "chunk": (
        "refused at a chunk: its encoding, order, CRC-32C, size and bounds, where shard specs sit, "
        "and the shard spec it carries checked against the manifest and the shards before it"
    ),
    "shard": "refused once a shard is complete and decoded: its digest, frames, safetensors header, values",
    "end": "refused when the stream ends",
    "assembly": "refused when a lossy tensor's compact parts are complete (top-k indices, int8 scales)",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """How a receiver must refuse a malformed vector: gRPC status, ErrorInfo reason, and when."""

    status: str
    reason: str
    stage: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Vector:
    """One conformance vector; ``refusal`` is None for a valid one.

    ``streams``: the serialized ``DeltaChunk`` messages the receiver gets, per
    stream; a second stream is the same upload resumed where the first ended.
    """

    name: str
    exercises: str
    streams: tuple[tuple[bytes, ...], ...]
    round_manifest: tuple[TensorSpec, ...] | None = None  # what the receiver expects; None: the header's
    refusal: Refusal | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as decoded (the header's manifest)
    dense: dict[str, torch.Tensor] | None = None  # lossy: the dense fp32 tensors they expand to
    shard_bytes: int = 0  # what the encoder was given (reproduction)
    chunk_bytes: int = CHUNK_BYTES  # what the stream was cut with (reproduction)
    reproducible: bool = True

    @property
    def messages(self) -> tuple[bytes, ...]:
        """Every stream's messages, in order."""
        return tuple(m for s in self.streams for m in s)

    def header_message(self) -> pb.DeltaHeader | None:
        """The first header the messages carry (parsed by protobuf only, no checks), or None."""
        for raw in self.messages:
            msg = _parse(raw)
            if msg is not None and msg.HasField("header"):
                return msg.header
        return None

    @property
    def codec(self) -> str:
        """The codec's short name and digest (``bf16+shuffle+zstd1/blake3``), or ``?`` where it does not parse."""
        header = self.header_message()
        try:
            codec = codec_from_proto(header.codec) if header is not None else None
        except GdfedError:
            codec = None
        if codec is None:
            return "?"
        return f"{codec.name}/{codec.digest.name.lower()}"


def serialize(chunks: Sequence[Chunk]) -> tuple[bytes, ...]:
    """The chunks as protobuf would put them on the wire (deterministic serialization)."""
    return tuple(chunk_to_proto(c).SerializeToString(deterministic=True) for c in chunks)


def header_text(header: pb.DeltaHeader) -> str:
    """The header as protobuf JSON: proto field names, every field (defaults too, so nothing is left to guess),
    uint64 as strings and bytes as base64 (proto3's JSON mapping); an enum value without a name as a number."""
    text = json_format.MessageToJson(
        header, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=1
    )
    return text + "\n"


def chunk_summary(raw: bytes) -> dict[str, Any]:
    """What one message is, for people: offset, data bytes, which fields it carries, whether its CRC holds."""
    msg = _parse(raw)
    if msg is None:
        return {"not_a_delta_chunk": len(raw)}
    return {
        "offset": msg.offset,
        "bytes": len(msg.data),
        "header": msg.HasField("header"),
        "shard": msg.HasField("shard"),
        "last": msg.last,
        "crc_ok": crc32c(msg.data) == msg.crc32,
    }


def _parse(raw: bytes) -> pb.DeltaChunk | None:
    msg = pb.DeltaChunk()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return None
    return msg


def spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype.name, "shape": list(spec.shape)}


def spec_from_json(item: dict[str, Any]) -> TensorSpec:
    return TensorSpec(item["name"], DType[item["dtype"]], tuple(int(d) for d in item["shape"]))


def zstd_versions() -> dict[str, str]:
    """The zstd that made the payloads: compressed bytes may differ under another version."""
    return {
        "libzstd": ".".join(str(v) for v in zstandard.ZSTD_VERSION),
        "python-zstandard": zstandard.__version__,
    }


def messages_text(messages: Sequence[bytes]) -> bytes:
    """One message per line, base64 (RFC 4648, standard alphabet, padded, no line breaks within one)."""
    return b"".join(base64.b64encode(m) + b"\n" for m in messages)


def messages_from_text(text: bytes) -> tuple[bytes, ...]:
    return tuple(base64.b64decode(line, validate=True) for line in text.split(b"\n")[:-1])


def write(directory: Path, vectors: list[Vector], notes: dict[str, Any]) -> list[Path]:
    """Write every vector's files and the index; tensor files with equal bytes are shared."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file():
            old.unlink()
    written: list[Path] = []
    shared: dict[bytes, str] = {}

    def put(name: str, data: bytes) -> str:
        (directory / name).write_bytes(data)
        written.append(directory / name)
        return name

    def put_binary(name: str, data: bytes) -> str:
        # Binary content is kept as base64 text: the repository tracks no binary files, and a
        # third party reads it with any base64 decoder (RFC 4648, lines of 76 characters).
        if data not in shared:
            shared[data] = put(name, base64.encodebytes(data))
        return shared[data]

    entries: dict[str, list[dict[str, Any]]] = {"valid": [], "malformed": []}
    for v in vectors:
        entry: dict[str, Any] = {"name": v.name, "codec": v.codec, "exercises": v.exercises}
        header = v.header_message()
        if header is not None:
            entry["header"] = put(f"{v.name}.header.json", header_text(header).encode())
        entry["chunks"] = put(f"{v.name}.chunks.b64", messages_text(v.messages))
        entry["streams"] = [len(s) for s in v.streams]
        entry["stream"] = [chunk_summary(m) for m in v.messages]
        if v.round_manifest is not None:
            entry["round_manifest"] = [spec_json(s) for s in v.round_manifest]
        if v.refusal is None:
            entry["tensors"] = put_binary(f"{v.name}.tensors.b64", _safetensors(v.tensors))
            if v.dense is not None:
                entry["dense"] = put_binary(f"{v.name}.dense.b64", _safetensors(v.dense))
            entry["shard_bytes"] = v.shard_bytes
            entry["chunk_bytes"] = v.chunk_bytes
            entry["reproducible"] = v.reproducible
            entries["valid"].append(entry)
        else:
            entry.update(status=v.refusal.status, reason=v.refusal.reason, stage=v.refusal.stage)
            entries["malformed"].append(entry)
    index = {"format": FORMAT, **notes, "zstd": zstd_versions(), "stages": STAGES, **entries}
    put(INDEX, (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode())
    return written


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({name: t.contiguous() for name, t in tensors.items()})


def _binary(path: Path) -> bytes:
    return base64.decodebytes(path.read_bytes())


def read_index(directory: Path = VECTORS_DIR) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((directory / INDEX).read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise ValueError(f"{directory / INDEX}: format is {index.get('format')!r}, expected {FORMAT!r}")
    return index


def load(directory: Path = VECTORS_DIR) -> list[Vector]:
    """Every vector of the directory, valid ones first, as the index lists them."""
    index = read_index(directory)
    out = []
    for kind in ("valid", "malformed"):
        for entry in index[kind]:
            out.append(_vector(directory, entry, malformed=kind == "malformed"))
    return out


def _vector(directory: Path, entry: dict[str, Any], *, malformed: bool) -> Vector:
    round_manifest = entry.get("round_manifest")
    try:
        messages = messages_from_text((directory / entry["chunks"]).read_bytes())
    except binascii.Error as exc:
        raise ValueError(f"{entry['chunks']}: a line is not base64 ({exc})") from None
    counts = entry["streams"]
    if sum(counts) != len(messages):
        raise ValueError(f"{entry['chunks']}: {len(messages)} messages; streams says {counts}")
    streams, at = [], 0
    for n in counts:
        streams.append(messages[at : at + n])
        at += n
    common: dict[str, Any] = {
        "name": entry["name"],
        "exercises": entry["exercises"],
        "streams": tuple(streams),
        "round_manifest": None
        if round_manifest is None
        else tuple(spec_from_json(s) for s in round_manifest),
    }
    if malformed:
        return Vector(**common, refusal=Refusal(entry["status"], entry["reason"], entry["stage"]))
    dense = entry.get("dense")
    return Vector(
        **common,
        tensors=safetensors.torch.load(_binary(directory / entry["tensors"])),
        dense=None if dense is None else safetensors.torch.load(_binary(directory / dense)),
        shard_bytes=entry["shard_bytes"],
        chunk_bytes=entry["chunk_bytes"],
        reproducible=entry["reproducible"],
    )
