"""Access against a real aggregator: eviction refuses every call, the tokens file is checked line by
line, tokens are stored as hashes and rotate without a restart (ReloadTokens and SIGHUP), and an
upload's codec is validated before anything is derived from it."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.delta import Codec, Lossy
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from server.config import ConfigError
from server.config_file import load_config
from server.tokens import hashed
from tests.scripted import (
    ADMIN_TOKEN,
    ROOT,
    AdminClient,
    Aggregator,
    Daemon,
    MakeHarness,
    ScriptedSite,
    free_port,
    harnesses,
    make_config,
    random_delta,
    refusal,
    small_state,
    wait_for,
    write_daemon_config,
    write_state,
)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def _text(exc: grpc.RpcError) -> str:
    return exc.details() or ""


# --- defect 3: an evicted site keeps no access --------------------------------------------------


def test_an_evicted_site_is_refused_on_every_call(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20})
    h.join_all()
    a = h["a"]
    head, payload = a.header(random_delta(1, h.init), round=1, base=0)
    # Before: every read answers (so the refusals below are the eviction's doing).
    assert a.fetch(have=0, snapshot=True)
    a.await_round(after=0, wait_ms=0)
    assert a.offset(head.upload_id).committed_offset == 0
    h.admin.stub.EvictSite(
        admin_pb2.EvictSiteRequest(site_id="a", reason="test"), metadata=h.admin.metadata, timeout=10
    )
    a.stop_beating()
    calls = {
        "Join": a.join,
        "FetchDiff": lambda: a.fetch(have=0, snapshot=True),
        "AwaitRound": lambda: a.await_round(after=0, wait_ms=0),
        "GetUploadOffset": lambda: a.offset(head.upload_id),
        "PushDelta": lambda: a.push(head, payload),
    }
    for name, call in calls.items():
        exc = refusal(call)
        assert exc.code() is grpc.StatusCode.PERMISSION_DENIED, (name, _text(exc))
        assert "'a'" in _text(exc) and "evicted" in _text(exc), (name, _text(exc))
    # Heartbeat answers STOP "evicted" (decided: the worker then exits with its evicted code).
    beat = a.beat()
    assert beat.directive == federation_pb2.DIRECTIVE_STOP and beat.message.startswith("evicted")
    # The other site is untouched.
    assert h["b"].fetch(have=0, snapshot=True)


def test_an_await_round_waiting_when_its_site_is_evicted_is_refused(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20})
    h.join_all()
    waiting = h["a"].stub.AwaitRound.future(
        federation_pb2.AwaitRoundRequest(site_id="a", after_round=99, wait_ms=30_000),
        metadata=h["a"].metadata,
        timeout=40,
    )
    h.admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="a"), metadata=h.admin.metadata, timeout=10)
    exc = waiting.exception(timeout=10)
    assert isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.PERMISSION_DENIED, exc


# --- defect 6: a top-k codec's fraction is checked before the manifest is derived ---------------


def test_a_topk_upload_with_a_bad_fraction_is_invalid_argument_naming_the_field(harness: MakeHarness) -> None:
    h = harness({"a": 10, "b": 20})
    h.join_all()
    a = h["a"]
    good = Codec(lossy=Lossy.TOPK, topk_fraction=0.5)
    head, payload = a.header({"embed.weight": h.init["embed.weight"] * 0}, round=1, base=0, codec=good)
    for fraction in (math.nan, 0.0, 1.5):
        bad = dataclasses.replace(
            head,
            spec=dataclasses.replace(head.spec, codec=dataclasses.replace(good, topk_fraction=fraction)),
        )
        exc = refusal(lambda bad=bad: a.push(bad, payload))
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, (fraction, _text(exc))
        assert "topk_fraction" in _text(exc), _text(exc)
    assert h.admin.status().current_round == 1  # the daemon goes on


# --- defect 5: the tokens file is checked at start, naming the line -----------------------------


def _load_tokens(tmp: Path, text: str, mode: int = 0o600) -> object:
    path = tmp / "sites.tokens"
    path.write_text(text)
    path.chmod(mode)
    return load_config(None, {"site_tokens_file": str(path), "admin_token": ADMIN_TOKEN})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a = ta\nsite-c =\n", ["line 2", "'site-c'", "empty token"]),
        ("a = same\nb = same\n", ["line 2", "same token as site 'a'", "line 1"]),
        (f"a = ta\n\nb = {ADMIN_TOKEN}\n", ["line 3", "admin token"]),
        (f"a = ta\nb = {hashed(ADMIN_TOKEN)}\n", ["line 2", "admin token"]),
        ("a = ta\nsite-b\n", ["line 2", "not `site = token`"]),
        ("a = ta\n = tb\n", ["line 2", "not `site = token`"]),
        ("a = abc#def\n", ["line 1", "'#' inside a line"]),
        ("a = abc # a comment\n", ["line 1", "'#' inside a line"]),
        ("a = ta\na = tb\n", ["line 2", "site 'a' already has a token", "line 1"]),
        ("a = sha256:abc\n", ["line 1", "64 lowercase hex"]),
        ("bad site! = ta\n", ["line 1", "site id"]),
    ],
    ids=[
        "empty",
        "shared",
        "admin",
        "admin-hash",
        "no-equals",
        "no-site",
        "hash-in",
        "trailing-comment",
        "site-twice",
        "bad-hash",
        "bad-site-id",
    ],
)
def test_a_bad_tokens_file_is_refused_at_start_naming_its_line(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_tokens(tmp_path, text)
    for word in words:
        assert word in caught.value.message, caught.value.message
    assert "same" not in caught.value.message.replace("same token", "") or "shared" in text  # no secret shown


def test_comments_hashes_and_quotes_read_and_a_wide_mode_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = f'# sites of the pilot\n  # indented comment\n[sites]\na = ta\nb = "tb"\nc = {hashed("tc")}\n'
    with caplog.at_level(logging.WARNING, logger="server.tokens"):
        config = _load_tokens(tmp_path, text, mode=0o600)
    assert not caplog.records
    assert dict(config.site_tokens) == {"a": "ta", "b": "tb", "c": hashed("tc")}  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="server.tokens"):
        _load_tokens(tmp_path, text, mode=0o644)
    assert any("0644" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)


def test_a_site_token_equal_to_the_admin_token_fails_the_start_in_code_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admin token"):
        Aggregator(make_config(tmp_path, ["a"], site_tokens={"a": ADMIN_TOKEN}))


# --- rotation: ReloadTokens, SIGHUP, gdfed token -------------------------------------------------


def _control(agg: Aggregator) -> admin_pb2.ControlReply:
    with AdminClient(agg.target) as admin:
        reply: admin_pb2.ControlReply = admin.stub.ReloadTokens(
            admin_pb2.ControlRequest(reason="rotation"), metadata=admin.metadata, timeout=10
        )
        return reply


def _joins(target: str, site: str, token: str) -> grpc.StatusCode:
    with ScriptedSite(target, site, token=token) as s:
        try:
            s.join()
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_reload_tokens_adds_revokes_and_rotates_and_a_bad_file_keeps_the_old(tmp_path: Path) -> None:
    tokens = tmp_path / "sites.tokens"
    tokens.write_text("a = old-a\nb = tb\n")
    tokens.chmod(0o600)
    config = make_config(tmp_path, [], site_tokens={}, site_tokens_files=(tokens,))
    with Aggregator(config) as agg:
        assert _joins(agg.target, "a", "old-a") is grpc.StatusCode.OK
        assert _joins(agg.target, "c", "tc") is grpc.StatusCode.UNAUTHENTICATED
        tokens.write_text(f"a = {hashed('new-a')}\nc = tc\n")
        assert _joins(agg.target, "a", "old-a") is grpc.StatusCode.OK  # nothing changes before a reload
        reply = _control(agg)
        assert reply.ok and "added: c" in reply.message and "removed: b" in reply.message
        assert "changed: a" in reply.message and "new-a" not in reply.message
        assert _joins(agg.target, "a", "old-a") is grpc.StatusCode.UNAUTHENTICATED
        assert _joins(agg.target, "b", "tb") is grpc.StatusCode.UNAUTHENTICATED
        assert _joins(agg.target, "a", "new-a") is grpc.StatusCode.OK
        assert _joins(agg.target, "c", "tc") is grpc.StatusCode.OK
        tokens.write_text("a = x\nd =\n")
        exc = refusal(lambda: _control(agg))
        assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "line 2" in _text(exc) and "empty token" in _text(exc), _text(exc)
        assert _joins(agg.target, "a", "new-a") is grpc.StatusCode.OK  # the old tokens stay in force
        assert _joins(agg.target, "a", "x") is grpc.StatusCode.UNAUTHENTICATED


def test_reload_tokens_without_a_tokens_file_is_failed_precondition(harness: MakeHarness) -> None:
    h = harness({"a": 10})
    exc = refusal(lambda: _control(h.agg))
    assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION and "no site tokens file" in _text(exc)


def _cli(*words: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GDFED_ADMIN_TOKEN=ADMIN_TOKEN)
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *words],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_sighup_and_gdfed_token_rotate_a_token_of_a_running_daemon(tmp_path: Path) -> None:
    made = _cli("token", "site-a", "--token-file", str(tmp_path / "a.token"))
    assert made.returncode == 0, made.stderr
    lines = [line for line in made.stdout.splitlines() if not line.startswith("#")]
    new_token, line = lines
    assert line == f"site-a = {hashed(new_token)}"
    assert (tmp_path / "a.token").read_text().strip() == new_token
    assert os.stat(tmp_path / "a.token").st_mode & 0o777 == 0o600
    assert _cli("token", "no such site").returncode == 2

    port = free_port()
    tokens = tmp_path / "sites.tokens"
    tokens.write_text("site-a = first-token\n")
    tokens.chmod(0o600)
    config = write_daemon_config(
        tmp_path / "gdfed.toml",
        port=port,
        init_state=write_state(tmp_path / "init.st", small_state()),
        sites=[],
    )
    config.write_text(f'site_tokens_file = "{tokens}"\n' + config.read_text())
    daemon = Daemon(config, tmp_path / "daemon.log")
    target = f"127.0.0.1:{port}"
    try:
        daemon.start(target)
        assert _joins(target, "site-a", "first-token") is grpc.StatusCode.OK
        tokens.write_text(f"# rotated\n{line}\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: site tokens reloaded" in daemon.log(), timeout=10, what="the reload")
        assert _joins(target, "site-a", new_token) is grpc.StatusCode.OK
        assert _joins(target, "site-a", "first-token") is grpc.StatusCode.UNAUTHENTICATED
        tokens.write_text(f"{line}\nsite-b = first#token\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "NOT reloaded" in daemon.log(), timeout=10, what="the refused reload")
        assert "line 2" in daemon.log() and daemon.proc.poll() is None
        assert _joins(target, "site-a", new_token) is grpc.StatusCode.OK
        admin = _cli("admin", "--aggregator", target, "reload-tokens")
        assert admin.returncode == 1 and "FAILED_PRECONDITION" in admin.stderr and "line 2" in admin.stderr
        assert daemon.terminate(timeout=30) == 0
    finally:
        daemon.cleanup()
