"""Check the vectors against this implementation: decode the valid ones, refuse the malformed ones, re-encode.

Every vector goes through the receiver's own code: each message parsed by
``common.serde.chunk_from_wire`` (the zero-copy parser of the gRPC ends), the
header by ``validate_spec``, the stream by ``ChunkVerifier`` (which names the
stage of a refusal), and the payload by ``decode_chunks`` (or, for an upload
resumed in a second stream, ``decode_file`` over what both streams brought,
with the shard specs the receiver persisted). Each check returns a list of
problems (empty: the vector holds), so the command line reports them all and
the tests name the vector that failed.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from common.codec import decode_chunks, decode_file, encode, iter_chunks
from common.codec.chunks import ChunkVerifier
from common.codec.compact import CompactAssembler, is_lossy, wire_manifest
from common.codec.decoder import DecodedPiece
from common.codec.layout import validate_codec, validate_spec
from common.conformance.tamper import split_frames, unzstd
from common.conformance.vectors import Vector, zstd_versions
from common.delta import Chunk, DeltaHeader, PayloadLayout, PayloadSpec, ShardSpec, TensorSpec
from common.dtypes import to_torch
from common.errors import ChunkOrderError, GdfedError, TruncatedStream
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.serde import chunk_from_wire, chunk_to_wire, shards_from_bytes, shards_to_bytes


class Refused(Exception):
    """The receiver's refusal of a vector, with the stage it came at (vectors.STAGES)."""

    def __init__(self, stage: str, error: GdfedError) -> None:
        super().__init__(f"{stage}: {error.code.name} {error.reason}: {error.message}")
        self.stage = stage
        self.error = error


@dataclass(frozen=True, slots=True)
class Received:
    """What a receiver holds once every stream of a vector is in: the header, and the stored payload."""

    header: DeltaHeader
    expected: tuple[TensorSpec, ...] | None
    layout: PayloadLayout
    payload: bytes
    resume_at: tuple[int, ...]  # where each stream after the first started


def expected_manifest(vector: Vector, spec: PayloadSpec) -> tuple[TensorSpec, ...] | None:
    """What the receiver checks the header's manifest against: the round's, in the codec's wire form."""
    if vector.round_manifest is None:
        return None
    # The codec first, as the aggregator does: the lossy manifest derives from it (top-k's k).
    validate_codec(spec.codec)
    return wire_manifest(vector.round_manifest, spec.codec)


def _is_delta_chunk(raw: bytes) -> bool:
    try:
        pb.DeltaChunk().ParseFromString(raw)
    except Exception:  # protobuf's DecodeError, or what its C++ parser raises instead
        return False
    return True


def receive(vector: Vector) -> Received:
    """Every stream through the chunk checks, as an aggregator receives an upload; raises :class:`Refused`.

    Each stream starts with a chunk that carries the header (the same one on a
    resume); the receiver resumes at what it holds, with the shard specs it
    accepted before (through their storage form, as the aggregator persists them).
    """
    header: DeltaHeader | None = None
    expected: tuple[TensorSpec, ...] | None = None
    verifier: ChunkVerifier | None = None
    held = bytearray()
    accepted: tuple[ShardSpec, ...] = ()
    starts: list[int] = []
    for stream in vector.streams:
        for i, raw in enumerate(stream):
            try:
                chunk = chunk_from_wire(raw)
            except GdfedError as exc:
                header_fault = header is None and i == 0 and _is_delta_chunk(raw)
                raise Refused("header" if header_fault else "chunk", exc) from None
            if i == 0:
                if chunk.header is None:
                    error = ChunkOrderError(
                        "the first chunk of a stream must carry the header", field="header"
                    )
                    raise Refused("chunk", error)
                if header is None:
                    try:
                        expected = expected_manifest(vector, chunk.header.spec)
                        validate_spec(chunk.header.spec, expected=expected)
                    except GdfedError as exc:
                        raise Refused("header", exc) from None
                    header = chunk.header
                else:
                    assert chunk.header == header, "a resumed stream repeats the header"
                    starts.append(chunk.offset)
                verifier = ChunkVerifier(header.spec, start=len(held), shards=accepted)
            elif chunk.header is not None and chunk.header != header:
                error = ChunkOrderError(
                    f"chunk {i} carries a header different from the stream's", field="header"
                )
                raise Refused("chunk", error)
            assert verifier is not None
            try:
                verifier.check(chunk)
            except GdfedError as exc:
                raise Refused("chunk", exc) from None
            held += chunk.data
        if verifier is not None:
            accepted = shards_from_bytes(shards_to_bytes(verifier.shards))
    if header is None or verifier is None or not verifier.done:
        raise Refused("end", TruncatedStream(f"the stream ended at offset {len(held)}", field="offset"))
    assert verifier.layout is not None
    return Received(header, expected, verifier.layout, bytes(held), tuple(starts))


