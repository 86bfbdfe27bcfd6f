"""Check the vectors against this implementation: decode the valid ones, refuse the malformed ones, re-encode.

Each check returns a list of problems (empty: the vector holds), so the
command line reports them all and the tests name the vector that failed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch

from common.codec import decode_chunks, encode, make_chunk, validate_layout
from common.codec.chunks import crc32c
from common.codec.compact import CompactAssembler, is_lossy, wire_manifest
from common.codec.decoder import DecodedPiece
from common.codec.layout import validate_codec
from common.conformance.tamper import split_frames, unzstd
from common.conformance.vectors import Vector, zstd_versions
from common.delta import Chunk, DeltaHeader, PayloadLayout, TensorSpec
from common.dtypes import to_torch
from common.errors import GdfedError


def expected_manifest(vector: Vector, header: DeltaHeader) -> tuple[TensorSpec, ...] | None:
    """What the receiver checks the header's manifest against: the round's, in the codec's wire form."""
    if vector.round_manifest is None:
        return None
    # The codec first, as the aggregator does: the lossy manifest derives from it (top-k's k).
    validate_codec(header.layout.codec)
    return wire_manifest(vector.round_manifest, header.layout.codec)


def stream(vector: Vector, header: DeltaHeader) -> list[Chunk]:
    """The chunks a receiver gets: the vector's explicit plan, or the payload cut in ``chunk_bytes``.

    Cut as the bytes are, whatever the header claims: the chunk that ends the
    payload is marked last only when the payload holds ``total_bytes`` exactly
    (a truncated payload's stream just stops).
    """
    data = vector.payload
    if vector.chunks is not None:
        return [
            make_chunk(c.offset, data[c.offset : c.offset + c.length], c.last, header if c.header else None)
            if c.crc_ok
            else _bad_crc(
                c.offset, data[c.offset : c.offset + c.length], c.last, header if c.header else None
            )
            for c in vector.chunks
        ]
    step = vector.chunk_bytes
    offsets = range(0, len(data), step) if data else range(1)
    complete = len(data) == header.layout.total_bytes
    return [
        make_chunk(o, data[o : o + step], complete and o + step >= len(data), header if o == 0 else None)
        for o in offsets
    ]


def _bad_crc(offset: int, data: bytes, last: bool, header: DeltaHeader | None) -> Chunk:
    return Chunk(offset=offset, data=data, crc32=crc32c(data) ^ 0x1, last=last, header=header)


def decode(vector: Vector) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The vector's stream through the receiver's path: header, chunks, shards, and (lossy) the dense tensors.

    Raises the GdfedError a receiver answers with.
    """
    header = vector.header()
    expected = expected_manifest(vector, header)
    _, tensors = decode_chunks(stream(vector, header), expected=expected)
    if not is_lossy(header.layout.codec):
        return tensors, None
    assert vector.round_manifest is not None, "a lossy vector names the round's manifest"
    return tensors, expand(header.layout, vector.round_manifest, tensors)


def expand(
    layout: PayloadLayout, round_manifest: Sequence[TensorSpec], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The dense fp32 tensors a lossy upload stands for, through the aggregator's checks (CompactAssembler)."""
    assembler = CompactAssembler(layout, round_manifest)
    pieces = [
        DecodedPiece(i, spec.name, 0, tensors[spec.name].reshape(-1))
        for i, spec in enumerate(layout.manifest)
    ]
    specs = {spec.name: spec for spec in round_manifest}
    dense: dict[str, torch.Tensor] = {}
    for exp in assembler.add(pieces):
        spec = specs[exp.name]
        out = dense.setdefault(exp.name, torch.zeros(spec.shape, dtype=to_torch(spec.dtype)))
        flat = out.view(-1)
        for start, values in exp.ranges():
            flat[start : start + values.numel()] = values
    return dense


def check_valid(vector: Vector) -> list[str]:
    """The vector decodes, through every check, to exactly its stored tensors (bit for bit)."""
    try:
        tensors, dense = decode(vector)
    except GdfedError as exc:
        return [f"{vector.name}: refused with {exc.code.name} {exc.reason}: {exc.message}"]
    problems = _compare(vector.name, tensors, vector.tensors)
    if vector.dense is not None or dense is not None:
        problems += _compare(f"{vector.name} (dense)", dense or {}, vector.dense or {})
    return problems


