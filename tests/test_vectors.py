"""The conformance vectors hold for this implementation: each valid one decodes to its stored tensors and is
re-encoded and re-streamed byte for byte, each malformed one is refused with its stated status, reason and
stage, and the files are what the generator writes (protos/gradualdiff/v1/vectors/, docs/protocol.md)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import grpc
import pytest
import torch

from common.conformance import VECTORS_DIR, Refusal, Vector, load
from common.conformance.check import check_refused, check_reproduced, check_valid, receive
from common.conformance.malformed import malformed_vectors
from common.conformance.valid import valid_vectors
from common.conformance.vectors import STAGES, chunk_summary, header_text, read_index, zstd_versions
from common.delta import Cast, Digest, Lossy
from common.errors import CATALOG
from common.serde import chunk_from_wire
from tests.scripted import ROOT

VECTORS = load()
VALID = [v for v in VECTORS if v.refusal is None]
MALFORMED = [v for v in VECTORS if v.refusal is not None]
MADE_WITH: dict[str, str] = read_index()["zstd"]


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v.name)
def test_valid_vector_decodes_to_its_tensors(vector: Vector) -> None:
    assert check_valid(vector) == []


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v.name)
def test_encoder_reproduces_valid_vector(vector: Vector) -> None:
    if not vector.reproducible:
        pytest.skip("a form receivers accept and encoders never write")
    problems, skipped = check_reproduced(vector, MADE_WITH)
    assert problems == []  # codec, manifest, pieces, raw sizes, frame count, decompressed frames
    if skipped:
        pytest.skip(f"{skipped}: compressed bytes, frame sizes and digests depend on the zstd version")


@pytest.mark.parametrize("vector", MALFORMED, ids=lambda v: v.name)
def test_malformed_vector_is_refused_as_stated(vector: Vector) -> None:
    assert check_refused(vector) == []


def test_the_checks_notice_a_wrong_statement() -> None:
    """The checks above can fail: a changed value, a wrong reason, a wrong stage, a valid delta called bad."""
    exact = next(v for v in VALID if v.name == "exact")
    changed = dict(exact.tensors)
    changed["scale"] = changed["scale"] + 1
    assert check_valid(dataclasses.replace(exact, tensors=changed)) != []
    nan = next(v for v in MALFORMED if v.name == "bad-nan")
    assert check_refused(dataclasses.replace(nan, refusal=Refusal("DATA_LOSS", "CHECKSUM_MISMATCH", "shard")))
    assert check_refused(
        dataclasses.replace(nan, refusal=Refusal("INVALID_ARGUMENT", "NON_FINITE_VALUES", "header"))
    )
    called_bad = dataclasses.replace(exact, refusal=Refusal("INVALID_ARGUMENT", "MALFORMED_SHARD", "shard"))
    assert "decoded without error" in check_refused(called_bad)[0]
    other = next(v for v in VALID if v.name == "exact-noshuffle")
    assert check_reproduced(dataclasses.replace(other, shard_bytes=1024), MADE_WITH)[0] != []
    # Under another zstd the byte comparison is skipped, saying why, and the rest still runs (and can fail).
    problems, why = check_reproduced(other, {"libzstd": "0.0.0"})
    assert problems == [] and "zstd" in why
    assert check_reproduced(dataclasses.replace(other, shard_bytes=1024), {"libzstd": "0.0.0"})[0] != []
    # The streams are compared message by message: another cut of the same payload is noticed.
    if zstd_versions() == MADE_WITH:
        assert check_reproduced(dataclasses.replace(exact, chunk_bytes=4000), MADE_WITH)[0] != []
    # A resumed vector whose second stream is dropped ends short.
    resumed = next(v for v in VALID if len(v.streams) > 1)
    assert check_valid(dataclasses.replace(resumed, streams=resumed.streams[:1])) != []


def test_vectors_cover_every_codec_digest_and_boundary() -> None:
    received = [receive(v) for v in VALID]
    codecs = [r.layout.codec for r in received]
    assert {c.cast for c in codecs} == set(Cast)
    assert {c.lossy for c in codecs} == set(Lossy)
    assert {c.byte_shuffle for c in codecs} == {True, False}
    assert {c.digest for c in codecs} == {Digest.SHA256, Digest.BLAKE3}
    layouts = [r.layout for r in received]
    assert any(len(layout.shards) > 1 for layout in layouts)
    assert any(not layout.shards for layout in layouts)  # a delta of no tensors: one empty chunk
    # A piece over several blocks (frames), and a tensor cut across shards.
    assert any(
        len(s.frame_bytes) > len([p for p in s.pieces if p.count]) + 1 for lay in layouts for s in lay.shards
    )
    assert any(p.start > 0 for lay in layouts for s in lay.shards for p in s.pieces)
    shapes = [t.shape for lay in layouts for t in lay.manifest]
    assert () in shapes and any(0 in shape for shape in shapes)
    # A shard over several chunks, and an upload resumed inside a shard (not at a chunk ending one).
    summaries = [[chunk_summary(m) for m in v.messages] for v in VALID]
    assert any(sum(not c["shard"] for c in chunks) > 1 for chunks in summaries)
    resumed = [r for r, v in zip(received, VALID, strict=True) if len(v.streams) > 1]
    assert resumed and all(
        at not in set(r.layout.shard_offsets()) | {r.layout.total_bytes}
        for r in resumed
        for at in r.resume_at
    )


def test_every_chunk_of_a_valid_stream_follows_the_rule() -> None:
    """Each chunk lies within one shard; the one ending a shard, and only it, carries that shard's spec."""
    for v, r in ((v, receive(v)) for v in VALID):
        ends = dict(zip(r.layout.shard_offsets()[1:], r.layout.shards, strict=True))
        for raw in v.messages:
            chunk = chunk_from_wire(raw)
            end = chunk.offset + len(chunk.data)
            assert chunk.shard == ends.get(end), (v.name, chunk.offset)
            assert all(not chunk.offset < e < end for e in ends), (v.name, chunk.offset)


