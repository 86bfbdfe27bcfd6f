"""The malformed vectors: each has one defect, everything else consistent, and the refusal it must get.

Most start from one small delta (``w`` fp32 [8, 8], ``b`` fp32 [8], ``flag``
bool [4]; one shard, frames 0 = header, 1 = w, 2 = b, 3 = flag), sent by the
rule; defects of the stream itself (order, CRC, where specs sit, resume) are
in :mod:`.malformed_stream`. What a receiver can only learn from the payload
is tampered with sizes and digests recomputed (:mod:`.tamper`), so each
vector reaches the one check it is aimed at; damage to bytes is left for the
digests to find.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common.codec.compact import compact_tensor, wire_manifest
from common.codec.shuffle import shuffle
from common.conformance import tamper
from common.conformance.malformed_stream import (
    CHECKSUM,
    INVALID,
    LIMIT,
    MALFORMED,
    one_stream,
    refused,
    stream_vectors,
)
from common.conformance.streams import ChunkPlan, build, cut
from common.conformance.valid import BLOCK_BYTES, ZSTD_LEVEL, encode_bytes, normal, upload_header
from common.conformance.vectors import Vector, serialize
from common.delta import Cast, Codec, Digest, Lossy, PayloadLayout, Piece, TensorSpec
from common.dtypes import DType
from common.serde import chunk_to_proto

SHUFFLED = Codec(zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES)

MISMATCH = ("INVALID_ARGUMENT", "MANIFEST_MISMATCH")
NON_FINITE = ("INVALID_ARGUMENT", "NON_FINITE_VALUES")
RESUME = ("ABORTED", "RESUME_AT_OFFSET")


def small() -> dict[str, torch.Tensor]:
    return {"w": normal(50, (8, 8)), "b": normal(51, (8,)), "flag": torch.tensor([True, False, True, True])}


def bad(
    name: str,
    exercises: str,
    layout: PayloadLayout,
    payload: bytes,
    refusal: tuple[str, str],
    stage: str,
    round_manifest: tuple[TensorSpec, ...] | None = None,
) -> Vector:
    """``payload`` sent by the rule with ``layout``'s shard specs: the defect is in the payload or a spec."""
    return refused(name, exercises, refusal, stage, one_stream(name, layout, payload), round_manifest)


def _shard(layout: PayloadLayout, index: int, **changes: Any) -> PayloadLayout:
    shards = list(layout.shards)
    shards[index] = dataclasses.replace(shards[index], **changes)
    return dataclasses.replace(layout, shards=tuple(shards))


def _flipped(digest: bytes) -> bytes:
    return bytes([digest[0] ^ 0x01]) + digest[1:]


def _edited_header(name: str, layout: PayloadLayout, payload: bytes, edit: Callable[[Any], None]) -> Vector:
    """A stream whose first message's header is changed at the protobuf level (values no domain type holds)."""
    chunks = build(upload_header(layout.spec, name), layout, payload, cut(layout, chunk_bytes=4096))
    first = chunk_to_proto(chunks[0])
    edit(first.header)
    return Vector(name=name, exercises="", streams=((first.SerializeToString(), *serialize(chunks[1:])),))


