"""The valid vectors: small deltas encoded with every codec and digest, deterministic (fixed data, zstd level).

Data comes from numpy's PCG64 with fixed seeds, and every vector is encoded
by ``common.codec.encode`` itself and cut into chunks by the rule
(:mod:`.streams`), so the stored stream is what this implementation sends;
``common.conformance.check`` re-encodes the stored tensors, streams them with
``iter_chunks`` and compares.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from common.codec import encode
from common.codec.compact import compact_tensor, wire_manifest
from common.codec.layout import DEFAULT_SHARD_BYTES
from common.conformance.streams import build, cut
from common.conformance.tamper import shard_header, with_shard_header
from common.conformance.vectors import CHUNK_BYTES, Vector, serialize
from common.delta import (
    KIB,
    MIN_BLOCK_BYTES,
    Cast,
    Codec,
    DeltaHeader,
    DeltaKind,
    Digest,
    Lossy,
    PayloadLayout,
    PayloadSpec,
    TensorSpec,
    UploadMetrics,
)
from common.dtypes import DType, from_torch, to_torch

RUN_ID = "conformance-run"
ROUND = 7
ZSTD_LEVEL = 1  # the encoder's default; fixed here so the vectors do not follow a change of default
# The smallest block allowed (the sender's choice; 1 MiB by default): a tensor of a few ten KiB spans blocks.
BLOCK_BYTES = MIN_BLOCK_BYTES
# The resumed vector's chunks: small, so its shards span several and the break falls inside one.
RESUME_CHUNK_BYTES = 256


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def normal(
    seed: int, shape: Sequence[int], scale: float = 1e-2, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian values as a weight difference has them (float64 drawn, then rounded to ``dtype``)."""
    values = rng(seed).standard_normal(int(np.prod(shape, dtype=np.int64))) * scale
    return torch.from_numpy(values).reshape(tuple(shape)).to(dtype)


