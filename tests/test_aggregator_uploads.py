"""Uploads against a real aggregator: idempotency, cut streams and resume, and every way to get one wrong.

The deltas here span several shards (``shard_bytes`` is set small) and many
chunks, so a cut lands between shards that were already folded into the
round's sum and shards that were not. Whatever happens to an upload that is
not accepted, the published state must be the one the accepted uploads alone
give, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from common.codec import make_chunk
from common.delta import MIB, Codec, DeltaHeader, DeltaKind, Digest
from common.errors import reason_of
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2
from common.serde import chunk_to_proto
from tests.codec_helpers import flip, frame_offsets
from tests.scripted import (
    AdminClient,
    Harness,
    MakeHarness,
    Payload,
    ScriptedSite,
    State,
    accumulator_dtype,
    add,
    assert_same_bits,
    final_state,
    harnesses,
    partial_delta,
    random_delta,
    refusal,
    rpc_code,
    small_state,
    token_of,
    wait_for,
    with_nan,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
SHARD = 16 * 1024  # tensor bytes per shard: the wide state below makes ~10 shards
CHUNK = 4 * 1024  # bytes per chunk: ~35 chunks per upload
WIDE = small_state(seed=5, width=128)  # 39,680 fp32 values, 155 KiB


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path, init=WIDE) as make:
        yield make


def encoded(
    site: ScriptedSite, delta: State, *, round: int = 1, base: int = 0, **kw: Any
) -> tuple[DeltaHeader, Payload]:
    """An upload of ``delta`` for round ``round`` from round ``base`` (round 1 from 0), in several shards."""
    head, payload = site.header(delta, round=round, base=base, shard_bytes=SHARD, **kw)
    assert len(payload.layout.shards) >= 8
    return head, payload


def messages(
    site: ScriptedSite, head: DeltaHeader, payload: bytes, start: int = 0
) -> list[delta_pb2.DeltaChunk]:
    return list(site.chunks(head, payload, start, chunk_bytes=CHUNK))


def accepted(receipt: federation_pb2.PushReceipt, head: DeltaHeader, payload: Payload) -> None:
    assert receipt.accepted and not receipt.duplicate
    assert (receipt.upload_id, receipt.bytes_received) == (head.upload_id, payload.layout.total_bytes)


def folded(h: Harness, upload_id: str) -> set[int]:
    """Shards of ``upload_id`` folded into the open round's sum (white-box: in-process coordinator)."""
    acc = h.agg.coordinator.state.acc
    return acc.folded_shards(upload_id) if acc is not None else set()


def received(h: Harness, upload_id: str, nbytes: int) -> None:
    """Wait until the aggregator's session of ``upload_id`` has received ``nbytes`` (white-box)."""
    session = wait_for(lambda: h.agg.coordinator.intake.session(upload_id), what="the upload session")
    wait_for(lambda: session.bytes_received == nbytes, what=f"{nbytes} bytes of {upload_id} to arrive")


# ---------------------------------------------------------------- idempotency


