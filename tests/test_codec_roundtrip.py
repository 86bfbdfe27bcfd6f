"""Round trips of the delta codec: bit-exact for the exact codec, round-to-nearest-even for the casts.

Property tests draw dicts of tensors of every wire dtype (0-d, empty, dotted
and unicode names, random bit patterns including subnormals and -0.0) and
send them through encode -> chunks of random sizes -> decode, and through
decode_file; shard and block sizes are drawn small so tensors split across
shards and blocks.
"""

from __future__ import annotations

import io
import json
import math
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import serde
from common.codec import (
    DecodedPiece,
    DeltaStreamDecoder,
    decode_chunks,
    decode_file,
    encode,
    iter_chunks,
    manifest_of,
    validate_layout,
)
from common.codec.decoder import SHARD_BUFFERS, BufferPool
from common.codec.layout import block_sizes, expected_frame_sizes, plan_shards
from common.codec.shuffle import shuffle, unshuffle_into
from common.codec.stheader import build_header, check_header
from common.delta import (
    MIN_BLOCK_BYTES,
    Cast,
    Codec,
    DeltaHeader,
    DeltaKind,
    PayloadLayout,
    Piece,
    TensorSpec,
    UploadMetrics,
)
from common.dtypes import DType, from_torch, itemsize, to_torch
from common.errors import InvalidArgument, NonFiniteValues
from common.pb.gradualdiff.v1 import delta_pb2 as pb
from tests.codec_helpers import (
    assert_bit_exact,
    bits,
    chunks,
    decode_bytes,
    encode_bytes,
    header,
    split_frames,
    unzstd,
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
DTYPES = [*FLOATS, *INTS, torch.bool]
CASTABLE = (torch.float32, torch.float64)
NOT_CAST = [d for d in DTYPES if d not in CASTABLE]

# Exponent field of each float type, and its top bit: a value whose exponent is
# all ones (inf/NaN) becomes finite by clearing that bit.
_EXPONENT = {
    torch.float64: (0x7FF0000000000000, 0x4000000000000000),
    torch.float32: (0x7F800000, 0x40000000),
    torch.float16: (0x7C00, 0x4000),
    torch.bfloat16: (0x7F80, 0x4000),
}

SMALL_CODECS = [Codec(block_bytes=MIN_BLOCK_BYTES), Codec(byte_shuffle=False, block_bytes=MIN_BLOCK_BYTES)]
EXACT_CODECS = [
    Codec(),
    Codec(byte_shuffle=False),
    *SMALL_CODECS,
    Codec(block_bytes=MIN_BLOCK_BYTES, zstd_level=-7),
]

_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int, kind: str) -> torch.Tensor:
    """A finite tensor: random bit patterns ("bits"), delta-like small values ("small") or zeros."""
    numel = math.prod(shape)
    rng = np.random.default_rng(seed)
    if dtype is torch.bool:
        return torch.from_numpy(rng.integers(0, 2, numel).astype(np.bool_)).reshape(shape)
    if kind == "zeros" or numel == 0:
        return torch.zeros(shape, dtype=dtype)
    if kind == "small":
        if dtype.is_floating_point:
            return torch.from_numpy(rng.standard_normal(numel) * 1e-3).to(dtype).reshape(shape)
        return torch.from_numpy(rng.integers(-3, 4, numel)).to(dtype).reshape(shape)
    width = torch.empty(0, dtype=dtype).element_size()
    raw = torch.from_numpy(rng.integers(0, 256, numel * width, dtype=np.uint8))
    if not dtype.is_floating_point:
        return raw.view(dtype).reshape(shape)
    as_int = raw.view(bits(torch.empty(0, dtype=dtype)).dtype)
    mask, top = _EXPONENT[dtype]
    as_int = torch.where((as_int & mask) == mask, as_int ^ top, as_int)
    out = as_int.view(dtype).reshape(shape)
    assert bool(torch.isfinite(out).all())
    return out


_PARTS = st.sampled_from(
    ["model", "layers", "0", "11", "self_attn", "q_proj", "mlp", "weight", "bias", "é", "層"]
)
dotted_names = st.lists(_PARTS, min_size=1, max_size=6).map(".".join)
unicode_names = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
names = st.one_of(dotted_names, unicode_names)


