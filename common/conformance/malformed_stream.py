"""Malformed vectors whose payload is good and whose stream is wrong: chunk order, CRC, where shard specs sit.

Each is one defect in how the (valid) payload of :func:`small` travels: a
chunk out of order or damaged, a shard spec on the wrong chunk, a chunk across
a shard boundary, a ``last`` flag that leaves the manifest uncovered, a resume
that does not send the interrupted shard's spec again, bytes with no spec
past what the manifest allows, a message that is not a DeltaChunk.
"""

from __future__ import annotations

import dataclasses

import torch

from common.conformance.streams import ChunkPlan, build, cut, shard_ends
from common.conformance.valid import encode_bytes, upload_header
from common.conformance.vectors import Refusal, Vector, serialize
from common.delta import Codec, PayloadLayout, Piece, TensorSpec
from common.dtypes import DType

CHECKSUM = ("DATA_LOSS", "CHECKSUM_MISMATCH")
MALFORMED = ("INVALID_ARGUMENT", "MALFORMED_SHARD")
ORDER = ("INVALID_ARGUMENT", "CHUNK_ORDER")
INVALID = ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
REQUEST = ("INVALID_ARGUMENT", "MALFORMED_REQUEST")
LIMIT = ("RESOURCE_EXHAUSTED", "LIMIT_EXCEEDED")

# A message that is not a DeltaChunk: field 1 (header) announces a length its varint never finishes.
NOT_A_CHUNK = b"\x0a\xff"


def refused(
    name: str,
    exercises: str,
    refusal: tuple[str, str],
    stage: str,
    streams: tuple[tuple[bytes, ...], ...],
    round_manifest: tuple[TensorSpec, ...] | None = None,
) -> Vector:
    return Vector(
        name=name,
        exercises=exercises,
        streams=streams,
        round_manifest=round_manifest,
        refusal=Refusal(refusal[0], refusal[1], stage),
    )


def one_stream(
    name: str, layout: PayloadLayout, payload: bytes, plans: list[ChunkPlan] | None = None
) -> tuple[tuple[bytes, ...], ...]:
    """One upload stream of ``payload``: cut by the rule, or as ``plans`` say."""
    plans = plans if plans is not None else cut(layout, chunk_bytes=4096)
    return (serialize(build(upload_header(layout.spec, name), layout, payload, plans)),)


def chunk_vectors(codec: Codec, tensors: dict[str, torch.Tensor]) -> list[Vector]:
    """The one-shard payload of ``tensors`` sent in two chunks, the stream wrong in one respect."""
    layout, payload = encode_bytes(tensors, codec)
    n = len(payload)
    half = n // 2
    P = ChunkPlan
    cases: list[tuple[str, str, tuple[str, str], list[ChunkPlan]]] = [
        ("bad-chunk-crc", "the second chunk's crc32 is not the CRC-32C of its data", CHECKSUM,
         [P(0, half, header=True), P(half, n - half, last=True, shard=0, crc_ok=False)]),
        ("bad-chunk-gap", "the second chunk starts one byte after the end of the first", ORDER,
         [P(0, half, header=True), P(half + 1, n - half - 1, last=True, shard=0)]),
        ("bad-chunk-repeat", "the second chunk starts one byte before the end of the first", ORDER,
         [P(0, half, header=True), P(half - 1, n - half + 1, last=True, shard=0)]),
        ("bad-chunk-no-header", "the first chunk carries no header", ORDER,
         [P(0, half), P(half, n - half, last=True, shard=0)]),
        ("bad-chunk-early-last", "the first chunk is marked last, in the middle of the only shard, without "
         "its spec", ORDER, [P(0, half, header=True, last=True), P(half, n - half, last=True, shard=0)]),
        ("bad-chunk-after-last", "an empty chunk follows the chunk marked last", ORDER,
         [P(0, n, header=True, last=True, shard=0), P(n, 0, last=True)]),
        ("bad-last-no-spec", "the last chunk ends the only shard but carries no shard spec", ORDER,
         [P(0, half, header=True), P(half, n - half, last=True)]),
        ("bad-spec-early", "the shard spec rides on the first chunk, which ends in the middle of the shard: a "
         "spec must end exactly where its chunk ends", MALFORMED,
         [P(0, half, header=True, shard=0), P(half, n - half, last=True, shard=0)]),
    ]  # fmt: skip
    out = [refused(name, text, refusal, "chunk", one_stream(name, layout, payload, plans))
           for name, text, refusal, plans in cases]  # fmt: skip
    past = "bad-chunk-past-end"
    out.append(
        refused(
            past,
            "16 bytes follow the shard that covers the whole manifest, in a chunk marked last that carries no "
            "spec: no byte may follow the last shard",
            INVALID,
            "chunk",
            one_stream(
                past, layout, payload + bytes(16), [P(0, n, header=True, shard=0), P(n, 16, last=True)]
            ),
        )
    )
    name = "bad-chunk-not-protobuf"
    stream = one_stream(
        name, layout, payload, [P(0, half, header=True), P(half, n - half, last=True, shard=0)]
    )
    out.append(
        refused(
            name,
            "the second message is not a DeltaChunk at all (2 bytes: field 1 with an unfinished length)",
            REQUEST,
            "chunk",
            ((stream[0][0], NOT_A_CHUNK),),
        )
    )
    return out


