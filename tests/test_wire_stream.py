"""The chunk stream of wire revision 2: shard specs with the data, resumes, and a payload sent while encoded.

iter_chunks cuts a stored payload at shard boundaries with each spec on the
chunk that ends its shard; ChunkVerifier accepts exactly that from any resume
offset, given the specs of the shards before it; GrowingPayload streams the
shards an encoder thread has finished while it writes the rest; the digests
are the named algorithms.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import blake3
import google_crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import serde
from common.codec import (
    ChunkVerifier,
    DeltaStreamDecoder,
    GrowingPayload,
    LayoutBuilder,
    decode_chunks,
    digest_of_digests,
    encode,
    frame_digest,
    iter_chunks,
    total_bound,
    validate_layout,
)
from common.codec.assembler import ShardAssembler
from common.codec.chunks import crc32c
from common.delta import MIN_BLOCK_BYTES, Chunk, Codec, DeltaHeader, Digest, PayloadLayout, TensorSpec
from common.errors import InvalidArgument, NonFiniteValues
from tests.codec_helpers import assert_bit_exact

CODEC = Codec(block_bytes=MIN_BLOCK_BYTES)


def delta(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {f"layer{i}.weight": torch.randn(120, 100 + i, generator=gen) * 0.02 for i in range(n)}
    out["empty"] = torch.empty(0, 3)
    out["last.bias"] = torch.randn(7, generator=gen)
    return out


def stored(
    tensors: dict[str, torch.Tensor], shard_bytes: int, codec: Codec = CODEC
) -> tuple[PayloadLayout, bytes]:
    sink = io.BytesIO()
    layout = encode(tensors, codec, sink, shard_bytes=shard_bytes)
    return layout, sink.getvalue()


def header_of(layout: PayloadLayout) -> DeltaHeader:
    return DeltaHeader(spec=layout.spec, run_id="r", round=1, site_id="s", upload_id="u", sample_count=1)


def verify_from(layout: PayloadLayout, stream: list[Chunk], start: int) -> ChunkVerifier:
    before = [s for s, end in zip(layout.shards, layout.shard_offsets()[1:], strict=True) if end <= start]
    verifier = ChunkVerifier(layout.spec, start=start, shards=before)
    for chunk in stream:
        verifier.check(chunk)
    return verifier


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shard_bytes=st.integers(500, 120_000),
    chunk_bytes=st.integers(1000, 70_000),
    where=st.floats(0, 1),
    digest=st.sampled_from([Digest.BLAKE3, Digest.SHA256]),
)
def test_chunks_follow_the_shards_from_any_offset(shard_bytes, chunk_bytes, where, digest):
    layout, payload = stored(delta(), shard_bytes, Codec(block_bytes=MIN_BLOCK_BYTES, digest=digest))
    ends = layout.shard_offsets()[1:]
    for start in sorted({0, int(where * layout.total_bytes), ends[0], ends[0] + 1, layout.total_bytes}):
        stream = list(
            iter_chunks(header_of(layout), layout, io.BytesIO(payload), start=start, chunk_bytes=chunk_bytes)
        )
        assert stream[0].header == header_of(layout) and all(c.header is None for c in stream[1:])
        assert [c.last for c in stream] == [False] * (len(stream) - 1) + [True]
        bounds = layout.shard_offsets()
        offset = start
        for chunk in stream:
            assert chunk.offset == offset and len(chunk.data) <= chunk_bytes
            offset += len(chunk.data)
            if not chunk.data:  # only a resume at the very end
                assert chunk.shard is None and chunk.last and start == layout.total_bytes
                continue
            # Within one shard; its spec exactly on the chunk that ends it.
            k = max(i for i, begin in enumerate(bounds[:-1]) if begin <= chunk.offset)
            assert offset <= bounds[k + 1]
            assert chunk.shard == (layout.shards[k] if offset == bounds[k + 1] else None)
        assert offset == layout.total_bytes
        verifier = verify_from(layout, stream, start)
        assert verifier.done and verifier.layout == layout
        assert [verifier.shard_begin(i) for i in range(len(ends) + 1)] == layout.shard_offsets()


def test_a_resume_mid_shard_completes_the_shard(tmp_path: Path) -> None:
    """A receiver holding part of a shard (and the specs before it) takes the rest, and decodes it whole."""
    tensors = delta(1)
    layout, payload = stored(tensors, 30_000)
    assert len(layout.shards) >= 3
    begin, end = layout.shard_offsets()[1:3]
    start = (begin + end) // 2
    assembler = ShardAssembler(
        layout.spec, start=start, shards=layout.shards[:1], partial=payload[begin:start]
    )
    rest = list(iter_chunks(header_of(layout), layout, io.BytesIO(payload), start=start, chunk_bytes=4096))
    complete = [shard for chunk in rest for shard in assembler.add(chunk)]
    assert [s.index for s in complete] == list(range(1, len(layout.shards)))
    assert bytes(complete[0].data) == payload[begin:end] and complete[0].spec == layout.shards[1]
    assert assembler.done and assembler.layout == layout
    with pytest.raises(ValueError, match="already received"):
        ShardAssembler(layout.spec, start=start, shards=layout.shards[:1], partial=b"")


def test_layout_builder_is_validate_layout_a_shard_at_a_time() -> None:
    layout, _ = stored(delta(2), 25_000)
    builder = LayoutBuilder(layout.spec)
    for index, shard in enumerate(layout.shards):
        assert not builder.complete
        assert shard.compressed_bytes <= builder.shard_bound()
        assert builder.add(shard) == index
    assert builder.finish() == layout and builder.end == layout.total_bytes
    validate_layout(layout)
    assert layout.total_bytes <= total_bound(layout.spec)
    resumed = LayoutBuilder(layout.spec, shards=layout.shards[:2])
    assert resumed.shards == layout.shards[:2] and resumed.end == layout.shard_offsets()[2]


def test_a_payload_streams_while_it_is_encoded(tmp_path: Path) -> None:
    """Shard 0 reaches the receiver before the encoder is asked for the last shard's values."""
    tensors = delta(3, n=6)
    reference, _ = stored(tensors, 30_000)
    assert len(reference.shards) >= 4
    growing = GrowingPayload(tmp_path / "payload")
    header = header_of(reference)
    first_spec_seen = threading.Event()
    last = reference.manifest[-1].name

    class Gated(dict[str, torch.Tensor]):
        def __getitem__(self, name: str) -> torch.Tensor:
            if name == last:  # the last tensor is asked for only after shard 0 went out
                assert first_spec_seen.wait(30), "shard 0 was not sent while the encoder ran"
            return super().__getitem__(name)

    def encoder() -> None:
        try:
            with open(tmp_path / "payload", "wb") as sink:
                layout = encode(
                    Gated(tensors),
                    CODEC,
                    sink,
                    shard_bytes=30_000,
                    manifest=reference.manifest,
                    on_shard=growing.shard_done,
                )
            growing.finish(layout)
        except BaseException as exc:
            growing.fail(exc)

    thread = threading.Thread(target=encoder)
    thread.start()
    received: list[Chunk] = []
    for chunk in growing.chunks(header, chunk_bytes=8192):
        received.append(chunk)
        if chunk.shard is not None:
            first_spec_seen.set()
    thread.join()
    assert growing.layout == reference
    assert_bit_exact(decode_chunks(received)[1], tensors)
    # A stream may start again (a resume), anywhere.
    start = reference.shard_offsets()[2] + 5
    again = list(growing.chunks(header, start=start, chunk_bytes=8192))
    with open(tmp_path / "payload", "rb") as source:
        stored_stream = list(iter_chunks(header, reference, source, start=start, chunk_bytes=8192))
    assert [(c.offset, bytes(c.data), c.shard, c.last) for c in again] == [
        (c.offset, bytes(c.data), c.shard, c.last) for c in stored_stream
    ]
    assert verify_from(reference, again, start).layout == reference