def header_vectors(layout: PayloadLayout, payload: bytes) -> list[Vector]:
    """Refused from the first chunk's header alone."""
    w, b = layout.manifest[0], layout.manifest[1]
    nine = TensorSpec("nine", DType.F32, (1,) * 9)
    nine_layout, nine_payload = encode_bytes({"nine": torch.ones((1,) * 9)}, SHUFFLED)

    def edited(name: str, exercises: str, edit: Callable[[Any], None]) -> Vector:
        v = _edited_header(name, layout, payload, edit)
        return refused(name, exercises, INVALID, "header", v.streams)

    def set_dtype(h: Any) -> None:
        h.manifest[2].dtype = 99

    def set_digest(value: int) -> Callable[[Any], None]:
        def edit(h: Any) -> None:
            h.codec.digest = value

        return edit

    return [
        bad(
            "bad-manifest-mismatch",
            "the manifest is consistent, but the round expects w as [64] (round_manifest): names, dtypes and "
            "shapes must match",
            layout,
            payload,
            MISMATCH,
            "header",
            round_manifest=(dataclasses.replace(w, shape=(64,)), b, layout.manifest[2]),
        ),
        bad(
            "bad-dims",
            "a tensor of 9 dimensions (at most 8)",
            nine_layout,
            nine_payload,
            LIMIT,
            "header",
            round_manifest=(nine,),
        ),
        bad(
            "bad-block-bytes",
            "codec.block_bytes is 1000: not a multiple of 8 in 64 KiB .. 16 MiB",
            dataclasses.replace(layout, codec=dataclasses.replace(layout.codec, block_bytes=1000)),
            payload,
            INVALID,
            "header",
        ),
        edited("bad-unknown-dtype", "a manifest entry's dtype is 99, a value DType does not have", set_dtype),
        edited(
            "bad-digest-unspecified",
            "codec.digest is DIGEST_UNSPECIFIED (0): a sender names its digest algorithm",
            set_digest(0),
        ),
        edited(
            "bad-digest-unknown",
            "codec.digest is 7, a value Digest does not have (the frames are hashed with BLAKE3)",
            set_digest(7),
        ),
    ]


def spec_vectors(layout: PayloadLayout, payload: bytes) -> list[Vector]:
    """Refused when the chunk carrying a shard's spec arrives: the spec does not fit the manifest or itself."""
    frames = layout.shards[0].frame_bytes
    w = layout.manifest[0]
    short = _shard(layout, 0, digest=layout.shards[0].digest[:31])
    return [
        bad(
            "bad-piece-beyond-tensor",
            "a piece runs past the end of its tensor: 64 elements of a tensor the manifest says is [7, 8]",
            dataclasses.replace(
                layout, manifest=(dataclasses.replace(w, shape=(7, 8)), *layout.manifest[1:])
            ),
            payload,
            MALFORMED,
            "chunk",
        ),
        bad(
            "bad-piece-gap",
            "a piece starts one element past the first element not yet covered (a gap)",
            _shard(
                layout, 0, pieces=(layout.shards[0].pieces[0], Piece(1, 1, 7), *layout.shards[0].pieces[2:])
            ),
            payload,
            MALFORMED,
            "chunk",
        ),
        bad(
            "bad-frame-count",
            "frame_bytes lists one frame fewer than the pieces need (the last two merged; sizes still add up)",
            _shard(layout, 0, frame_bytes=(*frames[:-2], frames[-2] + frames[-1])),
            payload,
            MALFORMED,
            "chunk",
        ),
        bad(
            "bad-raw-bytes",
            "raw_bytes leaves no room for the safetensors header (it equals the pieces' data bytes)",
            _shard(layout, 0, raw_bytes=64 * 4 + 8 * 4 + 4),
            payload,
            MALFORMED,
            "chunk",
        ),
        bad(
            "bad-spec-digest-length",
            "the shard spec's digest is 31 bytes (every digest is 32)",
            short,
            payload,
            INVALID,
            "chunk",
        ),
    ]


def digest_vectors(layout: PayloadLayout, payload: bytes) -> list[Vector]:
    """Refused once the shard is complete: its digest does not match its frames."""
    sha = dataclasses.replace(layout, codec=dataclasses.replace(layout.codec, digest=Digest.SHA256))
    sha_layout, _ = tamper.rebuild(sha, tamper.split_frames(layout, payload))
    as_blake3 = dataclasses.replace(sha_layout, codec=layout.codec)
    damaged_at = tamper.frame_offset(sha_layout, 0, 1) + layout.shards[0].frame_bytes[1] // 2
    return [
        bad(
            "bad-shard-digest",
            "the shard spec's digest is not BLAKE3 over its frames' BLAKE3 digests (one bit flipped)",
            _shard(layout, 0, digest=_flipped(layout.shards[0].digest)),
            payload,
            CHECKSUM,
            "shard",
        ),
        bad(
            "bad-digest-algorithm",
            "codec.digest says BLAKE3, but the shard spec's digest is the SHA-256 tree of the same frames",
            as_blake3,
            payload,
            CHECKSUM,
            "shard",
        ),
        bad(
            "bad-frame-damaged-sha256",
            "codec.digest SHA-256 (the shard spec's digest the SHA-256 tree), and one byte of frame 1 changed in "
            "transit",
            sha_layout,
            tamper.flip(payload, damaged_at),
            CHECKSUM,
            "shard",
        ),
    ]