def test_duplicate_upload_counts_once(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 30})
    h.join_all()
    da, db = random_delta(1, h.init), random_delta(2, h.init)
    head, payload = encoded(h["a"], da)
    accepted(h["a"].push(head, payload, chunk_bytes=CHUNK), head, payload)

    again = h["a"].push(head, payload, chunk_bytes=CHUNK)
    assert again.accepted and again.duplicate
    assert (again.upload_id, again.round, again.bytes_received) == (head.upload_id, 1, len(payload))
    offset = h["a"].offset(head.upload_id)
    assert offset.complete and offset.committed_offset == len(payload)
    # A repeat that starts mid-payload is a duplicate too (the worker resumed after the receipt was lost).
    assert h["a"].push(head, payload, start=len(payload) // 2, chunk_bytes=CHUNK).duplicate

    other_head, other_payload = encoded(h["a"], random_delta(3, h.init))
    code = rpc_code(lambda: h["a"].push(other_head, other_payload))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    # Another site cannot see, resume or claim a's upload.
    assert rpc_code(lambda: h["b"].offset(head.upload_id)) is grpc.StatusCode.PERMISSION_DENIED
    stolen, stolen_payload = encoded(h["b"], db, upload_id=head.upload_id)
    assert rpc_code(lambda: h["b"].push(stolen, stolen_payload)) is grpc.StatusCode.PERMISSION_DENIED

    status = h.admin.round(1)
    assert status.state == federation_pb2.ROUND_STATE_COLLECTING
    assert [p.site_id for p in status.participants if p.accepted] == ["a"]
    assert status.bytes_in == len(payload)
    assert h.agg.coordinator.state.acc is not None and h.agg.coordinator.state.acc.accepted == [
        head.upload_id
    ]

    head_b, payload_b = encoded(h["b"], db)
    accepted(h["b"].push(head_b, payload_b, chunk_bytes=CHUNK), head_b, payload_b)
    state = final_state(h)
    assert_same_bits(state, add(h.init, h.mean([(da, 10), (db, 30)])))
    status = h.admin.round(1)
    assert (status.samples, status.bytes_in) == (40, len(payload) + len(payload_b))
    # Still a duplicate after the round is over: the acceptance is durable.
    assert h["a"].push(head, payload).duplicate
    assert h.admin.round(1).samples == 40


# ---------------------------------------------------------------- cut streams


def _reference(tmp_path: Path, deltas: dict[str, State]) -> State:
    """The state an uninterrupted run publishes for b's then a's upload."""
    h = Harness(tmp_path / "reference", {"a": 10, "b": 30}, init=WIDE)
    try:
        h.join_all()
        for name in ("b", "a"):
            head, payload = encoded(h[name], deltas[name])
            accepted(h[name].push(head, payload, chunk_bytes=CHUNK), head, payload)
        return final_state(h)
    finally:
        h.close()


@pytest.fixture(scope="module")
def cut_deltas() -> dict[str, State]:
    return {"a": random_delta(11, WIDE), "b": random_delta(12, WIDE)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cut_deltas: dict[str, State]) -> State:
    return _reference(tmp_path_factory.mktemp("ref"), cut_deltas)


@pytest.mark.parametrize("how", ["stream-ends", "generator-raises", "client-cancels", "restart-at-0"])
def test_cut_upload_resumes_to_the_same_state(
    harness: MakeHarness, how: str, cut_deltas: dict[str, State], reference: State
) -> None:
    h = harness({"a": 10, "b": 30})
    h.join_all()
    head_b, payload_b = encoded(h["b"], cut_deltas["b"])
    accepted(h["b"].push(head_b, payload_b, chunk_bytes=CHUNK), head_b, payload_b)

    site = h["a"]
    head, payload = encoded(site, cut_deltas["a"])
    chunks = messages(site, head, payload)
    cut = len(chunks) * 3 // 5 + 1  # a few shards in, and mid-shard
    sent = sum(len(c.data) for c in chunks[:cut])
    assert 0 < sent < len(payload)

    if how in ("stream-ends", "restart-at-0"):
        # The stream ends without its last chunk: ABORTED, and what arrived is committed.
        assert rpc_code(lambda: site.push_messages(iter(chunks[:cut]))) is grpc.StatusCode.ABORTED
        assert site.offset(head.upload_id).committed_offset == sent
    elif how == "generator-raises":

        def failing() -> Iterator[delta_pb2.DeltaChunk]:
            yield from chunks[:cut]
            received(h, head.upload_id, sent)  # so the cut lands where the test says
            raise RuntimeError("the worker's disk went away")

        assert rpc_code(lambda: site.push_messages(failing())) is not grpc.StatusCode.OK
        # The server notices the cancelled call and commits what it received.
        wait_for(lambda: site.offset(head.upload_id).committed_offset == sent, what="the commit at the cut")
    else:
        release = threading.Event()

        def paused() -> Iterator[delta_pb2.DeltaChunk]:
            yield from chunks[:cut]
            release.wait(30)

        future = site.stub.PushDelta.future(paused(), metadata=site.metadata, timeout=60)
        received(h, head.upload_id, sent)
        future.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=10)
        wait_for(lambda: site.offset(head.upload_id).committed_offset == sent, what="the commit at the cut")

    # Some shards were folded before the cut; a resume must not count them again.
    wait_for(lambda: folded(h, head.upload_id), what="a shard of the cut upload to fold")
    reply = site.offset(head.upload_id)
    assert not reply.complete and 0 < reply.committed_offset <= sent
    start = 0 if how == "restart-at-0" else reply.committed_offset
    assert h.admin.round(1).state == federation_pb2.ROUND_STATE_COLLECTING
    accepted(site.push(head, payload, start=start, chunk_bytes=CHUNK), head, payload)
    assert site.offset(head.upload_id).complete

    state = final_state(h)
    assert_same_bits(state, reference)
    assert_same_bits(state, add(h.init, h.mean([(cut_deltas["b"], 30), (cut_deltas["a"], 10)])))
    status = h.admin.round(1)
    assert (status.samples, status.bytes_in) == (40, len(payload) + len(payload_b))