def test_a_failed_encoder_fails_its_streams_after_the_shards_it_finished(tmp_path: Path) -> None:
    tensors = delta(4)
    tensors["layer2.weight"][5, 5] = float("nan")
    growing = GrowingPayload(tmp_path / "payload")
    reference, _ = stored(delta(4), 30_000)

    def encoder() -> None:
        try:
            with open(tmp_path / "payload", "wb") as sink:
                growing.finish(encode(tensors, CODEC, sink, shard_bytes=30_000, on_shard=growing.shard_done))
        except BaseException as exc:
            growing.fail(exc)

    thread = threading.Thread(target=encoder)
    thread.start()
    received: list[Chunk] = []
    with pytest.raises(NonFiniteValues):
        for chunk in growing.chunks(header_of(reference)):
            received.append(chunk)
    thread.join()
    assert growing.layout is None
    specs = [c.shard for c in received if c.shard is not None]
    assert specs == list(reference.shards[: len(specs)]) and not any(c.last for c in received)


def test_an_empty_payload_is_one_empty_last_chunk(tmp_path: Path) -> None:
    layout, payload = stored({}, 1000)
    header = header_of(layout)
    (stream,) = list(iter_chunks(header, layout, io.BytesIO(payload)))
    assert (stream.offset, stream.data, stream.last, stream.shard) == (0, b"", True, None)
    growing = GrowingPayload(tmp_path / "none")
    growing.finish(layout)
    assert list(growing.chunks(header)) == [stream]
    decoder = DeltaStreamDecoder()
    assert decoder.feed(stream) == [] and decoder.finish() == []
    assert decoder.layout == layout