def test_malformed_vectors_state_real_statuses_and_every_defect_the_spec_names() -> None:
    names = {v.name for v in MALFORMED}
    for wanted in (
        "bad-frame-damaged",
        "bad-frame-size",
        "bad-truncated",
        "bad-stheader-entry",
        "bad-stheader-number",
        "bad-nan",
        "bad-piece-beyond-tensor",
        "bad-frame0-shuffled",
        "bad-frame-no-content-size",
        "bad-manifest-mismatch",
        # Wire revision 2: shard specs travel with the data.
        "bad-spec-early",
        "bad-chunk-crosses-shards",
        "bad-last-uncovered",
        "bad-last-no-spec",
        "bad-digest-unspecified",
        "bad-digest-unknown",
        "bad-pieces-discontinue",
        "bad-shard-over-bound",
        "bad-resume-spec-not-resent",
    ):
        assert wanted in names
    for v in MALFORMED:
        assert v.refusal is not None
        assert v.refusal.status in grpc.StatusCode.__members__, v.name
        # The reason is one clients can look up (docs/protocol.md's Errors table), with that status.
        assert CATALOG[v.refusal.reason].code.name == v.refusal.status, v.name
        assert v.refusal.stage in STAGES, v.name
        assert v.refusal.reason.isupper() and " " not in v.refusal.reason, v.name


def test_the_directory_holds_the_index_and_its_files_only_and_stays_small() -> None:
    index = read_index()
    named = {"index.json"}
    for entry in index["valid"] + index["malformed"]:
        named |= {entry[k] for k in ("header", "chunks", "tensors", "dense") if k in entry}
    present = {p.name for p in VECTORS_DIR.iterdir()}
    assert present == named
    for path in VECTORS_DIR.iterdir():  # text only: the repository tracks no binary files
        path.read_bytes().decode("utf-8")
    assert sum(p.stat().st_size for p in VECTORS_DIR.iterdir()) < 640 * 1024


def test_the_readable_parts_say_what_the_messages_say() -> None:
    """header.json and the index's stream summary are derived from the messages, and agree with them."""
    index = read_index()
    for entry, v in zip(index["valid"] + index["malformed"], VECTORS, strict=True):
        assert entry["name"] == v.name
        assert entry["stream"] == [chunk_summary(m) for m in v.messages], v.name
        header = v.header_message()
        if header is None:
            assert "header" not in entry, v.name
        else:
            assert (VECTORS_DIR / entry["header"]).read_text(encoding="utf-8") == header_text(header), v.name
    assert not list(VECTORS_DIR.rglob("*.proto"))  # protoc and the contract checks glob the parent


def test_git_does_not_ignore_the_vectors() -> None:
    """Every vector file is tracked text (binary content as base64): none falls under an ignore rule."""
    inside = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True
    )
    if inside.returncode != 0:
        pytest.skip("not a git work tree")
    files = [str(p.relative_to(ROOT)) for p in VECTORS_DIR.iterdir()]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 1 and ignored.stdout == "", ignored.stdout


def test_the_stored_vectors_are_what_the_generator_writes() -> None:
    """A change of the codec or the generator shows here until the vectors are regenerated (--write)."""
    fresh = {v.name: v for v in valid_vectors() + malformed_vectors()}
    assert sorted(fresh) == sorted(v.name for v in VECTORS)
    same_zstd = zstd_versions() == MADE_WITH
    for stored in VECTORS:
        new = fresh[stored.name]
        assert (new.refusal, new.round_manifest, new.exercises) == (
            stored.refusal,
            stored.round_manifest,
            stored.exercises,
        )
        assert new.chunk_bytes == stored.chunk_bytes and new.shard_bytes == stored.shard_bytes
        assert [len(s) for s in new.streams] == [len(s) for s in stored.streams], stored.name
        if same_zstd:
            assert new.streams == stored.streams, stored.name
        for name, tensor in stored.tensors.items():
            assert torch.equal(
                new.tensors[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            )


@pytest.mark.slow
def test_the_documented_command_checks_the_vectors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "common.conformance", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(VALID)} valid and {len(MALFORMED)} malformed vectors: 0 problem(s)" in done.stdout