def test_resume_must_match_the_upload(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    h.join_all()
    site = h["a"]
    delta = random_delta(21, h.init)
    head, payload = encoded(site, delta)
    chunks = messages(site, head, payload)
    assert rpc_code(lambda: site.push_messages(iter(chunks[:10]))) is grpc.StatusCode.ABORTED
    committed = site.offset(head.upload_id).committed_offset
    assert committed == sum(len(c.data) for c in chunks[:10])
    # Neither 0 nor the committed offset: a gap or a repeat.
    for start in (committed - CHUNK, committed + CHUNK):
        resume = functools.partial(site.push, head, payload, start=start, chunk_bytes=CHUNK)
        assert rpc_code(resume) is grpc.StatusCode.FAILED_PRECONDITION
    # The same upload id with another header.
    other, other_payload = encoded(site, delta, upload_id=head.upload_id, samples=11)
    assert rpc_code(lambda: site.push(other, other_payload)) is grpc.StatusCode.INVALID_ARGUMENT
    # An unknown upload is at offset 0.
    assert site.offset("never-sent").committed_offset == 0
    assert rpc_code(lambda: site.offset("bad id!")) is grpc.StatusCode.INVALID_ARGUMENT
    assert site.offset(head.upload_id).committed_offset == committed

    # The same header with another payload (a header no longer names its bytes): restarted at 0
    # under the id of an upload whose first shards were folded, it is refused for good at its
    # first shard whose digest differs from the one folded, and its folds are rebuilt away.
    x_head, x_payload = encoded(site, random_delta(23, h.init))
    x_chunks = messages(site, x_head, x_payload)
    assert rpc_code(lambda: site.push_messages(iter(x_chunks[:10]))) is grpc.StatusCode.ABORTED
    wait_for(lambda: folded(h, x_head.upload_id), what="a shard of the cut upload to fold")
    _, swapped = encoded(site, random_delta(24, h.init), upload_id=x_head.upload_id)
    exc = refusal(lambda: site.push(x_head, swapped, chunk_bytes=CHUNK))
    assert (exc.code(), reason_of(exc)) == (grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_ID_REUSED"), (
        exc.details()
    )
    assert (
        rpc_code(lambda: site.push(x_head, x_payload, chunk_bytes=CHUNK))
        is grpc.StatusCode.FAILED_PRECONDITION
    )

    accepted(site.push(head, payload, start=committed, chunk_bytes=CHUNK), head, payload)
    assert_same_bits(final_state(h), add(h.init, h.mean([(delta, 10)])))


def test_large_upload_commits_at_a_shard_end_past_8_mib_and_resumes(harness: MakeHarness) -> None:
    gen = torch.Generator().manual_seed(30)
    init = {
        "big.a": torch.randn(2_500_000, generator=gen) * 0.02,
        "big.b": torch.randn(1000, 1000, generator=gen),
    }
    h = harness({"a": 10}, init=init)
    h.join_all()
    site = h["a"]
    delta = random_delta(31, init)
    head, payload = site.header(delta, round=1, base=0, shard_bytes=4 * MIB)
    assert len(payload) > 10 * MIB and len(payload.layout.shards) >= 3
    chunks = list(site.chunks(head, payload, chunk_bytes=MIB))
    # The first commit lands where the first shard at or past 8 MiB ends (chunks are cut there),
    # not at the first chunk past 8 MiB: the shard's spec is made durable with its bytes.
    ends = [c.offset + len(c.data) for c in chunks]
    shard_ends = payload.layout.shard_offsets()[1:]
    commit = next(i for i, end in enumerate(ends) if end >= 8 * MIB and end in shard_ends)
    assert ends[commit] > next(end for end in ends if end >= 8 * MIB)  # the rule is seen to differ
    release = threading.Event()

    def paused() -> Iterator[delta_pb2.DeltaChunk]:
        yield from chunks[: commit + 2]
        release.wait(60)  # then the stream ends without its last chunk

    future = site.stub.PushDelta.future(paused(), metadata=site.metadata, timeout=120)
    # Mid-stream, the committed offset moves to that shard end (fsync, then record).
    wait_for(
        lambda: site.offset(head.upload_id).committed_offset == ends[commit],
        timeout=30,
        what="the commit at a shard end",
    )
    release.set()
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=30)
    assert info.value.code() is grpc.StatusCode.ABORTED
    assert site.offset(head.upload_id).committed_offset == ends[commit + 1]  # the break commits the rest
    receipt = site.push(head, payload, start=ends[commit + 1], chunk_bytes=MIB)
    accepted(receipt, head, payload)
    status = h.admin.wait_round(1, timeout=60)
    assert status.state == PUBLISHED and status.bytes_in == len(payload)
    _, state = site.snapshot()
    assert_same_bits(state, add(init, h.mean([(delta, 10)])))