@st.composite
def tensors_st(draw: st.DrawFn, *, dtypes: list[torch.dtype] = DTYPES, max_numel: int = 300) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
    while math.prod(shape) > max_numel:
        shape = shape[1:]
    kind = draw(st.sampled_from(["bits", "bits", "small", "zeros"]))
    tensor = make_tensor(dtype, shape, draw(st.integers(0, 2**32 - 1)), kind)
    if draw(st.booleans()) and tensor.dim() == 2:
        tensor = tensor.t()  # not contiguous: the encoder must not care
    return tensor


def deltas(tensor_st: st.SearchStrategy[torch.Tensor] | None = None, min_size: int = 0, max_size: int = 6):
    values = tensors_st() if tensor_st is None else tensor_st
    return st.dictionaries(names, values, min_size=min_size, max_size=max_size)


@st.composite
def large_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of up to ~200 KB, so a 64 KiB block size gives several frames per piece."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.int32]))
    width = torch.empty(0, dtype=dtype).element_size()
    block = MIN_BLOCK_BYTES // width  # elements per 64 KiB block: sizes around multiples of it
    edges = [block - 1, block, block + 1, 2 * block, 3 * block - 1, 3 * block + 1]
    numel = draw(st.one_of(st.integers(1, 200_000 // width), st.sampled_from(edges)))
    kind = draw(st.sampled_from(["bits", "small"]))
    return make_tensor(dtype, (numel,), draw(st.integers(0, 2**32 - 1)), kind)


shard_sizes = st.one_of(st.integers(8, 4096), st.just(32 << 20))
chunk_sizes = st.one_of(st.sampled_from([1, 2, 3, 7]), st.integers(1, 5000), st.just(1 << 20))


def bounded(shard_bytes: int, delta: dict[str, torch.Tensor]) -> int:
    """``shard_bytes``, raised where it would cut ``delta`` into more than ~200 shards (time, not coverage)."""
    return max(shard_bytes, sum(t.numel() * t.element_size() for t in delta.values()) // 200)


def fit_for_cast(delta: dict[str, torch.Tensor], cast: Cast) -> dict[str, torch.Tensor]:
    """``delta`` with fp32/fp64 values clamped into the cast's range (random bit patterns would overflow)."""
    bound = {Cast.NONE: math.inf, Cast.BF16: 1e30, Cast.F16: 60000.0}[cast]
    return {k: v.clamp(-bound, bound) if v.dtype in CASTABLE else v for k, v in delta.items()}


def stream_decode(layout, payload: bytes, chunk_bytes: int) -> dict[str, torch.Tensor]:
    """Decode through DeltaStreamDecoder without destination tensors, placing pieces as they are returned."""
    out = {t.name: torch.full(t.shape, 7, dtype=to_torch(t.dtype)) for t in layout.manifest}
    seen = dict.fromkeys(out, 0)

    def place(pieces: list[DecodedPiece]) -> None:
        for piece in pieces:
            flat = out[piece.name].view(-1)
            flat[piece.start : piece.start + piece.values.numel()] = piece.values
            seen[piece.name] += piece.values.numel()

    with DeltaStreamDecoder() as decoder:
        for chunk in chunks(layout, payload, chunk_bytes):
            place(decoder.feed(chunk))
        place(decoder.finish())
    assert seen == {t.name: t.numel for t in layout.manifest}
    return out


def check_round_trip(
    delta: dict[str, torch.Tensor], codec: Codec, shard_bytes: int, chunk_bytes: int
) -> None:
    layout, payload = encode_bytes(delta, codec, shard_bytes=bounded(shard_bytes, delta))
    validate_layout(layout)
    assert layout.manifest == manifest_of(delta)
    # Keep 1-byte chunks to payloads where they cost milliseconds.
    chunk_bytes = max(chunk_bytes, len(payload) // 2000)
    assert_bit_exact(decode_bytes(layout, payload, chunk_bytes=chunk_bytes), delta)
    assert_bit_exact(decode_file(io.BytesIO(payload), layout), delta)
    assert_bit_exact(stream_decode(layout, payload, chunk_bytes), delta)


# --- exact codec ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=_SLOW_DATA)
@given(delta=deltas(), codec=st.sampled_from(EXACT_CODECS), shard_bytes=shard_sizes, chunk_bytes=chunk_sizes)
def test_exact_round_trip(delta, codec, shard_bytes, chunk_bytes):
    check_round_trip(delta, codec, shard_bytes, chunk_bytes)


@settings(max_examples=40, deadline=None, suppress_health_check=_SLOW_DATA)
@given(
    delta=deltas(st.one_of(large_tensors(), tensors_st()), min_size=1, max_size=3),
    codec=st.sampled_from(SMALL_CODECS),
    shard_bytes=st.one_of(st.integers(60_000, 300_000), st.just(32 << 20)),
    chunk_bytes=st.one_of(st.integers(1000, 100_000), st.just(1 << 20)),
)
def test_exact_round_trip_multi_block(delta, codec, shard_bytes, chunk_bytes):
    check_round_trip(delta, codec, shard_bytes, chunk_bytes)


def test_round_trip_really_splits_shards_and_blocks():
    """The property tests' sizes do reach multi-shard, multi-block layouts, and tiny chunks."""
    delta = {
        "model.layers.0.q_proj.weight": make_tensor(torch.float32, (300, 200), 1, "bits"),
        "model.layers.0.q_proj.bias": make_tensor(torch.bfloat16, (7,), 2, "bits"),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(4, 0, dtype=torch.int16),
        "名前.weight": make_tensor(torch.int8, (33,), 3, "bits"),
    }
    codec = Codec(block_bytes=MIN_BLOCK_BYTES)
    layout, payload = encode_bytes(delta, codec, shard_bytes=100_000)
    assert len(layout.shards) == 3
    assert max(len(s.frame_bytes) for s in layout.shards) >= 3
    split = [p for s in layout.shards for p in s.pieces if p.tensor == 0]
    assert [(p.start, p.count) for p in split] == [(0, 25_000), (25_000, 25_000), (50_000, 10_000)]
    assert_bit_exact(decode_bytes(layout, payload), delta)
    assert_bit_exact(decode_bytes(layout, payload, chunk_bytes=997), delta)
    small_layout, small_payload = encode_bytes(
        {k: v for k, v in delta.items() if k != "model.layers.0.q_proj.weight"}, codec, shard_bytes=8
    )
    assert len(small_layout.shards) > 5
    assert_bit_exact(
        decode_bytes(small_layout, small_payload, chunk_bytes=1),
        {k: v for k, v in delta.items() if k != "model.layers.0.q_proj.weight"},
    )


@pytest.mark.parametrize(
    "tensor",
    [
        torch.from_numpy(np.zeros(0, dtype=np.float32)),  # numpy's empty arrays have stride 0
        torch.zeros(1).expand(0),
        torch.tensor(5.0).expand(1),  # a broadcast scalar: one element, stride 0
        torch.tensor(-3, dtype=torch.int16).expand(1, 1),
        torch.arange(24, dtype=torch.float64).reshape(2, 3, 4).permute(2, 0, 1),
        torch.arange(20, dtype=torch.int32)[::3],
    ],
    ids=["numpy-empty", "expand-0", "expand-1", "expand-1x1", "permuted", "strided"],
)
def test_odd_strides_round_trip(tensor):
    """Views with unusual strides encode as their values; contiguous() alone leaves 0/1-element strides odd."""
    delta = {"t": tensor, "after": torch.arange(3)}
    for codec in (Codec(), Codec(cast=Cast.BF16)):
        layout, payload = encode_bytes(delta, codec)
        want = {
            "t": tensor.to(torch.bfloat16).to(tensor.dtype)
            if tensor.dtype == torch.float64 and codec.cast is Cast.BF16
            else tensor,
            "after": delta["after"],
        }
        assert_bit_exact(decode_bytes(layout, payload), want)


def test_decode_file_from_disk(tmp_path):
    delta = {"a.weight": make_tensor(torch.float32, (500, 70), 5, "small"), "b": torch.arange(10)}
    path = tmp_path / "payload.gdz"
    with path.open("wb") as sink:
        layout = encode(delta, Codec(block_bytes=MIN_BLOCK_BYTES), sink, shard_bytes=50_000)
    assert path.stat().st_size == layout.total_bytes
    with path.open("rb") as source:
        assert_bit_exact(decode_file(source, layout), delta)
        _, tensors = decode_chunks(iter_chunks(header(layout), layout, source, chunk_bytes=4096))
    assert_bit_exact(tensors, delta)


def test_empty_delta_round_trips():
    layout, payload = encode_bytes({}, Codec())
    assert (layout.shards, layout.total_bytes, payload) == ((), 0, b"")
    assert decode_bytes(layout, payload) == {}
    assert decode_file(io.BytesIO(), layout) == {}


def test_special_float_values_are_bit_exact():
    """-0.0, subnormals and the largest finite values survive every float dtype unchanged."""
    for dtype in FLOATS:
        info = torch.finfo(dtype)
        values = torch.tensor(
            [0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, info.eps, 1.0], dtype=dtype
        )
        subnormal = (values[2:3].view(bits(values).dtype) - 1).view(dtype)  # the largest subnormal
        tensor = torch.cat([values, subnormal])
        for codec in EXACT_CODECS[:3]:
            layout, payload = encode_bytes({"v": tensor}, codec)
            assert_bit_exact(decode_bytes(layout, payload), {"v": tensor})


# --- casts ---------------------------------------------------------------------------------------


@st.composite
def castable_floats(draw: st.DrawFn, *, max_abs: float) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    shape = tuple(draw(st.lists(st.integers(0, 12), max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-40, 4))
    values = np.clip(rng.standard_normal(math.prod(shape)) * scale, -max_abs, max_abs)
    return torch.from_numpy(values).to(dtype).reshape(shape)


def check_cast_round_trip(delta: dict[str, torch.Tensor], cast: Cast, shard_bytes: int) -> None:
    target = torch.bfloat16 if cast is Cast.BF16 else torch.float16
    codec = Codec(cast=cast, block_bytes=MIN_BLOCK_BYTES)
    layout, payload = encode_bytes(delta, codec, shard_bytes=bounded(shard_bytes, delta))
    assert layout.manifest == manifest_of(delta)  # the manifest keeps the original dtypes
    for decoded in (decode_bytes(layout, payload, chunk_bytes=333), decode_file(io.BytesIO(payload), layout)):
        want = {
            name: t.to(target).to(t.dtype) if t.dtype in (torch.float32, torch.float64) else t
            for name, t in delta.items()
        }
        assert_bit_exact(decoded, want)


@settings(max_examples=60, deadline=None, suppress_health_check=_SLOW_DATA)
@given(
    delta=deltas(st.one_of(castable_floats(max_abs=3e38), tensors_st(dtypes=NOT_CAST)), max_size=5),
    shard_bytes=shard_sizes,
)
def test_bf16_cast_rounds_floats_and_keeps_the_rest(delta, shard_bytes):
    check_cast_round_trip(delta, Cast.BF16, shard_bytes)


@settings(max_examples=60, deadline=None, suppress_health_check=_SLOW_DATA)
@given(
    delta=deltas(st.one_of(castable_floats(max_abs=65504.0), tensors_st(dtypes=NOT_CAST)), max_size=5),
    shard_bytes=shard_sizes,
)
def test_f16_cast_rounds_floats_and_keeps_the_rest(delta, shard_bytes):
    check_cast_round_trip(delta, Cast.F16, shard_bytes)


def test_cast_multi_block_round_trip():
    """A cast piece spans more destination bytes than wire bytes per block: both sides must agree."""
    delta = {
        "w32": make_tensor(torch.float32, (100_000,), 7, "small"),
        "w64": make_tensor(torch.float64, (70_001,), 8, "small"),
    }
    for cast in (Cast.BF16, Cast.F16):
        check_cast_round_trip(delta, cast, 150_000)


@pytest.mark.parametrize(
    ("cast", "value", "rounded"),
    [
        # bf16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> even (1.0).
        (Cast.BF16, 1 + 2**-8, 1.0),
        # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        (Cast.BF16, 1 + 3 * 2**-8, 1 + 2**-6),
        (Cast.BF16, 1 + 2**-8 + 2**-20, 1 + 2**-7),  # above halfway: up
        (Cast.BF16, -(1 + 2**-8), -1.0),
        # f16 keeps 10 mantissa bits.
        (Cast.F16, 1 + 2**-11, 1.0),
        (Cast.F16, 1 + 3 * 2**-11, 1 + 2**-9),
        (Cast.F16, 65519.0, 65504.0),  # rounds down to f16's largest finite value
        (Cast.F16, 2**-25 + 2**-30, 2**-24),  # into f16's subnormals
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cast_rounds_to_nearest_even(cast, value, rounded, dtype):
    tensor = torch.tensor([value], dtype=dtype)
    layout, payload = encode_bytes({"x": tensor}, Codec(cast=cast))
    out = decode_bytes(layout, payload)["x"]
    assert out.dtype == dtype
    assert out.item() == rounded


def test_cast_header_names_the_wire_dtype():
    delta = {
        "f": torch.ones(3),
        "d": torch.ones(2, dtype=torch.float64),
        "h": torch.ones(2, dtype=torch.float16),
    }
    for cast, wire in ((Cast.BF16, "BF16"), (Cast.F16, "F16")):
        layout, payload = encode_bytes(delta, Codec(cast=cast))
        entries = json.loads(unzstd(split_frames(layout, payload)[0][0])[8:])
        assert [e["dtype"] for e in entries.values()] == [wire, wire, "F16"]


@pytest.mark.parametrize("value", [65520.0, 1e5, -70000.0, 3.0e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_f16_cast_overflow_is_refused_at_encode(value, dtype):
    tensor = torch.zeros(10, dtype=dtype)
    tensor[3] = value
    with pytest.raises(NonFiniteValues) as info:
        encode({"model.big": tensor}, Codec(cast=Cast.F16), io.BytesIO())
    assert "model.big" in str(info.value)
    assert info.value.field == "model.big"


def test_bf16_cast_overflow_is_refused_at_encode():
    # fp32's largest value is above bf16's largest and rounds to inf.
    with pytest.raises(NonFiniteValues):
        encode({"m": torch.tensor([torch.finfo(torch.float32).max])}, Codec(cast=Cast.BF16), io.BytesIO())
    with pytest.raises(NonFiniteValues):
        encode({"m": torch.tensor([1e300], dtype=torch.float64)}, Codec(cast=Cast.BF16), io.BytesIO())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("codec", [Codec(), Codec(byte_shuffle=False), Codec(cast=Cast.BF16)])
def test_encoder_refuses_non_finite(dtype, bad, codec):
    tensor = torch.zeros(100_000, dtype=dtype)  # several blocks; the bad one is the last
    tensor[-1] = bad
    delta = {"ok": torch.zeros(4), "layers.0.bad": tensor}
    with pytest.raises(NonFiniteValues) as info:
        encode(
            delta,
            Codec(cast=codec.cast, byte_shuffle=codec.byte_shuffle, block_bytes=MIN_BLOCK_BYTES),
            io.BytesIO(),
        )
    assert "layers.0.bad" in info.value.message
    assert info.value.code.name == "INVALID_ARGUMENT"


def test_encoder_refuses_a_bad_codec_and_dtype():
    with pytest.raises(InvalidArgument):
        encode({"a": torch.ones(2)}, Codec(block_bytes=1000), io.BytesIO())
    with pytest.raises(ValueError, match="cannot travel"):
        encode({"a": torch.ones(2, dtype=torch.complex64)}, Codec(), io.BytesIO())


# --- a shard is a safetensors file ---------------------------------------------------------------


def shard_file(layout, payload: bytes, index: int) -> bytes:
    """Shard ``index`` decompressed and unshuffled: frame 0 is the header, then each piece's blocks."""
    frames = split_frames(layout, payload)[index]
    spec = layout.shards[index]
    wire = [layout.codec.wire_dtype(t.dtype) for t in layout.manifest]
    out = [unzstd(frames[0])]
    f = 1
    for piece in spec.pieces:
        size = itemsize(wire[piece.tensor])
        for _ in block_sizes(piece.count * size, layout.codec.block_bytes):
            planes = np.frombuffer(unzstd(frames[f]), dtype=np.uint8)
            block = np.empty_like(planes)
            if layout.codec.byte_shuffle:
                unshuffle_into(planes, block, size)
            else:
                block[:] = planes
            out.append(block.tobytes())
            f += 1
    assert f == len(frames)
    raw = b"".join(out)
    assert len(raw) == spec.raw_bytes
    return raw


@settings(max_examples=50, deadline=None, suppress_health_check=_SLOW_DATA)
@given(
    delta=deltas(st.one_of(tensors_st(), large_tensors()), min_size=1, max_size=4),
    codec=st.sampled_from(
        [
            *SMALL_CODECS,
            Codec(cast=Cast.BF16, block_bytes=MIN_BLOCK_BYTES),
            Codec(cast=Cast.F16, block_bytes=MIN_BLOCK_BYTES),
        ]
    ),
    shard_bytes=st.one_of(st.integers(8, 4096), st.integers(60_000, 300_000)),
)
def test_each_shard_is_a_safetensors_file(delta, codec, shard_bytes):
    delta = fit_for_cast(delta, codec.cast)
    layout, payload = encode_bytes(delta, codec, shard_bytes=bounded(shard_bytes, delta))
    flats = {name: t.reshape(-1) for name, t in delta.items()}
    covered = dict.fromkeys(delta, 0)
    for index, spec in enumerate(layout.shards):
        loaded = safetensors.torch.load(shard_file(layout, payload, index))
        assert len(loaded) == len(spec.pieces)
        for piece in spec.pieces:
            tensor = layout.manifest[piece.tensor]
            wire = to_torch(layout.codec.wire_dtype(tensor.dtype))
            entry = loaded[tensor.name]
            want = flats[tensor.name][piece.start : piece.start + piece.count].to(wire)
            assert entry.dtype == wire and entry.shape == (piece.count,)
            assert torch.equal(bits(entry), bits(want))
            covered[tensor.name] += piece.count
    assert covered == {name: t.numel() for name, t in delta.items()}


def test_frames_are_zstd_with_declared_sizes():
    """Every frame declares its decoded size (what the decoder reads before decompressing)."""
    delta = {"w": make_tensor(torch.float32, (50_000,), 3, "bits"), "b": torch.ones(3, dtype=torch.int16)}
    layout, payload = encode_bytes(delta, Codec(block_bytes=MIN_BLOCK_BYTES), shard_bytes=120_000)
    for spec, frames in zip(layout.shards, split_frames(layout, payload), strict=True):
        sizes = expected_frame_sizes(spec, layout)
        assert [zstandard.frame_content_size(f) for f in frames] == sizes
        assert [len(unzstd(f)) for f in frames] == sizes


# --- golden header bytes -------------------------------------------------------------------------

GOLDEN_MANIFEST = (
    TensorSpec("test", DType.F32, (2, 2)),
    TensorSpec("model.layers.0.q_proj.weight", DType.F32, (3,)),
    TensorSpec("é", DType.I64, (0,)),
)
GOLDEN_PIECES = (Piece(0, 1, 3), Piece(1, 0, 3), Piece(2, 0, 0))
GOLDEN_WIRE = (DType.BF16, DType.F32, DType.I64)
GOLDEN_HEADER = (
    b"\xc8\x00\x00\x00\x00\x00\x00\x00"
    b'{"test":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},'
    b'"model.layers.0.q_proj.weight":{"dtype":"F32","shape":[3],"data_offsets":[6,18]},'
    b'"\xc3\xa9":{"dtype":"I64","shape":[0],"data_offsets":[18,18]}}     '
)


def test_golden_safetensors_header():
    got = build_header(GOLDEN_PIECES, GOLDEN_MANIFEST, GOLDEN_WIRE)
    assert got == GOLDEN_HEADER
    assert len(got) % 8 == 0
    assert struct.unpack("<Q", got[:8])[0] == len(got) - 8 == 200
    check_header(got, GOLDEN_PIECES, GOLDEN_MANIFEST, GOLDEN_WIRE)
    loaded = safetensors.torch.load(got + bytes(18))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in loaded.items()} == {
        "test": (torch.bfloat16, (3,)),
        "model.layers.0.q_proj.weight": (torch.float32, (3,)),
        "é": (torch.int64, (0,)),
    }


def test_single_entry_header_matches_safetensors_own():
    """For one 1-D tensor our header is byte for byte what safetensors itself writes."""
    manifest = (TensorSpec("test", DType.F32, (4,)),)
    got = build_header((Piece(0, 0, 4),), manifest, (DType.F32,))
    assert (
        got
        == b'@\x00\x00\x00\x00\x00\x00\x00{"test":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}      '
    )
    assert safetensors.torch.save({"test": torch.zeros(4)}) == got + bytes(16)


def test_plan_shards_is_stable():
    """Piece boundaries are part of the format; a change here changes every layout."""
    manifest = (
        TensorSpec("a", DType.F32, (10,)),
        TensorSpec("e", DType.F32, (0,)),
        TensorSpec("b", DType.F64, (3,)),
        TensorSpec("c", DType.I8, (5,)),
    )
    assert plan_shards(manifest, Codec(), 24) == [
        (Piece(0, 0, 6),),
        (Piece(0, 6, 4), Piece(1, 0, 0), Piece(2, 0, 1)),
        (Piece(2, 1, 2), Piece(3, 0, 5)),
    ]
    # Under a bf16 cast the f32 and f64 tensors travel in 2 bytes, so more of them fit.
    assert plan_shards(manifest, Codec(cast=Cast.BF16), 24) == [
        (Piece(0, 0, 10), Piece(1, 0, 0), Piece(2, 0, 2)),
        (Piece(2, 2, 1), Piece(3, 0, 5)),
    ]


def test_shuffle_is_a_byte_transpose():
    block = np.arange(12, dtype=np.uint8)
    assert shuffle(block, 4).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    out = np.empty_like(block)
    unshuffle_into(shuffle(block, 4), out, 4)
    assert out.tolist() == block.tolist()


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    data=st.binary(max_size=512),
    misalign=st.integers(0, 3),
    reuse=st.booleans(),
)
def test_shuffle_is_the_byte_transpose_and_unshuffle_inverts_it(
    size: int, data: bytes, misalign: int, reuse: bool
) -> None:
    """Every item size (the kernels special-case 2, 4 and 8), any length, source and destination
    not word-aligned (pieces of tensors), into a fresh array or a caller's buffer."""
    usable = len(data) - len(data) % size
    block = np.frombuffer(b"\0" * misalign + data[:usable], dtype=np.uint8)[misalign:]
    backing = np.full(block.size + misalign, 0xEE, dtype=np.uint8)
    out = backing[misalign:]
    planes = shuffle(block, size, np.full(block.size, 0x5A, dtype=np.uint8) if reuse else None)
    # The wire format: byte j of every item, for j = 0, 1, ... (what other decoders rely on).
    assert planes.tobytes() == block.reshape(-1, size).T.tobytes()
    unshuffle_into(planes, out, size)
    assert out.tobytes() == block.tobytes()
    assert (backing[:misalign] == 0xEE).all()


def test_shuffle_refuses_sizes_that_do_not_fit() -> None:
    """The kernels skip bounds checks, so a mismatched size must be refused before they run."""
    block = np.zeros(12, dtype=np.uint8)
    with pytest.raises(ValueError, match="whole number"):
        shuffle(block[:10], 4)
    with pytest.raises(ValueError, match="out holds 8 bytes"):
        shuffle(block, 4, np.empty(8, dtype=np.uint8))
    with pytest.raises(ValueError, match="out holds 16 bytes"):
        unshuffle_into(block, np.empty(16, dtype=np.uint8), 4)


# --- serde ---------------------------------------------------------------------------------------

header_texts = st.text(max_size=20)
u64 = st.integers(0, 2**64 - 1)
non_negative = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)


@st.composite
def delta_headers(draw: st.DrawFn) -> tuple[DeltaHeader, PayloadLayout, bytes]:
    delta = draw(deltas(max_size=4))
    codec = draw(st.sampled_from([*EXACT_CODECS, Codec(cast=Cast.BF16), Codec(cast=Cast.F16, zstd_level=3)]))
    delta = fit_for_cast(delta, codec.cast)
    layout, payload = encode_bytes(delta, codec, shard_bytes=bounded(draw(shard_sizes), delta))
    built = DeltaHeader(
        spec=layout.spec,
        run_id=draw(header_texts),
        round=draw(u64),
        site_id=draw(header_texts),
        upload_id=draw(header_texts),
        sample_count=draw(u64),
        base_round=draw(u64),
        kind=draw(st.sampled_from(DeltaKind)),
        metrics=UploadMetrics(
            train_loss=draw(non_negative),
            eval_loss=draw(non_negative),
            steps=draw(u64),
            train_seconds=draw(non_negative),
        ),
    )
    return built, layout, payload


@settings(max_examples=80, deadline=None, suppress_health_check=_SLOW_DATA)
@given(case=delta_headers(), chunk_bytes=st.integers(1, 2000))
def test_serde_round_trip(case, chunk_bytes):
    built, layout, payload = case
    msg = serde.header_to_proto(built)
    assert serde.header_from_proto(msg) == built
    wire = pb.DeltaHeader.FromString(msg.SerializeToString())
    assert wire == msg
    assert serde.header_from_proto(wire) == built
    stream = list(
        iter_chunks(built, layout, io.BytesIO(payload), chunk_bytes=max(chunk_bytes, len(payload) // 50))
    )
    received = []
    for chunk in stream:
        chunk_msg = pb.DeltaChunk()
        chunk_msg.ParseFromString(serde.chunk_to_proto(chunk).SerializeToString())
        assert chunk_msg.HasField("header") == (chunk.header is not None)
        assert chunk_msg.HasField("shard") == (chunk.shard is not None)
        received.append(serde.chunk_from_proto(chunk_msg))
    assert received == stream
    assert [c.shard for c in stream if c.shard is not None] == list(layout.shards)
    # What came through protobuf still decodes, bit-exactly.
    _, tensors = decode_chunks(received)
    _, direct = decode_chunks(stream)
    assert_bit_exact(tensors, direct)


def _header_msg() -> pb.DeltaHeader:
    layout, _ = encode_bytes({"a": torch.ones(3)}, Codec())
    return serde.header_to_proto(header(layout))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: setattr(m.codec, "cast", 7), "codec.cast"),
        (lambda m: setattr(m.manifest[0], "dtype", 0), "manifest[0].dtype"),
        (lambda m: setattr(m.manifest[0], "dtype", 99), "manifest[0].dtype"),
        (lambda m: setattr(m, "kind", 42), "kind"),
        (lambda m: setattr(m.metrics, "train_loss", math.nan), "metrics.train_loss"),
        (lambda m: setattr(m.metrics, "eval_loss", -1.0), "metrics.eval_loss"),
        (lambda m: setattr(m.metrics, "train_seconds", math.inf), "metrics.train_seconds"),
    ],
)
def test_serde_refuses_unknown_enums_and_bad_metrics(mutate: Any, field: str):
    msg = _header_msg()
    mutate(msg)
    with pytest.raises(InvalidArgument) as info:
        serde.header_from_proto(pb.DeltaHeader.FromString(msg.SerializeToString()))
    assert info.value.field == field
    assert field in info.value.message


def test_dtype_table_matches_the_wire_enum():
    for dtype in DType:
        assert pb.DType.Name(pb.DType.ValueType(int(dtype))) == f"DTYPE_{dtype.name}"
        assert from_torch(to_torch(dtype)) is dtype
    for cast in Cast:
        assert pb.Cast.Name(pb.Cast.ValueType(int(cast))) == f"CAST_{cast.name}"
    for kind in DeltaKind:
        assert pb.DeltaKind.Name(pb.DeltaKind.ValueType(int(kind))) == f"DELTA_KIND_{kind.name}"


def test_allocate_takes_fitting_spares_and_allocates_the_rest() -> None:
    from common.codec import allocate

    manifest = [
        TensorSpec("w", DType.F32, (4, 3)),
        TensorSpec("b", DType.F32, (3,)),
        TensorSpec("h", DType.BF16, (5,)),
        TensorSpec("tied", DType.F32, (4, 3)),
        TensorSpec("new", DType.F32, (2,)),
    ]
    w = torch.zeros(4, 3)
    spare = {
        "w": w,
        "b": torch.zeros(4),  # another shape
        "h": torch.zeros(5),  # another dtype
        "tied": w,  # the same storage as "w": decoding both into it would mix them
        "unused": torch.zeros(7),
    }
    out = allocate(manifest, reuse=spare)
    assert list(out) == ["w", "b", "h", "tied", "new"]
    assert out["w"] is w
    for name in ("b", "h", "tied", "new"):
        assert out[name] is not spare.get(name)
        assert out[name].data_ptr() != w.data_ptr()
    assert [tuple(t.shape) for t in out.values()] == [(4, 3), (3,), (5,), (4, 3), (2,)]
    assert out["h"].dtype == torch.bfloat16
    assert allocate(manifest).keys() == out.keys()


def test_buffer_pool_hands_out_the_smallest_fit_and_keeps_the_largest() -> None:
    pool = BufferPool(keep=2)
    small, large = np.empty(10, np.uint8), np.empty(100, np.uint8)
    pool.give(small)
    pool.give(large)
    assert pool.take(5) is small  # the smallest that fits
    assert pool.take(50) is large
    fresh = pool.take(5)
    assert fresh.size == 5 and fresh is not small  # none kept: a new one
    for size in (30, 20, 10, 40):
        pool.give(np.empty(size, np.uint8))
    assert pool.held_bytes == 70  # only the two largest stay
    assert pool.take(1000).size == 1000


def test_a_stream_decodes_through_the_shard_buffers_of_the_last_one() -> None:
    """A worker fetches every round: its shard buffers come back from the pool, not from fresh pages."""
    delta = {f"t{i}": make_tensor(torch.float32, (50_000,), i, "bits") for i in range(4)}
    layout, payload = encode_bytes(delta, Codec(), shard_bytes=120_000)
    assert len(layout.shards) >= 3
    assert_bit_exact(decode_bytes(layout, payload), delta)
    kept = {id(buf) for buf in SHARD_BUFFERS._free}
    assert kept and SHARD_BUFFERS.held_bytes >= max(s.compressed_bytes for s in layout.shards)
    other = {k: v + 1 for k, v in delta.items()}
    other_layout, other_payload = encode_bytes(other, Codec(), shard_bytes=120_000)
    assert_bit_exact(decode_bytes(other_layout, other_payload), other)
    assert {id(buf) for buf in SHARD_BUFFERS._free} == kept  # the same arrays went out and came back