def check_refused(vector: Vector) -> list[str]:
    """The vector is refused with its stated status and reason, at its stated stage."""
    refusal = vector.refusal
    assert refusal is not None
    try:
        header = vector.header()
        validate_layout(header.layout, expected=expected_manifest(vector, header))
        at_header = None
    except GdfedError as exc:
        at_header = exc
    if (at_header is not None) != (refusal.stage == "header"):
        where = f"at the header ({at_header.reason})" if at_header else "after the header"
        return [f"{vector.name}: refused {where}; the vector says stage {refusal.stage!r}"]
    error = at_header
    if error is None:
        try:
            decode(vector)
        except GdfedError as exc:
            error = exc
        else:
            return [
                f"{vector.name}: decoded without error; must be refused with {refusal.status} {refusal.reason}"
            ]
    if (error.code.name, error.reason) != (refusal.status, refusal.reason):
        return [
            f"{vector.name}: refused with {error.code.name} {error.reason} ({error.message}); "
            f"the vector says {refusal.status} {refusal.reason}"
        ]
    return []


def check_reproduced(vector: Vector, made_with: Mapping[str, str]) -> tuple[list[str], str]:
    """Encoding the stored tensors gives the stored payload and header byte for byte.

    Returns the problems, and why the byte comparison was skipped ("" when it
    ran): compressed bytes, and the sizes and digests over them, depend on the
    zstd version, so under another one only what does not is compared: the
    header's codec, manifest, pieces and raw sizes, the frame count, and every
    frame's decompressed bytes.
    """
    if not vector.reproducible or vector.refusal is not None:
        return [], "not reproducible by design"
    want = vector.header().layout
    sink = io.BytesIO()
    got = encode(vector.tensors, want.codec, sink, shard_bytes=vector.shard_bytes, manifest=want.manifest)
    payload = sink.getvalue()
    problems = _compare_uncompressed(vector.name, got, payload, want, vector.payload)
    if dict(made_with) != zstd_versions():
        return problems, f"the payloads were made with zstd {dict(made_with)}; this is {zstd_versions()}"
    if got != want:
        problems.append(f"{vector.name}: the encoder's header differs from the stored one")
    if payload != vector.payload:
        problems.append(f"{vector.name}: the encoder's payload differs from the stored one")
    return problems, ""


def _compare_uncompressed(
    name: str, got: PayloadLayout, payload: bytes, want: PayloadLayout, stored: bytes
) -> list[str]:
    if (got.codec, got.manifest) != (want.codec, want.manifest):
        return [f"{name}: codec or manifest differ from the stored header"]
    if [(s.pieces, s.raw_bytes, len(s.frame_bytes)) for s in got.shards] != [
        (s.pieces, s.raw_bytes, len(s.frame_bytes)) for s in want.shards
    ]:
        return [f"{name}: shards (pieces, raw_bytes, frame count) differ from the stored header"]
    for s, (mine, theirs) in enumerate(
        zip(split_frames(got, payload), split_frames(want, stored), strict=True)
    ):
        for f, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if unzstd(a) != unzstd(b):
                return [f"{name}: shard {s} frame {f} decompresses to other bytes than the stored one"]
    return []


def _compare(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    if set(got) != set(want):
        return [f"{name}: decoded tensors {sorted(got)} differ from the stored {sorted(want)}"]
    problems = []
    for key, w in want.items():
        g = got[key]
        if g.dtype != w.dtype or g.shape != w.shape:
            problems.append(f"{name}: {key!r} is {g.dtype} {list(g.shape)}; stored {w.dtype} {list(w.shape)}")
        elif g.numel() and not torch.equal(_bits(g), _bits(w)):
            problems.append(f"{name}: {key!r} differs from the stored values")
    return problems


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bytes of ``t``: compares floats bit for bit (-0.0 against 0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def check_all(vectors: Sequence[Vector], made_with: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Every check over every vector: (problems, notes on comparisons skipped)."""
    problems: list[str] = []
    skipped: list[str] = []
    for v in vectors:
        if v.refusal is not None:
            problems += check_refused(v)
            continue
        problems += check_valid(v)
        found, why = check_reproduced(v, made_with)
        problems += found
        if why and v.reproducible:
            skipped.append(f"{v.name}: byte-for-byte comparison skipped: {why}")
    return problems, skipped