def boundary_vectors(codec: Codec, tensors: dict[str, torch.Tensor]) -> list[Vector]:
    """Payloads of several shards whose specs, boundaries or coverage are wrong."""
    # shard_bytes 256: w (64 fp32) fills shard 0, b and flag make shard 1.
    layout, payload = encode_bytes(tensors, codec, shard_bytes=256)
    end0, end1 = shard_ends(layout)
    P = ChunkPlan
    out = []
    name = "bad-chunk-crosses-shards"
    out.append(
        refused(
            name,
            "the first chunk carries all of shard 0, shard 0's spec, and the first 8 bytes of shard 1: a chunk's "
            "data lies within one shard",
            MALFORMED,
            "chunk",
            one_stream(
                name,
                layout,
                payload,
                [P(0, end0 + 8, header=True, shard=0), P(end0 + 8, end1 - end0 - 8, last=True, shard=1)],
            ),
        )
    )
    name = "bad-last-uncovered"
    out.append(
        refused(
            name,
            "the chunk that ends shard 0 (w) is marked last: b and flag are never covered",
            MALFORMED,
            "chunk",
            one_stream(name, layout, payload[:end0], [P(0, end0, header=True, last=True, shard=0)]),
        )
    )
    # Pieces in manifest order: a manifest listing b first makes shard 0 (w) come too early.
    order = [1, 0, 2]
    moved = dataclasses.replace(
        layout,
        manifest=tuple(layout.manifest[i] for i in order),
        shards=tuple(
            dataclasses.replace(
                s, pieces=tuple(Piece(order.index(p.tensor), p.start, p.count) for p in s.pieces)
            )
            for s in layout.shards
        ),
    )
    name = "bad-pieces-out-of-manifest-order"
    out.append(
        refused(
            name,
            "the manifest lists b, w, flag but shard 0 holds w: the pieces of consecutive shards continue each "
            "other through the manifest in its order (each shard's pieces, by name, are otherwise right)",
            MALFORMED,
            "chunk",
            one_stream(name, moved, payload),
        )
    )
    # shard_bytes 128: w is split, elements 0..31 in shard 0 and 32..63 in shard 1.
    split, split_payload = encode_bytes(tensors, codec, shard_bytes=128)
    second = split.shards[1]
    assert second.pieces[0] == Piece(0, 32, 32)
    overlap = dataclasses.replace(second, pieces=(Piece(0, 31, 32), *second.pieces[1:]))
    name = "bad-pieces-discontinue"
    header = upload_header(split.spec, name)
    specs = (split.shards[0], overlap, *split.shards[2:])
    out.append(
        refused(
            name,
            "shard 1's piece of w starts at element 31, but shard 0's ended at 32: pieces of a tensor continue "
            "each other across shards without overlap or gap",
            MALFORMED,
            "chunk",
            (serialize(build(header, split, split_payload, cut(split, chunk_bytes=4096), specs)),),
        )
    )
    out.append(_resume_without_spec(split, split_payload))
    return out


def _resume_without_spec(layout: PayloadLayout, payload: bytes) -> Vector:
    """Stream 1 breaks off inside shard 1; stream 2 does not send shard 1's spec again."""
    name = "bad-resume-spec-not-resent"
    header = upload_header(layout.spec, name)
    chunk = 64
    whole = cut(layout, chunk_bytes=chunk)
    at = layout.shard_offsets()[1] + chunk
    assert at < shard_ends(layout)[1] and any(p.offset == at for p in whole)
    before = [p for p in whole if p.offset < at]
    after = [
        p if p.shard != 1 else dataclasses.replace(p, shard=None)
        for p in cut(layout, chunk_bytes=chunk, start=at)
    ]
    return refused(
        name,
        "an upload broken off inside shard 1 and resumed there, but the chunk that ends shard 1 in the second "
        "stream carries no spec: the spec of every shard ending after the resume offset is sent again, and "
        "shard 2's spec then does not end where its chunk ends",
        MALFORMED,
        "chunk",
        (serialize(build(header, layout, payload, before)), serialize(build(header, layout, payload, after))),
    )


def bound_vectors(codec: Codec) -> list[Vector]:
    """Bytes with no spec beyond what the manifest allows a shard (a receiver bounds before it buffers)."""
    tensors = {"t": torch.tensor([True])}
    layout, _ = encode_bytes(tensors, codec)
    junk = bytes(range(256)) * 24  # 6 KiB; one bool's shard is at most ~4.3 KiB
    name = "bad-shard-over-bound"
    P = ChunkPlan
    return [
        refused(
            name,
            "a manifest of one bool ([1]), then 6 KiB of data in two chunks and no shard spec: more than any "
            "shard of that manifest may have (frame_bound of 1 byte of data and a one-entry safetensors header)",
            LIMIT,
            "chunk",
            one_stream(name, layout, junk, [P(0, 3072, header=True), P(3072, 3072)]),
            round_manifest=(TensorSpec("t", DType.BOOL, (1,)),),
        )
    ]


def stream_vectors(codec: Codec, tensors: dict[str, torch.Tensor]) -> list[Vector]:
    return [*chunk_vectors(codec, tensors), *boundary_vectors(codec, tensors), *bound_vectors(codec)]