# ---------------------------------------------------------------- bad input


def _chunk(head: DeltaHeader | None, offset: int, data: bytes, last: bool) -> delta_pb2.DeltaChunk:
    return chunk_to_proto(make_chunk(offset, data, last, head))


def _tampered(chunks: list[delta_pb2.DeltaChunk], index: int, **changes: Any) -> list[delta_pb2.DeltaChunk]:
    out = [delta_pb2.DeltaChunk.FromString(c.SerializeToString()) for c in chunks]
    for key, value in changes.items():
        setattr(out[index], key, value)
    return out


def test_bad_uploads_are_refused_and_change_nothing(
    harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness({"a": 10, "b": 30, "c": 5})
    a, b = h["a"], h["b"]
    a.join()
    b.join()
    a.start_beating()
    b.start_beating()
    da, db = random_delta(41, h.init), random_delta(42, h.init)
    good_head, good_payload = encoded(a, da)
    good = messages(a, good_head, good_payload)
    assert len(good) > 20
    INVALID, FAILED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION

    def fresh(**kw: Any) -> tuple[DeltaHeader, Payload]:
        return encoded(a, kw.pop("delta", da), **kw)

    def push(head: DeltaHeader, payload: bytes, site: ScriptedSite = a) -> grpc.StatusCode:
        return rpc_code(lambda: site.push(head, payload, chunk_bytes=CHUNK))

    # Credentials.
    assert rpc_code(lambda: a.stub.PushDelta(iter(good), timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
    with ScriptedSite(h.agg.target, "a", token="not-a-token") as stranger:
        assert rpc_code(lambda: stranger.push_messages(iter(good))) is grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stranger.join) is grpc.StatusCode.UNAUTHENTICATED
    as_b, as_b_payload = encoded(b, db)
    assert push(as_b, as_b_payload, site=a) is grpc.StatusCode.PERMISSION_DENIED  # a pushing as b
    with AdminClient(h.agg.target, token_of("a")) as site_admin:
        assert rpc_code(site_admin.status) is grpc.StatusCode.PERMISSION_DENIED
    with ScriptedSite(h.agg.target, "a", token="admin-secret") as admin_as_site:
        assert rpc_code(admin_as_site.join) is grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: a.stub.Heartbeat(
        federation_pb2.HeartbeatRequest(site_id="b"), metadata=a.metadata, timeout=10
    )) is grpc.StatusCode.PERMISSION_DENIED  # fmt: skip
    assert rpc_code(lambda: a.stub.Heartbeat(
        federation_pb2.HeartbeatRequest(site_id="a", loss=float("nan")), metadata=a.metadata, timeout=10
    )) is INVALID  # fmt: skip

    # Wrong round, base round, run; a site that never joined.
    assert push(*fresh(round=2)) is FAILED
    assert push(*fresh(base=1)) is FAILED
    wrong_run, wrong_run_payload = fresh()
    assert push(dataclasses.replace(wrong_run, run_id="another-run"), wrong_run_payload) is FAILED
    c_head, c_payload = encoded(h["c"], random_delta(43, h.init))
    assert push(c_head, c_payload, site=h["c"]) is FAILED

    # Header fields.
    head, payload = fresh(samples=0)
    assert push(head, payload) is INVALID
    head, payload = fresh()
    assert push(dataclasses.replace(head, kind=DeltaKind.SNAPSHOT), payload) is INVALID
    assert push(dataclasses.replace(head, upload_id="no spaces/allowed"), payload) is INVALID

    # Manifest: a tensor missing, one of another shape, one extra, or fp16 instead of fp32.
    missing = {k: v for k, v in da.items() if k != "layers.1.q.weight"}
    reshaped = dict(da, **{"embed.weight": da["embed.weight"].reshape(-1)})
    extra = dict(da, **{"extra.bias": torch.zeros(4)})
    half = {k: v.half() for k, v in da.items()}
    for tensors in (missing, reshaped, extra, half):
        head, payload = a.header(tensors, round=1, base=0, shard_bytes=SHARD)
        assert push(head, payload) is INVALID

    # The stream itself: empty, headerless, a gap, a damaged chunk, an oversized chunk.
    assert rpc_code(lambda: a.push_messages(iter([]))) is INVALID
    assert rpc_code(lambda: a.push_messages(iter(good[1:]))) is INVALID
    head, payload = fresh()
    stream = messages(a, head, payload)
    assert rpc_code(lambda: a.push_messages(iter(stream[:5] + stream[6:]))) is INVALID
    head, payload = fresh()
    stream = messages(a, head, payload)
    late = len(stream) * 3 // 4  # after several shards have folded
    damaged = _tampered(stream, late, crc32=stream[late].crc32 ^ 1)
    assert rpc_code(lambda: a.push_messages(iter(damaged))) is grpc.StatusCode.DATA_LOSS
    head, payload = fresh()
    big = [_chunk(head, 0, bytes(MIB + 1), False)]
    assert rpc_code(lambda: a.push_messages(iter(big))) is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Damaged bytes with valid chunk CRCs: the shard digest catches them, after earlier shards folded.
    head, payload = fresh()
    flipped = Payload(flip(payload, frame_offsets(payload.layout)[-1][1] + 20, 0x10), payload.layout)
    assert push(head, flipped) is grpc.StatusCode.DATA_LOSS
    # NaN in the last shard: refused after the shards before it were folded into the sum.
    nan_head, nan_payload = with_nan(*fresh())
    assert push(nan_head, nan_payload) is INVALID
    assert folded(h, nan_head.upload_id)  # it did get into the running sum
    # A refused upload stays refused; its id cannot be reused.
    assert rpc_code(lambda: a.push(nan_head, nan_payload)) is FAILED

    # Nothing above counted: round 1 is still open with nothing accepted, the state is round 0's.
    status = h.admin.round(1)
    assert status.state in (federation_pb2.ROUND_STATE_OPEN, federation_pb2.ROUND_STATE_COLLECTING)
    assert (status.samples, status.bytes_in) == (0, 0)
    assert not any(p.accepted for p in status.participants)
    run = h.admin.status()
    assert (run.current_round, run.paused, run.sites_known) == (1, False, 2)
    number, state = a.snapshot()
    assert number == 0
    assert_same_bits(state, h.init)

    # The same run without the bad attempts: a's and b's good uploads.
    caplog.set_level(logging.INFO, logger="server")
    accepted(a.push(good_head, good_payload, chunk_bytes=CHUNK), good_head, good_payload)
    head_b, payload_b = encoded(b, db)
    accepted(b.push(head_b, payload_b, chunk_bytes=CHUNK), head_b, payload_b)
    state = final_state(h)
    assert_same_bits(state, add(h.init, h.mean([(da, 10), (db, 30)])))
    status = h.admin.round(1)
    assert (status.samples, status.bytes_in) == (40, len(good_payload) + len(payload_b))
    # The refused uploads had folded shards: the sum was rebuilt from the accepted spools.
    assert any("rebuilding the sum" in r.getMessage() for r in caplog.records)


def test_upload_over_the_size_limit_is_refused(harness: MakeHarness) -> None:
    h = harness({"a": 10}, max_upload_bytes=64 * 1024)
    h.join_all()
    assert h["a"].join().max_upload_bytes == 64 * 1024
    head, payload = encoded(h["a"], random_delta(45, h.init))
    assert len(payload) > 64 * 1024
    assert rpc_code(lambda: h["a"].push(head, payload)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    # A delta that compresses under the limit goes through.
    small = partial_delta(46, h.init, ["layers.0.norm.weight"])
    head, payload = encoded(h["a"], small)
    assert len(payload) < 64 * 1024
    accepted(h["a"].push(head, payload, chunk_bytes=CHUNK), head, payload)
    assert_same_bits(final_state(h), add(h.init, h.mean([(small, 10)])))


def test_the_digest_is_the_senders_choice_but_must_be_named(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 30})
    h.join_all()
    da, db = random_delta(47, h.init), random_delta(48, h.init)
    head, payload = encoded(h["a"], da, codec=Codec(digest=Digest.SHA256))
    codec = dataclasses.replace(head.spec.codec, digest=Digest.UNSPECIFIED)  # a sender that names none
    unnamed = dataclasses.replace(head, spec=dataclasses.replace(head.spec, codec=codec))
    exc = refusal(lambda: h["a"].push(unnamed, payload, chunk_bytes=CHUNK))
    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT and "codec.digest" in (exc.details() or "")
    # SHA-256 and BLAKE3 (the default) in one round: the round's codec fixes the values, not the hash.
    accepted(h["a"].push(head, payload, chunk_bytes=CHUNK), head, payload)
    head_b, payload_b = encoded(h["b"], db)
    assert head_b.spec.codec.digest is Digest.BLAKE3
    accepted(h["b"].push(head_b, payload_b, chunk_bytes=CHUNK), head_b, payload_b)
    assert_same_bits(final_state(h), add(h.init, h.mean([(da, 10), (db, 30)])))


@pytest.mark.parametrize("fate", ["rejected", "abandoned"])
def test_partial_upload_that_folded_shards_is_left_out(
    harness: MakeHarness, fate: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server")
    h = harness({"a": 10, "b": 30})
    h.join_all()
    a = h["a"]
    da, db, junk = random_delta(51, h.init), random_delta(52, h.init), random_delta(53, h.init, scale=1.0)
    head, payload = encoded(a, junk)
    if fate == "rejected":
        head, payload = with_nan(head, payload)
        assert rpc_code(lambda: a.push(head, payload, chunk_bytes=CHUNK)) is grpc.StatusCode.INVALID_ARGUMENT
    else:  # cut off and never resumed
        chunks = messages(a, head, payload)
        assert rpc_code(lambda: a.push_messages(iter(chunks[:-3]))) is grpc.StatusCode.ABORTED
    wait_for(lambda: len(folded(h, head.upload_id)) >= 5, what="the partial upload's shards to fold")

    good_head, good_payload = encoded(a, da)
    accepted(a.push(good_head, good_payload, chunk_bytes=CHUNK), good_head, good_payload)
    head_b, payload_b = encoded(h["b"], db)
    accepted(h["b"].push(head_b, payload_b, chunk_bytes=CHUNK), head_b, payload_b)
    state = final_state(h)
    assert_same_bits(state, add(h.init, h.mean([(da, 10), (db, 30)])))
    assert any("rebuilding the sum" in r.getMessage() for r in caplog.records)
    assert h.admin.round(1).samples == 40


# ---------------------------------------------------------------- concurrent uploads


def test_concurrent_uploads_fold_within_the_order_bound(harness: MakeHarness) -> None:
    samples = {"a": 3, "b": 50, "c": 7, "d": 1000}
    h = harness(samples)
    h.join_all()
    # Dense in two tensors only, so that FetchDiff(0) streams the difference itself.
    touched = ["embed.weight", "layers.0.q.weight"]
    deltas = {s: partial_delta(61 + i, h.init, touched, scale=10.0 ** (i - 3)) for i, s in enumerate(samples)}
    uploads = {s: encoded(h[s], deltas[s]) for s in samples}
    barrier = threading.Barrier(len(samples))
    receipts: dict[str, federation_pb2.PushReceipt] = {}

    def upload(s: str) -> None:
        barrier.wait()
        receipts[s] = h[s].push(*uploads[s], chunk_bytes=CHUNK)

    threads = [threading.Thread(target=upload, args=(s,)) for s in samples]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in samples:
        accepted(receipts[s], *uploads[s])

    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED and status.samples == sum(samples.values())
    [(head, diff)] = h["a"].fetch(have=0)
    assert head.kind is DeltaKind.DIFF
    # The shards of four uploads were folded interleaved, in an order the test does not know:
    # each element is within WeightedSum's reordering bound of the mean in any fixed order.
    want = h.mean([(deltas[s], n) for s, n in samples.items()])
    k, w = len(samples), float(sum(samples.values()))
    unit = 2.0**-24 if accumulator_dtype(h.agg.config) is torch.float32 else 2.0**-52 * (1 + 2.0**-20)
    for name in want:
        mass = sum(n * deltas[s][name].double().abs() for s, n in samples.items())
        top = torch.maximum(diff[name].abs(), want[name].abs()).double()
        bound = k * unit * mass / w + 2 * torch.finfo(torch.float32).eps * top + 1e-45
        err = (diff[name].double() - want[name].double()).abs()
        assert bool((err <= bound).all()), f"{name}: worst excess {float((err - bound).max())}"
    for name in set(want) - set(touched):
        assert not diff[name].any()
