"""What a conformance vector is, and how the vectors directory stores it (index.json and one file per part).

A vector is a delta stream as a receiver meets it: the header (the first
chunk's ``DeltaHeader``, stored as protobuf JSON), the payload bytes, how they
are cut into chunks, and the manifest the receiver expects. A valid vector
adds what it decodes to; a malformed one, the refusal it must get.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import zstandard
from google.protobuf import json_format

from common.delta import DeltaHeader, TensorSpec
from common.dtypes import DType
from common.errors import GdfedError
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.protogen import PROTO_DIR
from common.serde import header_from_proto, header_to_proto

VECTORS_DIR = PROTO_DIR / "gradualdiff" / "v1" / "vectors"
INDEX = "index.json"
FORMAT = "gradualdiff.v1 conformance vectors 1"
# A valid vector's stream: chunks of this many bytes unless it says otherwise. Smaller than a
# shard and not a divisor of any frame size, so chunk, frame and shard boundaries all fall apart.
CHUNK_BYTES = 4096

STAGES = {
    "header": "refused from the header alone, before any payload byte is read",
    "chunk": "refused at the chunk named (order, CRC-32C, bounds)",
    "shard": "refused once the shard's compressed bytes have all arrived",
    "end": "refused when the stream ends",
    "assembly": "refused when a lossy tensor's compact parts are complete (top-k indices, int8 scales)",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """How a receiver must refuse a malformed vector: gRPC status, ErrorInfo reason, and when."""

    status: str
    reason: str
    stage: str


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One chunk of an explicit stream: ``payload[offset:offset + length]``, sent as described."""

    offset: int
    length: int
    last: bool
    header: bool = False
    crc_ok: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Vector:
    """One conformance vector; ``refusal`` is None for a valid one."""

    name: str
    exercises: str
    header_json: str  # the first chunk's DeltaHeader as protobuf JSON (see header_text)
    payload: bytes
    round_manifest: tuple[TensorSpec, ...] | None = None  # what the receiver expects; None: the header's
    chunk_bytes: int = CHUNK_BYTES
    chunks: tuple[ChunkPlan, ...] | None = None
    refusal: Refusal | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as decoded (the header's manifest)
    dense: dict[str, torch.Tensor] | None = None  # lossy: the dense fp32 tensors they expand to
    shard_bytes: int = 0  # what the encoder was given (reproduction)
    reproducible: bool = True

    def header(self) -> DeltaHeader:
        """The parsed header; raises what a receiver's parsing raises (InvalidArgument: an unknown enum value)."""
        return header_from_text(self.header_json)

    @property
    def codec(self) -> str:
        """The codec's short name (``bf16+shuffle+zstd1``), or ``?`` for a header that does not parse."""
        try:
            return self.header().layout.codec.name
        except GdfedError:
            return "?"


def header_text(header: DeltaHeader) -> str:
    """The header as protobuf JSON: proto field names, every field (defaults too, so nothing is left to guess),
    uint64 as strings and bytes as base64 (proto3's JSON mapping)."""
    message = header_to_proto(header)
    text = json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=1
    )
    return text + "\n"


def header_from_text(text: str) -> DeltaHeader:
    """Parse a stored header; the serde checks (known enums, dtype set) apply, as at a receiver."""
    return header_from_proto(json_format.Parse(text, pb.DeltaHeader()))


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


def write(directory: Path, vectors: list[Vector], notes: dict[str, Any]) -> list[Path]:
    """Write every vector's files and the index; payloads with equal bytes share one file."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file():
            old.unlink()
    written: list[Path] = []
    payload_files: dict[bytes, str] = {}

    def put(name: str, data: bytes) -> str:
        (directory / name).write_bytes(data)
        written.append(directory / name)
        return name

    def put_binary(name: str, data: bytes) -> str:
        # Binary content is kept as base64 text: the repository tracks no binary files, and a
        # third party reads it with any base64 decoder (RFC 4648, lines of 76 characters).
        return put(name, base64.encodebytes(data))

    entries: dict[str, list[dict[str, Any]]] = {"valid": [], "malformed": []}
    for v in vectors:
        entry: dict[str, Any] = {"name": v.name, "codec": v.codec, "exercises": v.exercises}
        entry["header"] = put(f"{v.name}.header.json", v.header_json.encode())
        if v.payload not in payload_files:
            payload_files[v.payload] = put_binary(f"{v.name}.payload.b64", v.payload)
        entry["payload"] = payload_files[v.payload]
        if v.round_manifest is not None:
            entry["round_manifest"] = [spec_json(s) for s in v.round_manifest]
        if v.chunks is not None:
            entry["chunks"] = [
                {
                    "offset": c.offset,
                    "length": c.length,
                    "last": c.last,
                    "header": c.header,
                    "crc_ok": c.crc_ok,
                }
                for c in v.chunks
            ]
        else:
            entry["chunk_bytes"] = v.chunk_bytes
        if v.refusal is None:
            entry["tensors"] = put_binary(f"{v.name}.tensors.b64", _safetensors(v.tensors))
            if v.dense is not None:
                entry["dense"] = put_binary(f"{v.name}.dense.b64", _safetensors(v.dense))
            entry["shard_bytes"] = v.shard_bytes
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
    chunks = entry.get("chunks")
    common: dict[str, Any] = {
        "name": entry["name"],
        "exercises": entry["exercises"],
        "header_json": (directory / entry["header"]).read_text(encoding="utf-8"),
        "payload": _binary(directory / entry["payload"]),
        "round_manifest": None
        if round_manifest is None
        else tuple(spec_from_json(s) for s in round_manifest),
        "chunk_bytes": entry.get("chunk_bytes", CHUNK_BYTES),
        "chunks": None if chunks is None else tuple(ChunkPlan(**c) for c in chunks),
    }
    if malformed:
        return Vector(**common, refusal=Refusal(entry["status"], entry["reason"], entry["stage"]))
    dense = entry.get("dense")
    return Vector(
        **common,
        tensors=safetensors.torch.load(_binary(directory / entry["tensors"])),
        dense=None if dense is None else safetensors.torch.load(_binary(directory / dense)),
        shard_bytes=entry["shard_bytes"],
        reproducible=entry["reproducible"],
    )