def integers(seed: int, shape: Sequence[int], low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    values = rng(seed).integers(low, high, size=int(np.prod(shape, dtype=np.int64)), endpoint=True)
    return torch.from_numpy(values).reshape(tuple(shape)).to(dtype)


def mixed(big: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype the wire carries, a 0-d and an empty tensor, a UTF-8 name; then ``big`` fp32 elements."""
    tensors = {
        "model.layers.0.mlp.weight": normal(1, (24, 16)),
        "model.layers.0.mlp.bias": normal(2, (16,)),
        "scale": torch.tensor(-0.375, dtype=torch.float32),  # 0-d
        "empty": torch.zeros((0, 4), dtype=torch.float32),  # no elements: a piece, no frame
        "f64": normal(3, (3, 5), dtype=torch.float64),
        "f16": normal(4, (7,), scale=1.0, dtype=torch.float16),
        "bf16": normal(5, (2, 9), dtype=torch.bfloat16),
        "i64": torch.tensor([0, -1, 2**62, -(2**63), 7], dtype=torch.int64),
        "i32": integers(6, (3,), -(2**31), 2**31 - 1, torch.int32),
        "i16": integers(7, (4,), -(2**15), 2**15 - 1, torch.int16),
        "i8": integers(8, (9,), -128, 127, torch.int8),
        "u8": integers(9, (6,), 0, 255, torch.uint8),
        "bool": torch.tensor([True, False, False, True, True]),
        "u32": torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.uint32),
        "emb.größe": normal(10, (3,)),
    }
    if big:
        # bf16-representable fp32 values: real-looking, but their two low byte planes are zeros,
        # so the payload (and the vectors directory) stays small.
        tensors["big"] = normal(11, (big,), dtype=torch.bfloat16).to(torch.float32)
    return tensors


def floats(seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors shaped as a model's, for the casts and the lossy codecs; 0-d and empty ones too."""
    return {
        "w": normal(seed, (24, 16)),
        "conv": normal(seed + 1, (2, 3, 4)),
        "b": normal(seed + 2, (16,)),
        "s": torch.tensor(0.0625, dtype=torch.float32),
        "e": torch.zeros((0, 4), dtype=torch.float32),
    }


def upload_header(spec: PayloadSpec, name: str) -> DeltaHeader:
    """The header of an upload (PushDelta) of round ``ROUND``, taken against round ``ROUND - 1``."""
    return DeltaHeader(
        spec=spec,
        run_id=RUN_ID,
        round=ROUND,
        site_id="site-a",
        upload_id=f"vector-{name}",
        sample_count=128,
        base_round=ROUND - 1,
        kind=DeltaKind.DIFF,
        metrics=UploadMetrics(train_loss=2.5, eval_loss=2.75, steps=20, train_seconds=1.5),
    )


def download_header(spec: PayloadSpec) -> DeltaHeader:
    """The header of one delta of a FetchDiff stream: no site, no upload id, no sample count, no metrics."""
    return DeltaHeader(spec=spec, run_id=RUN_ID, round=ROUND, base_round=ROUND - 1, kind=DeltaKind.DIFF)


def encode_bytes(
    tensors: Mapping[str, torch.Tensor],
    codec: Codec,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    manifest: Sequence[TensorSpec] | None = None,
) -> tuple[PayloadLayout, bytes]:
    sink = io.BytesIO()
    layout = encode(tensors, codec, sink, shard_bytes=shard_bytes, manifest=manifest)
    return layout, sink.getvalue()


def sent(
    header: DeltaHeader,
    layout: PayloadLayout,
    payload: bytes,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    resume_at: int | None = None,
) -> tuple[tuple[bytes, ...], ...]:
    """The streams a sender sends: one, or (``resume_at``) one broken off there and its resumption.

    ``resume_at`` must be where a chunk of the whole stream begins: the first
    stream ends just before it, unfinished; the second starts there with the
    header again, and re-sends the spec of every shard ending after it.
    """
    whole = cut(layout, chunk_bytes=chunk_bytes)
    if resume_at is None:
        return (serialize(build(header, layout, payload, whole)),)
    before = [p for p in whole if p.offset < resume_at]
    assert before and before[-1].offset + before[-1].length == resume_at, "resume_at is not a chunk boundary"
    after = cut(layout, chunk_bytes=chunk_bytes, start=resume_at)
    return serialize(build(header, layout, payload, before)), serialize(build(header, layout, payload, after))


def decoded(tensors: Mapping[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """What the receiver gets back: each tensor in its own dtype, through its wire dtype (the cast)."""
    out = {}
    for name, t in tensors.items():
        wire = to_torch(codec.wire_dtype(from_torch(t.dtype)))
        out[name] = t.to(wire).to(t.dtype) if wire != t.dtype else t.clone()
    return out


def plain(
    name: str,
    exercises: str,
    tensors: Mapping[str, torch.Tensor],
    codec: Codec,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    download: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    resume_at: Callable[[PayloadLayout], int] | None = None,
) -> Vector:
    """A vector of tensors that travel as themselves (exact, or per a cast)."""
    layout, payload = encode_bytes(tensors, codec, shard_bytes)
    header = download_header(layout.spec) if download else upload_header(layout.spec, name)
    at = None if resume_at is None else resume_at(layout)
    return Vector(
        name=name,
        exercises=exercises,
        streams=sent(header, layout, payload, chunk_bytes=chunk_bytes, resume_at=at),
        tensors=decoded(tensors, codec),
        shard_bytes=shard_bytes,
        chunk_bytes=chunk_bytes,
    )


def lossy(
    name: str,
    exercises: str,
    dense: Mapping[str, torch.Tensor],
    codec: Codec,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Vector:
    """A lossy upload: each fp32 tensor as its compact parts; ``dense`` is what the worker compensated."""
    round_manifest = tuple(TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in dense.items())
    parts: dict[str, torch.Tensor] = {}
    sent_dense: dict[str, torch.Tensor] = {}
    for n, t in dense.items():
        wire_parts, sent_dense[n] = compact_tensor(n, t, codec)
        parts.update(wire_parts)
    manifest = wire_manifest(round_manifest, codec)
    layout, payload = encode_bytes(parts, codec, shard_bytes, manifest)
    return Vector(
        name=name,
        exercises=exercises,
        streams=sent(upload_header(layout.spec, name), layout, payload),
        round_manifest=round_manifest,
        tensors=decoded(parts, codec),
        dense=sent_dense,
        shard_bytes=shard_bytes,
    )


def tolerated_header(tensors: Mapping[str, torch.Tensor], codec: Codec) -> Vector:
    """Tensors whose shards' safetensors headers are in a form receivers accept but encoders never write."""
    layout, payload = encode_bytes(tensors, codec, shard_bytes=64)
    for s in range(len(layout.shards)):
        entries = shard_header(layout, payload, s)
        reordered = {"__metadata__": {"format": "pt"}, **dict(reversed(list(entries.items())))}
        text = json.dumps(reordered, indent=1, ensure_ascii=True).encode()
        layout, payload = with_shard_header(layout, payload, s, text)
    name = "exact-tolerated-header"
    return Vector(
        name=name,
        exercises=(
            "safetensors shard headers in a non-canonical but valid form: __metadata__ present, entries in "
            "reverse storage order, whitespace and \\u escapes in the JSON; a receiver compares entries, not "
            "bytes, so it must decode this (an encoder never writes it, so it is not reproducible)"
        ),
        streams=sent(upload_header(layout.spec, name), layout, payload),
        tensors=decoded(tensors, codec),
        shard_bytes=64,
        reproducible=False,
    )


def mid_shard(shard: int, chunks: int) -> Callable[[PayloadLayout], int]:
    """Where to break a stream off: after ``chunks`` chunks of shard ``shard`` (chunks of ``RESUME_CHUNK_BYTES``)."""

    def at(layout: PayloadLayout) -> int:
        offset = layout.shard_offsets()[shard] + chunks * RESUME_CHUNK_BYTES
        assert offset < layout.shard_offsets()[shard] + layout.shards[shard].compressed_bytes
        return offset

    return at


def valid_vectors() -> list[Vector]:
    shuffled = Codec(zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES)
    unshuffled_sha = Codec(
        byte_shuffle=False, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES, digest=Digest.SHA256
    )
    bf16 = Codec(cast=Cast.BF16, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES)
    f16_sha = Codec(cast=Cast.F16, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES, digest=Digest.SHA256)
    small = {k: v for k, v in mixed().items() if k in ("model.layers.0.mlp.bias", "i8", "emb.größe")}
    f16_values = floats(40) | {
        "edges": torch.tensor([65504.0, -65504.0, 6e-8, -0.0, 1e-3], dtype=torch.float32)
    }
    return [
        plain(
            "exact",
            "every wire dtype, a 0-d and an empty tensor, a UTF-8 name; a 20,000-element fp32 tensor cut "
            "across two shards (shard_bytes 72 KiB), its first piece in two blocks (frames) of 64 KiB and "
            "rest; BLAKE3; shards of several chunks, the last chunk of each shorter and carrying its spec",
            mixed(big=20_000),
            shuffled,
            shard_bytes=72 * KIB,
        ),
        plain(
            "exact-noshuffle",
            "the same dtypes without the byte shuffle, in shards of at most 256 bytes of tensor data, so "
            "tensors are cut into pieces across many shards, one chunk each; SHA-256; the header of a "
            "FetchDiff delta (no site)",
            mixed(),
            unshuffled_sha,
            shard_bytes=256,
            download=True,
        ),
        plain(
            "resumed-mid-shard",
            "an upload broken off in the middle of its second shard (stream 1: shards of 512 bytes of tensor "
            "data in chunks of 256 bytes, up to there, no chunk marked last) and resumed there (stream 2: the "
            "header again, then the rest of the shards; the interrupted shard's spec rides on the chunk that "
            "ends it); the receiver keeps the offset and the specs of the shards it completed in stream 1",
            floats(70),
            shuffled,
            shard_bytes=512,
            chunk_bytes=RESUME_CHUNK_BYTES,
            resume_at=mid_shard(1, 1),
        ),
        plain(
            "empty",
            "a delta of no tensors (a FetchDiff delta that changes nothing): no shards, so the stream is one "
            "chunk with the header, no data, marked last and carrying no shard spec",
            {},
            shuffled,
            download=True,
        ),
        plain(
            "bf16",
            "cast to bf16 (round to nearest even): f32 and f64 tensors travel as BF16 and decode to their own "
            "dtype; other dtypes travel as they are; a 33,000-element tensor makes two blocks of BF16",
            mixed() | {"big": normal(12, (33_000,))},
            bf16,
        ),
        plain(
            "f16",
            "cast to f16: f32 and f64 travel as F16; 65504, subnormals and -0.0 survive; shard_bytes 512; "
            "SHA-256",
            f16_values
            | {"f64": normal(41, (3, 5), dtype=torch.float64), "i32": integers(42, (3,), -9, 9, torch.int32)},
            f16_sha,
            shard_bytes=512,
        ),
        lossy(
            "topk",
            "top-k 10% (fp32 values): NAME:gaps (U32, first index then differences) and NAME:values per fp32 "
            "tensor; a 0-d tensor keeps its one element; an empty tensor travels as itself",
            floats(20),
            Codec(lossy=Lossy.TOPK, topk_fraction=0.1, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES),
        ),
        lossy(
            "topk-bf16",
            "top-k 25% with bf16 values, in shards of 512 bytes: a tensor's gaps and values span shards",
            floats(21),
            Codec(
                cast=Cast.BF16,
                lossy=Lossy.TOPK,
                topk_fraction=0.25,
                zstd_level=ZSTD_LEVEL,
                block_bytes=BLOCK_BYTES,
            ),
            shard_bytes=512,
        ),
        lossy(
            "int8",
            "int8 per row: NAME:q (I8 [rows, cols], rows = dim 0, 1 for 0-d and 1-D) and NAME:scale (F32 [rows])",
            floats(30),
            Codec(lossy=Lossy.INT8, zstd_level=ZSTD_LEVEL, block_bytes=BLOCK_BYTES),
        ),
        lossy(
            "int8-bf16-noshuffle",
            "int8 with bf16 scales (each rounded up to bf16 before quantizing), without the byte shuffle",
            floats(31),
            Codec(
                cast=Cast.BF16,
                lossy=Lossy.INT8,
                byte_shuffle=False,
                zstd_level=ZSTD_LEVEL,
                block_bytes=BLOCK_BYTES,
            ),
        ),
        tolerated_header(small, shuffled),
    ]