def test_digests_are_the_named_algorithms() -> None:
    data = bytes(range(256)) * 4097
    assert frame_digest(Digest.SHA256, data) == hashlib.sha256(data).digest()
    assert frame_digest(Digest.BLAKE3, memoryview(data)[3:]) == blake3.blake3(data[3:]).digest()
    assert frame_digest(Digest.BLAKE3, b"").hex().startswith("af1349b9f5f9a1a6")  # the BLAKE3 test vector
    parts = [frame_digest(Digest.SHA256, b"a"), frame_digest(Digest.SHA256, b"b")]
    assert digest_of_digests(Digest.SHA256, parts) == hashlib.sha256(b"".join(parts)).digest()
    with pytest.raises(InvalidArgument) as info:
        frame_digest(Digest.UNSPECIFIED, data)
    assert info.value.field == "codec.digest"


def test_a_shard_spec_names_its_digest_algorithm() -> None:
    """The same tensors under each algorithm: the same frames, digests of that algorithm."""
    by_algo = {
        algo: stored(delta(5), 40_000, Codec(block_bytes=MIN_BLOCK_BYTES, digest=algo))
        for algo in (Digest.SHA256, Digest.BLAKE3)
    }
    (sha, sha_payload), (b3, b3_payload) = by_algo[Digest.SHA256], by_algo[Digest.BLAKE3]
    assert sha_payload == b3_payload
    for algo, (layout, payload) in by_algo.items():
        offset = 0
        for shard in layout.shards:
            frames = []
            for size in shard.frame_bytes:
                frames.append(frame_digest(algo, payload[offset : offset + size]))
                offset += size
            assert shard.digest == digest_of_digests(algo, frames)
        assert layout.digest == digest_of_digests(algo, [s.digest for s in layout.shards])
    assert sha.shards[0].digest != b3.shards[0].digest
    assert Codec().digest is Digest.BLAKE3  # every sender's default


def test_crc32c_of_a_view_is_that_of_its_bytes() -> None:
    data = bytes(range(251)) * 5000
    view = memoryview(data)
    for part in (view, view[17:], view[5:100_001], view[:0]):
        assert crc32c(part) == google_crc32c.value(part.tobytes())
    assert crc32c(bytearray(b"abc")) == google_crc32c.value(b"abc")  # type: ignore[arg-type]


def test_chunks_read_without_copying_decode_bit_exact() -> None:
    """The receive path as the gRPC ends run it: chunk_from_wire views, fed to the stream decoder."""
    tensors = delta(6)
    layout, payload = stored(tensors, 20_000)
    wire = [
        serde.chunk_to_wire(c)
        for c in iter_chunks(header_of(layout), layout, io.BytesIO(payload), chunk_bytes=3000)
    ]
    _, decoded = decode_chunks(serde.chunk_from_wire(raw) for raw in wire)
    assert_bit_exact(decoded, tensors)


def test_total_bound_covers_a_payload_of_one_element_shards() -> None:
    """The largest payload a manifest allows, cut as small as a sender may: still within total_bound."""
    tensors = {"a": torch.randn(40), "b": torch.arange(3, dtype=torch.int8), "z": torch.empty(0)}
    layout, _ = stored(tensors, 8)
    assert len(layout.shards) >= 20
    assert layout.total_bytes <= total_bound(layout.spec)
    spec = layout.spec
    assert (
        total_bound(type(spec)(spec.codec, (TensorSpec("t", spec.manifest[0].dtype, (1 << 40,)),)))
        == 64 << 30
    )