def _set(index: int, value: Any) -> Callable[[np.ndarray[Any, Any]], None]:
    def edit(values: np.ndarray[Any, Any]) -> None:
        values[index] = value

    return edit


def _bool_two(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    raw = values.view(np.uint8).copy()
    raw[1] = 2
    return raw


def shard_vectors(layout: PayloadLayout, payload: bytes) -> list[Vector]:
    """Refused once a shard's bytes are in: what only the frames can tell."""
    frames = tamper.split_frames(layout, payload)
    level = layout.codec.zstd_level
    raw0 = tamper.unzstd(frames[0][0])
    raw1 = tamper.unzstd(frames[0][1])
    entries = tamper.shard_header(layout, payload, 0)

    def header_with(change: Callable[[dict[str, Any]], None]) -> tuple[PayloadLayout, bytes]:
        edited = json.loads(json.dumps(entries))
        change(edited)
        text = json.dumps(edited, separators=(",", ":")).encode()
        return tamper.with_shard_header(layout, payload, 0, text)

    def swap_offsets(e: dict[str, Any]) -> None:
        e["w"]["data_offsets"], e["b"]["data_offsets"] = e["b"]["data_offsets"], e["w"]["data_offsets"]

    moved = [list(frames[0])]
    moved[0][1], moved[0][2] = frames[0][1] + frames[0][2][:1], frames[0][2][1:]
    bf16 = Codec(cast=Cast.BF16, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES)
    bf16_layout, bf16_payload = encode_bytes(small(), bf16)
    shuffled0 = shuffle(np.frombuffer(raw0, dtype=np.uint8), 4).tobytes()
    cases: list[tuple[str, str, tuple[str, str], tuple[PayloadLayout, bytes]]] = [
        ("bad-frame-damaged", "one byte of frame 1 (w's block) changed in transit: the shard's digest fails",
         CHECKSUM, (layout, tamper.flip(payload, tamper.frame_offset(layout, 0, 1) + len(frames[0][1]) // 2))),
        ("bad-header-frame-damaged", "one byte of frame 0 (the safetensors header) changed in transit",
         CHECKSUM, (layout, tamper.flip(payload, tamper.frame_offset(layout, 0, 0) + len(frames[0][0]) // 2))),
        ("bad-frame-size", "frame 1 holds 63 elements of w's block of 64 (it declares 252 bytes; the layout 256)",
         MALFORMED, tamper.edit_block(layout, payload, 0, 0, lambda v: v[:-1].copy())),
        ("bad-frame-bomb", "frame 1 declares and holds 1 MiB of zeros where the layout says 256 bytes",
         MALFORMED, tamper.edit_block(layout, payload, 0, 0, lambda v: np.zeros(1 << 18, dtype=np.float32))),
        ("bad-frame-no-content-size", "frame 1 is a valid zstd frame that does not declare its content size",
         MALFORMED, tamper.replace_frame(layout, payload, 0, 1,
                                         tamper.zstd(raw1, level, shuffled=True, content_size=False))),
        ("bad-frame-boundaries", "frame_bytes cut one byte late between frames 1 and 2 (digests over the cuts)",
         MALFORMED, tamper.rebuild(layout, moved)),
        ("bad-frame0-shuffled", "frame 0 (the safetensors header) byte-shuffled as 4-byte elements; frame 0 never is",
         MALFORMED, tamper.replace_frame(layout, payload, 0, 0, tamper.zstd(shuffled0, level, shuffled=False))),
        ("bad-stheader-entry", "the safetensors entry of w says F16 where the manifest and codec imply F32",
         MALFORMED, header_with(lambda e: e["w"].__setitem__("dtype", "F16"))),
        ("bad-stheader-number", "the safetensors entry of w gives its shape as [64.0], not the integer [64]",
         MALFORMED, header_with(lambda e: e["w"].__setitem__("shape", [64.0]))),
        ("bad-stheader-offsets", "the entries of w and b swap data_offsets: not back to back in storage order",
         MALFORMED, header_with(swap_offsets)),
        ("bad-stheader-length", "the safetensors header's 8-byte length says 8 bytes more than frame 0 holds",
         MALFORMED, tamper.with_shard_header(layout, payload, 0, json.dumps(entries, separators=(",", ":")).encode(),
                                             length=len(raw0) - 8 + 8)),
        ("bad-nan", "w holds a NaN", NON_FINITE, tamper.edit_block(layout, payload, 0, 0, _set(3, np.nan))),
        ("bad-inf-bf16", "bf16 cast: w's wire values hold +inf (0x7F80)",
         NON_FINITE, tamper.edit_block(bf16_layout, bf16_payload, 0, 0, _set(5, 0x7F80))),
        ("bad-bool", "a bool element is the byte 2 (only 0 and 1 are bools)",
         NON_FINITE, tamper.edit_block(layout, payload, 0, 2, _bool_two)),
    ]  # fmt: skip
    out = [bad(name, text, lay, data, refusal, "shard") for name, text, refusal, (lay, data) in cases]
    n = len(payload)
    name = "bad-truncated"
    cut_short = [ChunkPlan(0, n - 7, header=True)]
    out.append(
        refused(
            name,
            "the stream ends 7 bytes before the end of the only shard, without its spec or a chunk marked last: "
            "resume, not an error in the data",
            RESUME,
            "end",
            one_stream(name, layout, payload, cut_short),
        )
    )
    return out


def lossy_vectors() -> list[Vector]:
    """Top-k uploads whose indices break the rules (k is checked at the header; the indices once complete)."""
    codec = Codec(lossy=Lossy.TOPK, topk_fraction=0.25, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES)
    dense = {"w": normal(60, (8, 8)), "b": normal(61, (8,))}
    round_manifest = tuple(TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in dense.items())
    parts: dict[str, torch.Tensor] = {}
    for n, t in dense.items():
        parts.update(compact_tensor(n, t, codec)[0])

    def upload(changed: dict[str, torch.Tensor]) -> tuple[PayloadLayout, bytes]:
        return encode_bytes(changed, codec)

    gaps = parts["w:gaps"]
    longer = parts | {"w:gaps": torch.cat([gaps, torch.ones(1, dtype=torch.uint32)]),
                      "w:values": torch.cat([parts["w:values"], torch.tensor([0.5])])}  # fmt: skip
    # torch has no arithmetic on uint32: the gaps are edited in numpy.
    beyond_np = gaps.numpy().copy()
    beyond_np[-1] += 64
    repeat_np = gaps.numpy().copy()
    repeat_np[2] = 0
    beyond, repeat = torch.from_numpy(beyond_np), torch.from_numpy(repeat_np)
    assert wire_manifest(round_manifest, codec) != tuple(
        TensorSpec(n, DType.U32 if n.endswith("gaps") else DType.F32, tuple(t.shape))
        for n, t in longer.items()
    )
    cases = [
        ("bad-topk-k", "w:gaps and w:values hold k + 1 = 17 entries; k = ceil(0.25 * 64) = 16",
         MISMATCH, "header", upload(longer)),
        ("bad-topk-index-range", "w's last top-k index (the gaps' running sum) is not below numel = 64",
         INVALID, "assembly", upload(parts | {"w:gaps": beyond})),
        ("bad-topk-index-repeat", "a gap after the first is 0: w's top-k indices do not strictly increase",
         INVALID, "assembly", upload(parts | {"w:gaps": repeat})),
    ]  # fmt: skip
    return [
        bad(name, text, lay, data, refusal, stage, round_manifest=round_manifest)
        for name, text, refusal, stage, (lay, data) in cases
    ]


def malformed_vectors() -> list[Vector]:
    layout, payload = encode_bytes(small(), SHUFFLED)
    return [
        *header_vectors(layout, payload),
        *stream_vectors(SHUFFLED, small()),
        *spec_vectors(layout, payload),
        *digest_vectors(layout, payload),
        *shard_vectors(layout, payload),
        *lossy_vectors(),
    ]
