"""A round never drops accepted uploads: publication failures, restarts, retry-round, a full disk.

Publication is broken the way an operator's machine breaks it: the state's
``tmp/`` (where every blob is written first) replaced by a file, so opening a
blob there fails (root ignores permission bits, so chmod would not do). A full
disk is a small tmpfs mounted over the spool, where the machine allows mounts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.reliability.disk import mount_tmpfs
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from server.config import PublishPolicy, RoundPolicy
from server.records import UploadRecord, UploadState
from tests.scripted import (
    ADMIN_TOKEN,
    ROOT,
    AdminClient,
    Aggregator,
    Harness,
    MakeHarness,
    ScriptedSite,
    State,
    add,
    assert_same_bits,
    harnesses,
    random_delta,
    rpc_code,
    small_state,
    wait_for,
)

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
FAILED = federation_pb2.ROUND_STATE_FAILED
AGGREGATING = federation_pb2.ROUND_STATE_AGGREGATING
FAST = PublishPolicy(backoff_s=0.05, max_backoff_s=0.2)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def break_publication(h: Harness) -> Path:
    tmp = h.agg.config.state_dir / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a directory: every blob write fails\n")
    return tmp


def repair(tmp: Path) -> None:
    tmp.unlink()
    tmp.mkdir()


def push_both(h: Harness, round_number: int = 1, base: int = 0) -> list[tuple[State, int]]:
    contributions = []
    for seed, (site, samples) in enumerate((("a", 10), ("b", 30)), start=11):
        delta = random_delta(seed + round_number, h.init)
        head, payload = h[site].header(delta, round=round_number, base=base)
        assert h[site].push(head, payload).accepted
        contributions.append((delta, samples))
    return contributions


def failed_attempts(admin: AdminClient, round_number: int, at_least: int) -> admin_pb2.RoundStatus:
    def ready() -> admin_pb2.RoundStatus | None:
        status = admin.round(round_number)
        assert status.state == AGGREGATING, (status.state, status.failure_reason)
        attempts = [int(w) for w in status.failure_reason.split() if w.isdigit()]
        return status if attempts and attempts[0] >= at_least else None

    return wait_for(ready, 20, what=f"{at_least} failed publication attempt(s) of round {round_number}")


def test_a_failing_publication_is_retried_while_the_daemon_answers(
    harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness({"a": 10, "b": 30}, publish=FAST)
    h.join_all()
    tmp = break_publication(h)
    with caplog.at_level(logging.ERROR, logger="server.closing"):
        contributions = push_both(h)
        status = failed_attempts(h.admin, 1, at_least=3)
        assert "publication attempt" in status.failure_reason
        # Heartbeats, admin calls and the round loop's other work go on meanwhile.
        assert h["a"].beat().current_round == 1
        assert h.admin.status().current_round == 1
        sites = h.admin.sites()
        assert all(s.state == admin_pb2.SITE_STATE_ALIVE for s in sites.values())
    causes = [r.getMessage() for r in caplog.records if "publication attempt" in r.getMessage()]
    assert len(causes) >= 3 and all("Error" in c for c in causes)  # the cause, each time

    repair(tmp)
    status = h.admin.wait_round(1)
    assert status.state == PUBLISHED, status.failure_reason
    assert status.samples == 40 and not status.failure_reason
    _, state = h["a"].snapshot()
    assert_same_bits(state, add(h.init, h.mean(contributions)))
    h.admin.wait_round(2, federation_pb2.ROUND_STATE_OPEN)


def test_a_round_whose_publication_failed_is_published_after_a_restart(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 30}, publish=FAST)
    h.join_all()
    tmp = break_publication(h)
    contributions = push_both(h)
    failed_attempts(h.admin, 1, at_least=1)
    h.agg.stop()
    store_row = None
    repair(tmp)
    again = Aggregator(h.agg.config)
    admin = AdminClient(again.target)
    site = ScriptedSite(again.target, "a", 10)
    try:
        status = admin.wait_round(1)
        assert status.state == PUBLISHED, status.failure_reason
        assert status.samples == 40
        site.join(held_round=0)
        _, state = site.snapshot()
        assert_same_bits(state, add(h.init, h.mean(contributions)))
        store_row = again.coordinator.state.store.select(UploadRecord, "round = ?", (1,))
    finally:
        site.close()
        admin.close()
        again.stop()
    assert store_row is not None and {u.state for u in store_row} == {UploadState.ACCEPTED}


def gdfed_admin(target: str, token_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GDFED_ADMIN_TOKEN", None)
    argv = [sys.executable, "-m", "common.cli", "admin", "--aggregator", target]
    return subprocess.run(
        [*argv, "--admin-token-file", str(token_file), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        encoding="utf-8",
        timeout=60,
    )


def test_the_attempts_policy_fails_the_round_and_retry_round_publishes_it(
    harness: MakeHarness, tmp_path: Path
) -> None:
    h = harness({"a": 10, "b": 30}, publish=PublishPolicy(max_attempts=2, backoff_s=0.05, max_backoff_s=0.1))
    h.join_all()
    tmp = break_publication(h)
    contributions = push_both(h)
    status = h.admin.wait_round(1)
    assert status.state == FAILED and "retry-round 1" in status.failure_reason
    run = h.admin.status()
    assert run.paused and run.current_round == 1  # no round opens on top of the failed one
    store = h.agg.coordinator.state.store
    kept = store.select(UploadRecord, "round = ? AND state = ?", (1, int(UploadState.ACCEPTED)))
    assert len(kept) == 2 and all(h.agg.coordinator.spool.path(u.upload_id).exists() for u in kept)

    def retry(number: int) -> admin_pb2.ControlReply:
        request = admin_pb2.RetryRoundRequest(round=number, reason="test")
        reply: admin_pb2.ControlReply = h.admin.stub.RetryRound(
            request, metadata=h.admin.metadata, timeout=10
        )
        return reply

    assert rpc_code(lambda: retry(7)) is grpc.StatusCode.NOT_FOUND
    repair(tmp)
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    done = gdfed_admin(h.agg.target, token, "retry-round", "1", "--reason", "disk repaired")
    assert done.returncode == 0, done.stderr
    status = h.admin.wait_round(1, PUBLISHED)
    assert status.samples == 40
    _, state = h["a"].snapshot()
    assert_same_bits(state, add(h.init, h.mean(contributions)))
    assert not h.admin.status().paused
    h.admin.wait_round(2, federation_pb2.ROUND_STATE_OPEN)
    assert rpc_code(lambda: retry(1)) is grpc.StatusCode.FAILED_PRECONDITION  # published: nothing to retry


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux's")
def test_a_full_spool_is_resource_exhausted_and_the_upload_resumes_once_there_is_room(
    harness: MakeHarness, tmp_path: Path
) -> None:
    spool = tmp_path / "run0" / "state" / "spool"
    if not mount_tmpfs(spool, "64k"):
        pytest.skip("this machine does not allow tmpfs mounts (needs root or CAP_SYS_ADMIN)")
    try:
        wide = small_state(seed=3, width=128)  # 155 KiB of fp32: more than the 64 KiB disk
        h = harness({"a": 10}, init=wide, round=RoundPolicy(min_sites=1))
        h.join_all()
        delta = random_delta(5, h.init)
        head, payload = h["a"].header(delta, round=1, base=0, shard_bytes=16 * 1024)
        try:
            h["a"].push(head, payload, chunk_bytes=8 * 1024)
            raise AssertionError("the upload was accepted on a full disk")
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "disk is full" in (exc.details() or "")
        assert h["a"].beat().current_round == 1  # the daemon answers on
        subprocess.run(["mount", "-o", "remount,size=8m", str(spool)], check=True, timeout=10)
        start = h["a"].offset(head.upload_id).committed_offset
        receipt = h["a"].push(head, payload, start=start, chunk_bytes=8 * 1024)
        assert receipt.accepted
        status = h.admin.wait_round(1)
        assert status.state == PUBLISHED, status.failure_reason
        _, state = h["a"].snapshot()
        assert_same_bits(state, add(h.init, h.mean([(delta, 10)])))
    finally:
        harness_cleanup = subprocess.run(["umount", "-l", str(spool)], capture_output=True, timeout=10)
        assert harness_cleanup.returncode == 0, harness_cleanup.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux's")
def test_a_full_disk_during_publication_waits_for_room_and_then_publishes(
    harness: MakeHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case: the whole state directory on a disk that fills up (store included).

    While it is full the store cannot record anything either: calls that write answer UNAVAILABLE
    (heartbeats included, while a publication attempt holds the last bytes); the round must stay
    AGGREGATING with its uploads, and publish by itself once there is room, with no restart.
    """
    state_dir = tmp_path / "run0" / "state"
    if not mount_tmpfs(state_dir, "4m"):
        pytest.skip("this machine does not allow tmpfs mounts (needs root or CAP_SYS_ADMIN)")
    try:
        h = harness({"a": 10, "b": 30, "c": 5}, init=small_state(seed=3, width=128), publish=FAST)
        h.join_all()
        contributions = push_both(h)  # c sends nothing: the round stays open until closed
        filler = state_dir / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        # Room for the close's record, not for the new state.
        os.truncate(filler, max(0, filler.stat().st_size - 48 * 1024))
        with caplog.at_level(logging.ERROR, logger="server.closing"):
            h.admin.stub.CloseRound(admin_pb2.ControlRequest(), metadata=h.admin.metadata, timeout=10)

            def attempts() -> int:
                return sum("publication attempt" in r.getMessage() for r in caplog.records)

            wait_for(lambda: attempts() >= 3, 20, what="3 failed publication attempts")
        assert "No space left on device" in caplog.text
        assert h.admin.round(1).state == AGGREGATING
        # The store cannot record a beat on a full disk: answered UNAVAILABLE (retry), not INTERNAL.
        try:
            h["a"].beat()
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE and "disk is full" in (exc.details() or "")
        filler.unlink()
        status = h.admin.wait_round(1)
        assert status.state == PUBLISHED, status.failure_reason
        assert status.samples == 40
        _, state = h["a"].snapshot()
        assert_same_bits(state, add(h.init, h.mean(contributions)))
        assert not list((state_dir / "tmp").iterdir())  # failed attempts left nothing behind
    finally:
        done = subprocess.run(["umount", "-l", str(state_dir)], capture_output=True, timeout=10)
        assert done.returncode == 0, done.stderr