def decode(vector: Vector) -> tuple[DeltaHeader, dict[str, torch.Tensor]]:
    """The vector through the receiver's decoder; raises the GdfedError a receiver answers with.

    One stream: ``decode_chunks`` over the parsed messages, parsed as they are
    fed. Several (a resumed upload): :func:`receive`, then ``decode_file``.
    """
    if len(vector.streams) > 1:
        try:
            got = receive(vector)
        except Refused as refused:
            raise refused.error from None
        tensors = decode_file(io.BytesIO(got.payload), got.layout, expected=got.expected)
        return got.header, tensors
    stream = vector.streams[0]
    first = chunk_from_wire(stream[0])
    expected = None if first.header is None else expected_manifest(vector, first.header.spec)
    rest: Iterator[Chunk] = (chunk_from_wire(raw) for raw in stream[1:])
    return decode_chunks(itertools.chain([first], rest), expected=expected)


def expand(
    spec: PayloadSpec, round_manifest: Sequence[TensorSpec], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The dense fp32 tensors a lossy upload stands for, through the aggregator's checks (CompactAssembler)."""
    assembler = CompactAssembler(spec, round_manifest)
    pieces = [DecodedPiece(i, t.name, 0, tensors[t.name].reshape(-1)) for i, t in enumerate(spec.manifest)]
    specs = {t.name: t for t in round_manifest}
    dense: dict[str, torch.Tensor] = {}
    for exp in assembler.add(pieces):
        t = specs[exp.name]
        out = dense.setdefault(exp.name, torch.zeros(t.shape, dtype=to_torch(t.dtype)))
        flat = out.view(-1)
        for start, values in exp.ranges():
            flat[start : start + values.numel()] = values
    return dense


def check_valid(vector: Vector) -> list[str]:
    """The vector passes every chunk check and decodes to exactly its stored tensors (bit for bit)."""
    try:
        receive(vector)
        header, tensors = decode(vector)
        dense = None
        if is_lossy(header.spec.codec):
            assert vector.round_manifest is not None, "a lossy vector names the round's manifest"
            dense = expand(header.spec, vector.round_manifest, tensors)
    except Refused as refused:
        return [f"{vector.name}: refused at the {refused}"]
    except GdfedError as exc:
        return [f"{vector.name}: refused with {exc.code.name} {exc.reason}: {exc.message}"]
    problems = _compare(vector.name, tensors, vector.tensors)
    if vector.dense is not None or dense is not None:
        problems += _compare(f"{vector.name} (dense)", dense or {}, vector.dense or {})
    return problems


def refusal_of(vector: Vector) -> Refused | None:
    """The receiver's refusal, and the stage it came at; None when the vector is taken.

    The chunk checks (:func:`receive`) name header and chunk refusals; the
    decoder must then refuse the same way. Past them, the decoder's refusal is
    a shard's (or, a stream cut short, the end's); past the decoder, a lossy
    tensor's assembly.
    """
    try:
        receive(vector)
        early = None
    except Refused as refused:
        early = refused
    try:
        header, tensors = decode(vector)
    except GdfedError as exc:
        if early is None:
            return Refused("shard", exc)
        if early.stage == "end":
            return Refused("end", exc)
        if (exc.code, exc.reason) != (early.error.code, early.error.reason):
            # The decoder and the chunk checks disagree: reported as the decoder's, at the chunk checks' stage.
            return Refused(early.stage, exc)
        return early
    if early is not None:
        return Refused(early.stage, GdfedError(f"the decoder took what the chunk checks refused ({early})"))
    if vector.round_manifest is not None and is_lossy(header.spec.codec):
        try:
            expand(header.spec, vector.round_manifest, tensors)
        except GdfedError as exc:
            return Refused("assembly", exc)
    return None


def check_refused(vector: Vector) -> list[str]:
    """The vector is refused with its stated status and reason, at its stated stage."""
    want = vector.refusal
    assert want is not None
    got = refusal_of(vector)
    if got is None:
        return [f"{vector.name}: decoded without error; must be refused with {want.status} {want.reason}"]
    if got.stage != want.stage:
        return [f"{vector.name}: refused at stage {got.stage!r} ({got}); the vector says {want.stage!r}"]
    if (got.error.code.name, got.error.reason) != (want.status, want.reason):
        return [f"{vector.name}: refused at the {got}; the vector says {want.status} {want.reason}"]
    return []


def check_reproduced(vector: Vector, made_with: Mapping[str, str]) -> tuple[list[str], str]:
    """Encoding the stored tensors, and streaming them with ``iter_chunks``, gives the stored messages.

    Returns the problems, and why the byte comparison was skipped ("" when it
    ran): compressed bytes, and the sizes and digests over them, depend on the
    zstd version, so under another one only what does not is compared: the
    codec, manifest, pieces and raw sizes, the frame count, and every frame's
    decompressed bytes.
    """
    if not vector.reproducible or vector.refusal is not None:
        return [], "not reproducible by design"
    try:
        want = receive(vector)
    except Refused as refused:
        return [f"{vector.name}: refused at the {refused}"], ""
    stored = want.layout
    sink = io.BytesIO()
    got = encode(vector.tensors, stored.codec, sink, shard_bytes=vector.shard_bytes, manifest=stored.manifest)
    payload = sink.getvalue()
    problems = _compare_uncompressed(vector.name, got, payload, stored, want.payload)
    if dict(made_with) != zstd_versions():
        return problems, f"the payloads were made with zstd {dict(made_with)}; this is {zstd_versions()}"
    if got != stored:
        problems.append(f"{vector.name}: the encoder's layout differs from the one the stream carries")
    if payload != want.payload:
        problems.append(f"{vector.name}: the encoder's payload differs from the stored one")
    if not problems:
        problems += _compare_streams(vector, want, got, payload)
    return problems, ""


def _compare_streams(vector: Vector, want: Received, layout: PayloadLayout, payload: bytes) -> list[str]:
    """``iter_chunks`` and ``chunk_to_wire``, from each stream's start, give the stored messages."""
    starts = (0, *want.resume_at)
    for s, (start, stream) in enumerate(zip(starts, vector.streams, strict=True)):
        chunks = iter_chunks(
            want.header, layout, io.BytesIO(payload), start=start, chunk_bytes=vector.chunk_bytes
        )
        # A stream broken off is the whole stream's first chunks.
        mine = tuple(chunk_to_wire(c) for c in itertools.islice(chunks, len(stream)))
        if mine != stream:
            at = next((i for i, (a, b) in enumerate(zip(mine, stream, strict=False)) if a != b), len(mine))
            return [f"{vector.name}: stream {s}: iter_chunks' message {at} differs from the stored one"]
    return []


def _compare_uncompressed(
    name: str, got: PayloadLayout, payload: bytes, want: PayloadLayout, stored: bytes
) -> list[str]:
    if (got.codec, got.manifest) != (want.codec, want.manifest):
        return [f"{name}: codec or manifest differ from the stored header"]
    if [(s.pieces, s.raw_bytes, len(s.frame_bytes)) for s in got.shards] != [
        (s.pieces, s.raw_bytes, len(s.frame_bytes)) for s in want.shards
    ]:
        return [f"{name}: shards (pieces, raw_bytes, frame count) differ from the stored shard specs"]
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
