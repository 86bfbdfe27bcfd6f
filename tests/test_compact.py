"""Lossy uploads on the wire (common.codec.compact): the expected manifest, round trips, refusals.

A compact upload is encoded by the ordinary codec; the receiver derives its
exact manifest from the round's fp32 manifest and the codec, and densifies
what arrives. Round trips must give back, bit for bit, the dense tensor the
worker's error feedback accounted as sent; corrupt compact data must be
refused with a typed error naming the tensor and the field.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec import encode, manifest_of, validate_layout
from common.codec.compact import (
    CompactAssembler,
    compact_tensor,
    decode_dense,
    rows_cols,
    wire_manifest,
)
from common.codec.decoder import DecodedPiece
from common.codec.layout import validate_codec
from common.delta import Cast, Codec, DeltaHeader, Lossy, PayloadLayout, TensorSpec
from common.dtypes import DType
from common.errors import InvalidArgument, ManifestMismatch
from common.lossy import ErrorFeedback, Sparse, compress_delta, topk_count
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from common.serde import (
    codec_from_proto,
    codec_to_proto,
    header_from_proto,
    header_to_proto,
    layout_from_bytes,
    layout_to_bytes,
)

TOPK = Codec(cast=Cast.BF16, lossy=Lossy.TOPK, topk_fraction=0.01)
INT8 = Codec(lossy=Lossy.INT8)


def fp32(manifest: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, DType.F32, t.shape) for t in manifest)


def compacted(
    delta: dict[str, torch.Tensor], codec: Codec
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    sent: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        wire, sent[name] = compact_tensor(name, t, codec)
        tensors.update(wire)
    return tensors, sent


def round_trip(
    delta: dict[str, torch.Tensor], codec: Codec, shard_bytes: int = 1 << 20
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors, sent = compacted(delta, codec)
    sink = io.BytesIO()
    layout = encode(tensors, codec, sink, shard_bytes=shard_bytes)
    return decode_dense(layout, sink, fp32(manifest_of(delta))), sent


# ---------------------------------------------------------------- the manifest


def test_wire_manifest_names_shapes_and_dtypes() -> None:
    manifest = (
        TensorSpec("emb", DType.F32, (1000, 64)),
        TensorSpec("bias", DType.F32, (64,)),
        TensorSpec("scalar", DType.F32, ()),
        TensorSpec("empty", DType.F32, (0, 3)),
    )
    assert wire_manifest(manifest, TOPK) == (
        TensorSpec("emb:gaps", DType.U32, (640,)),
        TensorSpec("emb:values", DType.F32, (640,)),
        TensorSpec("bias:gaps", DType.U32, (1,)),
        TensorSpec("bias:values", DType.F32, (1,)),
        TensorSpec("scalar:gaps", DType.U32, (1,)),
        TensorSpec("scalar:values", DType.F32, (1,)),
        TensorSpec("empty", DType.F32, (0, 3)),  # nothing to compress: travels as itself
    )
    assert wire_manifest(manifest, INT8) == (
        TensorSpec("emb:q", DType.I8, (1000, 64)),
        TensorSpec("emb:scale", DType.F32, (1000,)),
        TensorSpec("bias:q", DType.I8, (1, 64)),
        TensorSpec("bias:scale", DType.F32, (1,)),
        TensorSpec("scalar:q", DType.I8, (1, 1)),
        TensorSpec("scalar:scale", DType.F32, (1,)),
        TensorSpec("empty", DType.F32, (0, 3)),
    )
    assert wire_manifest(manifest, Codec()) == manifest
    assert rows_cols((4, 3, 5)) == (4, 15) and rows_cols((7,)) == (1, 7) and rows_cols(()) == (1, 1)
    with pytest.raises(InvalidArgument, match="collides") as info:
        wire_manifest((TensorSpec("w", DType.F32, (4,)), TensorSpec("w:q", DType.F32, (0,))), INT8)
    assert info.value.field == "manifest"


def test_k_is_the_one_definition() -> None:
    # fraction·numel is rounded to 9 decimals before the ceiling: 0.07·100 keeps 7, not 8.
    assert topk_count(100, 0.07) == 7
    assert topk_count(100_000_001, 0.01) == 1_000_001
    assert topk_count(5, 1e-9) == 1 and topk_count(5, 1.0) == 5
    spec = TensorSpec("w", DType.F32, (100_000_001,))
    [gaps, _] = wire_manifest((spec,), replace(TOPK, topk_fraction=0.01))
    assert gaps.shape == (1_000_001,)


def test_codec_fields_validate_and_travel() -> None:
    for bad in (0.0, -0.1, 1.5, math.nan, math.inf):
        with pytest.raises(InvalidArgument, match="topk_fraction") as info:
            validate_codec(replace(TOPK, topk_fraction=bad))
        assert info.value.field == "codec.topk_fraction"
    with pytest.raises(InvalidArgument, match="must be 0 unless lossy = topk"):
        validate_codec(replace(INT8, topk_fraction=0.01))
    for codec in (TOPK, INT8, replace(TOPK, topk_fraction=0.1 + 0.2), Codec()):
        assert codec_from_proto(pb.Codec.FromString(codec_to_proto(codec).SerializeToString())) == codec
    msg = codec_to_proto(INT8)
    msg.lossy = 7  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as err:
        codec_from_proto(pb.Codec.FromString(msg.SerializeToString()))
    assert err.value.field == "codec.lossy"
    assert TOPK.name == "topk1%+bf16+shuffle+zstd1"
    assert INT8.name == "int8+shuffle+zstd1"
    assert replace(TOPK, cast=Cast.NONE, topk_fraction=0.001).name == "topk0.1%+shuffle+zstd1"


# ---------------------------------------------------------------- round trips


@st.composite
def deltas(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        t = torch.randn(shape, generator=gen) * 10.0 ** draw(st.integers(-8, 2))
        if t.numel() and draw(st.booleans()):
            t.view(-1)[: t.numel() // 2] = 0.0  # ties at zero
        out[f"t{i}"] = t
    return out


@settings(max_examples=60, deadline=None)
@given(
    deltas(),
    st.sampled_from([Lossy.TOPK, Lossy.INT8]),
    st.sampled_from(list(Cast)),
    st.floats(1e-4, 1.0),
    st.sampled_from([64, 256, 1 << 20]),
)
def test_compact_round_trip_gives_exactly_what_was_accounted(
    delta: dict[str, torch.Tensor], lossy: Lossy, cast: Cast, fraction: float, shard_bytes: int
) -> None:
    codec = Codec(cast=cast, lossy=lossy, topk_fraction=fraction if lossy is Lossy.TOPK else 0.0)
    got, sent = round_trip(delta, codec, shard_bytes)  # small shards: compact parts span shards
    assert sorted(got) == sorted(delta)
    for name, t in delta.items():
        assert got[name].shape == t.shape and got[name].dtype == torch.float32
        assert torch.equal(got[name].view(torch.int32), sent[name].view(torch.int32)), name
        if t.numel() == 0:
            continue
        err = (t - sent[name]).abs()
        if lossy is Lossy.TOPK:
            k = topk_count(t.numel(), fraction)
            assert int((sent[name] != 0).sum()) <= k
            kept = sent[name].reshape(-1) != 0
            # Whatever was dropped is no larger than what was kept (up to the value's rounding).
            if bool(kept.any()) and not bool(kept.all()):
                assert (
                    float(t.reshape(-1)[~kept].abs().max()) <= float(t.reshape(-1)[kept].abs().min()) * 1.01
                )
        else:
            rows, _ = rows_cols(t.shape)
            row_max = t.reshape(rows, -1).abs().amax(dim=1)
            scale = compact_tensor(name, t, codec)[0][name + ":scale"]
            # The scale is max/127, rounded up to the wire dtype under a cast (a bf16 step is 2^-8 of
            # it; an f16 subnormal may be far more); the error is at most half of it.
            assert bool((scale >= row_max / 127).all())
            if cast is not Cast.F16:
                assert bool((scale <= row_max / 127 * (1 + 2**-7)).all())
            assert bool((err.reshape(rows, -1) <= scale[:, None] * 0.5 * (1 + 1e-3)).all())


def test_topk_with_feedback_matches_common_lossy() -> None:
    # The worker's path (compact_tensor per tensor) and compress_delta make the same choices and values.
    gen = torch.Generator().manual_seed(3)
    fb_ref, fb = ErrorFeedback(), ErrorFeedback()
    for _ in range(4):
        d = {"w": torch.randn(30, 40, generator=gen), "b": torch.randn(40, generator=gen)}
        compact, dense = compress_delta(d, fb_ref, method="topk", fraction=0.05, value_dtype="bf16")
        for name, t in d.items():
            c = fb.compensate(name, t)
            wire, sent = compact_tensor(name, c, replace(TOPK, topk_fraction=0.05))
            fb.update(name, c, sent)
            form = compact[name]
            assert isinstance(form, Sparse)
            assert np.array_equal(np.cumsum(wire[name + ":gaps"].numpy().astype(np.int64)), form.indices)
            assert torch.equal(sent, dense[name])
    for name in ("w", "b"):
        assert torch.equal(fb.state_dict()[name], fb_ref.state_dict()[name])


def test_int8_scale_rounded_up_under_a_cast() -> None:
    x = torch.tensor([[1.0, -0.3, 0.0031], [1e-3, 2e-3, -3e-3]]) * 1.2345
    wire, sent = compact_tensor("w", x, Codec(cast=Cast.BF16, lossy=Lossy.INT8))
    scale = wire["w:scale"]
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # travels exactly
    assert bool((scale >= x.abs().amax(dim=1) / 127).all())
    assert int(wire["w:q"].abs().max()) <= 127
    assert torch.equal(sent, wire["w:q"].float() * scale[:, None])


# ---------------------------------------------------------------- refusals


def _hand_made(gaps: list[int], values: list[float], numel: int = 10) -> tuple[PayloadLayout, io.BytesIO]:
    tensors = {
        "w:gaps": torch.tensor(gaps, dtype=torch.int64).to(torch.uint32),
        "w:values": torch.tensor(values, dtype=torch.float32),
    }
    codec = replace(TOPK, topk_fraction=len(gaps) / numel)
    sink = io.BytesIO()
    return encode(tensors, codec, sink), sink


@pytest.mark.parametrize(
    ("gaps", "match"),
    [
        ([1, 0, 3], "repeats"),  # index 1 twice
        ([1, 2, 7], "not below numel=10"),  # last index 10
        ([5, 2**32 - 2, 1], "not below numel=10"),  # a gap that wraps past 2^32: 5 + 4294967294 ≥ 10
    ],
)
def test_bad_indices_are_refused_naming_the_tensor(gaps: list[int], match: str) -> None:
    layout, sink = _hand_made(gaps, [1.0, 2.0, 3.0])
    manifest = (TensorSpec("w", DType.F32, (10,)),)
    validate_layout(layout, expected=wire_manifest(manifest, layout.codec))  # well-formed on the outside
    with pytest.raises(InvalidArgument, match=match) as info:
        decode_dense(layout, sink, manifest)
    assert info.value.field == "w:gaps" and "'w'" in info.value.message


def test_wrong_k_or_scale_shape_is_a_manifest_mismatch() -> None:
    layout, sink = _hand_made([1, 2, 3, 1], [1.0, 2.0, 3.0, 4.0])  # k = 4, but 30% of 10 is 3
    manifest = (TensorSpec("w", DType.F32, (10,)),)
    codec3 = replace(layout.codec, topk_fraction=0.3)
    with pytest.raises(ManifestMismatch, match="w:gaps"):
        validate_layout(replace(layout, codec=codec3), expected=wire_manifest(manifest, codec3))
    tensors = {"w:q": torch.zeros(2, 5, dtype=torch.int8), "w:scale": torch.ones(5)}
    sink = io.BytesIO()
    bad = encode(tensors, INT8, sink)
    with pytest.raises(ManifestMismatch, match="w:scale"):
        decode_dense(bad, sink, (TensorSpec("w", DType.F32, (2, 5)),))


def test_non_finite_compact_values_are_refused() -> None:
    # The decoder refuses NaN in any float piece; the assembler checks again (it also serves other readers).
    layout, _ = _hand_made([1, 2], [1.0, 2.0])
    manifest = (TensorSpec("w", DType.F32, (10,)),)
    assembler = CompactAssembler(layout, manifest)
    pieces = [
        DecodedPiece(0, "w:gaps", 0, torch.tensor([1, 2], dtype=torch.int64).to(torch.uint32)),
        DecodedPiece(1, "w:values", 0, torch.tensor([1.0, math.inf])),
    ]
    with pytest.raises(InvalidArgument, match="NaN or infinity") as info:
        assembler.add(pieces)
    assert info.value.field == "w:values"
    q = {"v:q": torch.ones(1, 3, dtype=torch.int8), "v:scale": torch.ones(1)}
    layout = encode(q, INT8, io.BytesIO())
    assembler = CompactAssembler(layout, (TensorSpec("v", DType.F32, (3,)),))
    with pytest.raises(InvalidArgument, match="scale") as info:
        assembler.add(
            [
                DecodedPiece(0, "v:q", 0, q["v:q"].reshape(-1)),
                DecodedPiece(1, "v:scale", 0, torch.tensor([math.nan])),
            ]
        )
    assert info.value.field == "v:scale"


def test_a_header_round_trips_with_the_lossy_codec() -> None:
    tensors, _ = compacted({"w": torch.randn(20, 30)}, TOPK)
    layout = encode(tensors, TOPK, io.BytesIO())
    header = DeltaHeader(spec=layout.spec, run_id="r", round=1, site_id="s", upload_id="u", sample_count=1)
    back = header_from_proto(pb.DeltaHeader.FromString(header_to_proto(header).SerializeToString()))
    assert back == header
    assert layout_from_bytes(layout_to_bytes(layout)) == layout
