"""Machine-readable refusals against a real aggregator: each status carries a google.rpc.ErrorInfo
(reason, metadata) and, where a wait helps, a RetryInfo; clients branch on them (reason_of,
is_round_over, common.retry). And the catalog: every reason raised anywhere is listed in
common.errors.CATALOG with the code it is raised with, and in docs/protocol.md's Errors table."""

from __future__ import annotations

import ast
import logging
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import common.errors as errors
from bench.reliability.disk import mount_tmpfs
from client import exits
from client.heartbeat import Status
from common.delta import Cast, Codec, DeltaHeader
from common.errors import (
    CATALOG,
    REASON_DOMAIN,
    GdfedError,
    is_round_over,
    metadata_of,
    reason_of,
    retry_delay_of,
    status_of,
)
from common.pb.gradualdiff.v1 import admin_pb2, delta_pb2, federation_pb2
from common.retry import Retrier, RetryPolicy
from server.config import ConfigError, RoundPolicy
from server.fair_share import RETRY_HINT_S
from tests.codec_helpers import flip, frame_offsets
from tests.scripted import (
    ROOT,
    MakeHarness,
    Payload,
    ScriptedSite,
    State,
    harnesses,
    random_delta,
    refusal,
    small_state,
    wait_for,
)

CHUNK = 1024


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def _reason(exc: grpc.RpcError, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    """Assert the call failed with ``code`` and ``reason`` in our domain; its ErrorInfo metadata."""
    assert status_of(exc) is code, (status_of(exc), exc.details())
    assert reason_of(exc) == reason, (reason_of(exc), exc.details())
    assert CATALOG[reason].code is code
    return metadata_of(exc)


def _upload(
    site: ScriptedSite, seed: int, init: State, codec: Codec | None = None
) -> tuple[DeltaHeader, Payload, list[delta_pb2.DeltaChunk]]:
    """A small upload for round 1 in 8 KiB shards, and its stream in 1 KiB chunks."""
    head, payload = site.header(random_delta(seed, init), round=1, base=0, shard_bytes=8 * 1024, codec=codec)
    return head, payload, list(site.chunks(head, payload, chunk_bytes=CHUNK))


# --- ABORTED: resume, or the round is over ---------------------------------------------------------


def test_a_cut_stream_says_where_to_resume_and_resuming_there_is_accepted(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    h.join_all()
    a = h["a"]
    head, payload, chunks = _upload(a, 1, h.init)
    cut = len(chunks) // 2
    exc = refusal(lambda: a.push_messages(iter(chunks[:cut])))
    meta = _reason(exc, grpc.StatusCode.ABORTED, "RESUME_AT_OFFSET")
    assert not is_round_over(exc)  # the same code as a closed round, told apart by the reason
    offset = int(meta["offset"])
    assert offset == a.offset(head.upload_id).committed_offset == sum(len(c.data) for c in chunks[:cut])
    receipt = a.push(head, payload, start=offset, chunk_bytes=CHUNK)
    assert receipt.accepted and not receipt.duplicate


def test_a_damaged_chunk_says_where_to_resend_from(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    h.join_all()
    a = h["a"]
    head, payload, chunks = _upload(a, 2, h.init)
    bad = len(chunks) // 2
    damaged = delta_pb2.DeltaChunk()
    damaged.CopyFrom(chunks[bad])
    damaged.crc32 ^= 1
    exc = refusal(lambda: a.push_messages(iter([*chunks[:bad], damaged])))
    meta = _reason(exc, grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert meta["field"] == "crc32"
    offset = int(meta["offset"])
    assert offset == damaged.offset == a.offset(head.upload_id).committed_offset  # all before it was good
    assert a.push(head, payload, start=offset, chunk_bytes=CHUNK).accepted


def test_damaged_content_under_good_chunk_checksums_is_rejected_without_an_offset(
    harness: MakeHarness,
) -> None:
    h = harness({"a": 10})
    h.join_all()
    a = h["a"]
    head, payload, _ = _upload(a, 8, h.init)
    flipped = Payload(
        flip(payload, frame_offsets(payload.layout)[-1][1] + 20, 0x10), payload.layout
    )  # CRCs match
    exc = refusal(lambda: a.push(head, flipped, chunk_bytes=CHUNK))
    meta = _reason(exc, grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert "offset" not in meta, meta  # the upload is rejected: nothing to resume
    again = refusal(lambda: a.push(head, payload, chunk_bytes=CHUNK))
    _reason(again, grpc.StatusCode.FAILED_PRECONDITION, "UPLOAD_ID_SPENT")


def test_a_resume_at_another_offset_names_the_committed_one(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    h.join_all()
    a = h["a"]
    head, payload, chunks = _upload(a, 3, h.init)
    assert len(chunks) > 8
    refusal(lambda: a.push_messages(iter(chunks[:4])))
    committed = a.offset(head.upload_id).committed_offset
    exc = refusal(lambda: a.push(head, payload, start=committed + CHUNK, chunk_bytes=CHUNK))
    meta = _reason(exc, grpc.StatusCode.FAILED_PRECONDITION, "WRONG_OFFSET")
    assert (meta["offset"], meta["field"]) == (str(committed), "offset")


def test_an_upload_stopped_by_an_eviction_is_cancelled_not_round_over(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 10})
    h.join_all()
    a = h["a"]
    head, _, chunks = _upload(a, 9, h.init)
    half = len(chunks) // 2
    release = threading.Event()

    def paused() -> Iterator[delta_pb2.DeltaChunk]:
        yield from chunks[:half]
        release.wait(30)
        yield from chunks[half:]

    future = a.stub.PushDelta.future(paused(), metadata=a.metadata, timeout=60)
    try:
        sent = sum(len(c.data) for c in chunks[:half])
        session = wait_for(lambda: h.agg.coordinator.intake.session(head.upload_id), what="the session")
        wait_for(lambda: session.bytes_received == sent, what="the first half to arrive")
        h.admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="a"), metadata=h.admin.metadata, timeout=10)
    finally:
        release.set()
    exc = future.exception(timeout=30)
    assert isinstance(exc, grpc.RpcError)
    meta = _reason(exc, grpc.StatusCode.ABORTED, "UPLOAD_CANCELLED")
    assert not is_round_over(exc) and meta["offset"] == str(sent)  # a worker would resume, and then:
    _reason(refusal(lambda: a.offset(head.upload_id)), grpc.StatusCode.PERMISSION_DENIED, "SITE_EVICTED")


def test_a_closed_round_is_round_closed_with_its_number(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 10}, rounds=1, round=RoundPolicy(min_sites=1))
    h.join_all()
    late, late_payload, _ = _upload(h["a"], 4, h.init)
    head_b, payload_b, _ = _upload(h["b"], 5, h.init)
    assert h["b"].push(head_b, payload_b).accepted  # the quorum: round 1 closes
    assert h.admin.wait_round(1).state == federation_pb2.ROUND_STATE_PUBLISHED
    exc = refusal(lambda: h["a"].push(late, late_payload))
    meta = _reason(exc, grpc.StatusCode.ABORTED, "ROUND_CLOSED")
    assert meta["round"] == "1" and is_round_over(exc)


# --- INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION -----------------------------------------


def test_an_upload_in_another_codec_than_the_rounds_is_codec_mismatch(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    h.join_all()
    head, payload, _ = _upload(h["a"], 6, h.init, codec=Codec(cast=Cast.BF16))
    exc = refusal(lambda: h["a"].push(head, payload))
    meta = _reason(exc, grpc.StatusCode.INVALID_ARGUMENT, "CODEC_MISMATCH")
    assert meta == {"field": "codec.cast", "expected": "none", "got": "bf16"}, meta
    assert "offset" not in meta  # refused at the header: nothing to resume


def test_an_evicted_site_and_another_sites_id_are_told_apart(
    harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness({"a": 10, "b": 10})
    h.join_all()
    a = h["a"]
    claim = federation_pb2.AwaitRoundRequest(site_id="b", after_round=0, wait_ms=0)
    exc = refusal(lambda: a.stub.AwaitRound(claim, metadata=a.metadata, timeout=10))
    meta = _reason(exc, grpc.StatusCode.PERMISSION_DENIED, "SITE_ID_MISMATCH")
    assert (meta["expected"], meta["got"], meta["field"]) == ("a", "b", "site_id")
    h.admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="a"), metadata=h.admin.metadata, timeout=10)
    a.stop_beating()
    for call in (lambda: a.fetch(have=0, snapshot=True), lambda: a.await_round(after=0, wait_ms=0), a.join):
        _reason(refusal(call), grpc.StatusCode.PERMISSION_DENIED, "SITE_EVICTED")
    # A worker that meets it (before its heartbeat said STOP) exits as evicted, not merely refused.
    with caplog.at_level(logging.ERROR, logger="client.worker"):
        code = exits.gave_up(refusal(a.join), Status(), site_id="a", aggregator="agg", max_wait_s=60)
    assert code == exits.FAILED and "site a was evicted from the run" in caplog.records[-1].getMessage()


def test_credentials_and_joining_have_their_own_reasons(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    stranger = ScriptedSite(h.agg.target, "a", token="nobody's")
    try:
        _reason(refusal(stranger.join), grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_TOKEN")
    finally:
        stranger.close()
    bare = refusal(lambda: h["a"].stub.Join(federation_pb2.JoinRequest(site_id="a"), timeout=10))
    _reason(bare, grpc.StatusCode.UNAUTHENTICATED, "NO_TOKEN")
    _reason(refusal(lambda: h["a"].fetch(have=0)), grpc.StatusCode.FAILED_PRECONDITION, "NOT_JOINED")
    h["a"].join()
    meta = _reason(
        refusal(lambda: h["a"].fetch(have=7)), grpc.StatusCode.FAILED_PRECONDITION, "ROUND_NOT_PUBLISHED"
    )
    assert meta["latest_round"] == "0"


def test_a_message_beyond_ascii_keeps_its_details(harness: MakeHarness) -> None:
    # The fingerprint refusal's message holds "…": the details must still match the call's message.
    h = harness({"a": 10}, base_model_fingerprint="f" * 64)
    a = h["a"]
    request = federation_pb2.JoinRequest(site_id="a", base_model_fingerprint="e" * 64)
    exc = refusal(lambda: a.stub.Join(request, metadata=a.metadata, timeout=10))
    assert "…" in (exc.details() or "")
    meta = _reason(exc, grpc.StatusCode.FAILED_PRECONDITION, "FINGERPRINT_MISMATCH")
    assert meta == {"field": "base_model_fingerprint"}


def test_an_upload_over_the_size_limit_is_refused_at_once_by_the_retrier(
    harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness({"a": 10}, max_upload_bytes=8 * 1024)
    h.join_all()
    head, payload, _ = _upload(h["a"], 7, h.init)
    assert len(payload) > 8 * 1024
    tries = [0]

    def push() -> object:
        tries[0] += 1
        return h["a"].push(head, payload)

    waits: list[float] = []
    with pytest.raises(grpc.RpcError) as caught:
        Retrier(RetryPolicy(max_elapsed=60), sleep=waits.append).call("upload", push)
    meta = _reason(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    assert meta["limit"] == str(8 * 1024) and retry_delay_of(caught.value) is None
    assert (tries[0], waits) == (1, [])  # no retry makes it smaller
    with caplog.at_level(logging.ERROR, logger="client.worker"):
        exits.gave_up(caught.value, Status(), site_id="a", aggregator="agg", max_wait_s=60)
    assert "over a limit of the aggregator at agg (UPLOAD_TOO_LARGE" in caplog.records[-1].getMessage()


# --- RESOURCE_EXHAUSTED with RetryInfo: the retrier waits as told, then gets through --------------------


def test_a_site_over_its_share_gets_site_busy_with_a_retry_delay_that_the_retrier_honours(
    harness: MakeHarness,
) -> None:
    h = harness({"a": 10}, max_polls_per_site=1)
    h.join_all()
    a = h["a"]

    def hold() -> grpc.Future[federation_pb2.RoundSpec]:
        return a.stub.AwaitRound.future(
            federation_pb2.AwaitRoundRequest(site_id="a", after_round=99, wait_ms=30_000),
            metadata=a.metadata,
            timeout=40,
        )

    held = hold()

    def second_poll_refused() -> grpc.RpcError | None:
        nonlocal held
        if held.done():  # the held poll came while a probe held the slot, and was refused itself
            held = hold()
            return None
        return _busy(a)

    try:
        exc = wait_for(second_poll_refused, timeout=10, what="a's second poll refused")
        meta = _reason(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, "SITE_BUSY")
        assert (meta["limit"], meta["field"]) == ("1", "site_id")
        assert retry_delay_of(exc) == RETRY_HINT_S == CATALOG["SITE_BUSY"].retry_s

        waits: list[float] = []

        def sleep(seconds: float) -> None:  # the wait the retrier chose; the held poll ends meanwhile
            waits.append(seconds)
            held.cancel()
            wait_for(lambda: _busy(a) is None, what="the held poll's slot to free")

        view = Retrier(RetryPolicy(max_elapsed=600), sleep=sleep, rng=random.Random(1)).call(
            "poll", lambda: a.await_round(after=99, wait_ms=0)
        )
        assert view.round == 1
        assert len(waits) == 1 and RETRY_HINT_S <= waits[0] <= 1.25 * RETRY_HINT_S, waits
    finally:
        held.cancel()


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux's")
def test_a_full_disk_is_disk_full_with_a_retry_delay_and_the_offset_to_resume_from(
    harness: MakeHarness, tmp_path: Path
) -> None:
    spool = tmp_path / "run0" / "state" / "spool"
    spool.mkdir(parents=True)
    if not mount_tmpfs(spool, "64k"):
        pytest.skip("this machine does not allow tmpfs mounts (needs root or CAP_SYS_ADMIN)")
    try:
        h = harness({"a": 10}, init=small_state(seed=3, width=128))  # 155 KiB: more than the disk
        h.join_all()
        head, payload = h["a"].header(random_delta(5, h.init), round=1, base=0, shard_bytes=16 * 1024)
        exc = refusal(lambda: h["a"].push(head, payload, chunk_bytes=8 * 1024))
        meta = _reason(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL")
        assert retry_delay_of(exc) == CATALOG["DISK_FULL"].retry_s == 30
        offset = int(meta["offset"])
        assert offset == h["a"].offset(head.upload_id).committed_offset < len(payload)
        subprocess.run(["mount", "-o", "remount,size=8m", str(spool)], check=True, timeout=10)
        assert h["a"].push(head, payload, start=offset, chunk_bytes=8 * 1024).accepted
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, timeout=10, check=False)


def _busy(site: ScriptedSite) -> grpc.RpcError | None:
    try:
        site.await_round(after=99, wait_ms=0)
    except grpc.RpcError as exc:
        return exc
    return None


# --- the catalog --------------------------------------------------------------------------------------


def _error_classes() -> dict[str, type[GdfedError]]:
    classes = {
        c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, GdfedError)
    }
    return classes | {"ConfigError": ConfigError}


def test_every_class_default_is_in_the_catalog_with_its_code() -> None:
    for name, cls in _error_classes().items():
        assert cls.reason in CATALOG, name
        assert CATALOG[cls.reason].code is cls.code, (name, cls.reason)


def _raised_reasons() -> list[tuple[str, str, str]]:
    """(where, error class, reason) for every ``SomeError(..., reason="X")`` in common/, server/, client/."""
    found = []
    for package in ("common", "server", "client"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "/pb/" in path.as_posix():
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                for kw in node.keywords:
                    if kw.arg == "reason" and isinstance(kw.value, ast.Constant) and name in _error_classes():
                        found.append((f"{path.relative_to(ROOT)}:{node.lineno}", name, str(kw.value.value)))
    return found


def test_every_reason_raised_is_in_the_catalog_with_the_code_it_is_raised_with() -> None:
    raised = _raised_reasons()
    assert len(raised) >= 25, raised  # the walk finds the raise sites (a broken walk would pass)
    classes = _error_classes()
    for where, cls, reason in raised:
        assert reason in CATALOG, f"{where}: {reason} is not in common.errors.CATALOG"
        assert CATALOG[reason].code is classes[cls].code, f"{where}: {reason} raised as {cls}"
    named = {r for _, _, r in raised} | {c.reason for c in classes.values()}
    # Sent by server.servicers / server.error_status without an exception class.
    named |= {"STORE_UNAVAILABLE", "INTERNAL"}
    assert named == set(CATALOG), f"listed but never raised: {set(CATALOG) - named}"
    for entry in CATALOG.values():
        assert entry.retry_s is None or entry.retryable


def test_the_protocol_doc_lists_every_reason_with_its_code() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## Errors") :]
    section = section[: m.start()] if (m := re.search(r"\n## (?!Errors)", section)) else section
    assert REASON_DOMAIN in section
    for reason, entry in CATALOG.items():
        retry = (
            f"RetryInfo {entry.retry_s:g} s"
            if entry.retry_s is not None
            else "yes"
            if entry.retryable
            else "no"
        )
        row = re.search(
            rf"^\| {entry.code.name} \| `{reason}` \|.*\| {re.escape(retry)} \|$", section, re.MULTILINE
        )
        assert row, f"docs/protocol.md ## Errors: no row `| {entry.code.name} | {reason} | ... | {retry} |`"


def test_is_round_over_falls_back_to_the_code_without_details() -> None:
    class Bare(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.ABORTED

        def details(self) -> str:
            return ""

    assert is_round_over(Bare()) and reason_of(Bare()) == "" and retry_delay_of(Bare()) is None
    assert metadata_of(Bare()) == {}
