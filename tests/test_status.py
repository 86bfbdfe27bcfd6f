"""What the operator sees: why a run waits, settings changed live (or refused), the status table and
its JSON schema, one site in detail.

A real aggregator in-process on 127.0.0.1 with scripted sites (tests/scripted.py), and ``gdfed``
itself as a subprocess where what is tested is the command's output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.delta import UploadMetrics
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from server import rounds
from server.admin_cli import render
from server.config import RoundPolicy
from server.status_json import (
    DEVICES,
    PHASES,
    ROUND_STATES,
    SITE_STATES,
    close_note,
)
from tests.scripted import ADMIN_TOKEN, ROOT, Harness, MakeHarness, harnesses, random_delta, wait_for

PUBLISHED = federation_pb2.ROUND_STATE_PUBLISHED
OPEN = federation_pb2.ROUND_STATE_OPEN
COLLECTING = federation_pb2.ROUND_STATE_COLLECTING


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="server")
    return caplog


def waiting_lines(log: pytest.LogCaptureFixture) -> list[str]:
    """The daemon's ``[round] waiting: ...`` lines so far, without the prefix."""
    prefix = "[round] waiting: "
    return [r.getMessage()[len(prefix) :] for r in log.records if r.getMessage().startswith(prefix)]


def logged(log: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The waiting lines that contain ``text``, once there is one."""
    return wait_for(
        lambda: [line for line in waiting_lines(log) if text in line], what=f"a log line {text!r}"
    )


def waiting(h: Harness, text: str) -> admin_pb2.RunStatus:
    """The run's status once its waiting reason contains ``text``."""

    def found() -> admin_pb2.RunStatus | None:
        status = h.admin.status()
        return status if text in status.waiting_reason else None

    return wait_for(found, what=f"waiting_reason with {text!r}")


def policy(h: Harness, **fields: Any) -> admin_pb2.ControlReply:
    request = admin_pb2.SetRoundPolicyRequest(**fields)
    reply: admin_pb2.ControlReply = h.admin.stub.SetRoundPolicy(
        request, metadata=h.admin.metadata, timeout=10
    )
    return reply


def refused(h: Harness, **fields: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        policy(h, **fields)
    return info.value


def push(h: Harness, site: str, *, round: int, train: float = 1.0, eval: float = 2.0) -> None:
    head, payload = h[site].header(
        random_delta(ord(site), h.init),
        round=round,
        base=round - 1,
        metrics=UploadMetrics(train_loss=train, eval_loss=eval, steps=1),
    )
    assert h[site].push(head, payload).accepted


def gdfed(target: str, tmp: Path, *commands: Sequence[str]) -> list[tuple[int, str, str]]:
    """Run ``gdfed`` commands side by side, each in its own interpreter; (rc, stdout, stderr) each."""
    token = tmp / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    env.pop("GDFED_ADMIN_TOKEN", None)
    connection = ["--aggregator", target, "--admin-token-file", str(token)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "common.cli", command, *connection, *rest],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
        )
        for command, *rest in commands
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        out.append((proc.returncode, stdout, stderr))
    return out


# ---------------------------------------------------------------- why the run waits


def test_every_waiting_reason_is_in_status_and_once_in_the_log(
    harness: MakeHarness, log: pytest.LogCaptureFixture
) -> None:
    h = harness({"a": 10, "b": 20}, rounds=1, round=RoundPolicy(min_sites_to_open=2))
    sites_text = "waiting for 2 sites alive to open round 1: 1 of 2 alive (min_sites_to_open)"
    h["a"].join()
    h["a"].start_beating()
    status = waiting(h, sites_text)
    assert (status.current_round, status.current_state, status.min_sites_to_open) == (0, 0, 2)
    assert logged(log, sites_text) == [sites_text]

    h["b"].join()
    h["b"].start_beating()
    quorum_text = "round 1 waits for its quorum: 0 of 2 upload(s) accepted (every live participant; 2 live"
    waiting(h, quorum_text)
    assert logged(log, quorum_text)[0].endswith("; no deadline")

    # The quorum with samples, and a deadline: its countdown is in status, not a new log line a tick.
    policy(h, quorum=federation_pb2.Quorum(min_sample_fraction=0.5), round_deadline_s=600)
    push(h, "a", round=1)
    status = waiting(h, "1 of 2 upload(s) accepted")
    assert "10 of 15 samples (50% of 30)" in status.waiting_reason
    assert re.search(r"; deadline in (9 min 5\d|10 min 0) s$", status.waiting_reason), status.waiting_reason
    logged(log, "1 of 2 upload(s) accepted")
    time.sleep(5 * h.agg.config.tick_s)  # a few ticks, each with a new countdown
    assert len(logged(log, "1 of 2 upload(s) accepted")) == 1

    h.admin.stub.Pause(admin_pb2.ControlRequest(reason="maintenance"), metadata=h.admin.metadata, timeout=10)
    paused_text = (
        "paused by the operator (maintenance); round 1 takes uploads but closes only on resume or close-round"
    )
    status = waiting(h, paused_text)
    assert (status.paused, status.pause_reason) == (True, "maintenance")
    assert logged(log, "paused by the operator") == [paused_text]

    resumed = h.admin.stub.Resume(admin_pb2.ControlRequest(), metadata=h.admin.metadata, timeout=10)
    assert resumed.status.pause_reason == ""
    push(h, "b", round=1)
    assert h.admin.wait_round(1).state == PUBLISHED
    finished_text = "finished: round 1, the last, is published"
    assert waiting(h, finished_text).finished
    assert logged(log, "finished") == [finished_text]

    # The loop ticked dozens of times meanwhile: a line each time the reason changed, no more.
    lines = waiting_lines(log)
    assert len(lines) == len(set(lines)), lines
    assert lines.index(sites_text) < lines.index(paused_text) < lines.index(finished_text)


def test_min_sites_to_open_changed_live_opens_the_round_and_the_policy_is_checked(
    harness: MakeHarness, log: pytest.LogCaptureFixture
) -> None:
    h = harness({"a": 10, "b": 20, "c": 30}, round=RoundPolicy(min_sites_to_open=3))
    h["a"].join()
    h["b"].join()
    h["a"].start_beating()
    h["b"].start_beating()
    waiting(h, "waiting for 3 sites alive to open round 1: 2 of 3 alive")

    reply = policy(h, min_sites_to_open=2)
    assert (reply.status.current_round, reply.status.current_state) == (1, OPEN)  # at once, not at a tick
    assert reply.status.min_sites_to_open == 2 and reply.message == ""
    assert "round 1 waits for its quorum" in reply.status.waiting_reason
    assert h["a"].await_round(after=0).round == 1
    lines = [r.getMessage() for r in log.records]
    assert "[admin] policy now min_sites=all min_sample_fraction=0 deadline=none min_sites_to_open=2" in lines

    # What the sites alive now cannot meet, c (configured, not joined) may: taken, with a warning.
    reply = policy(h, min_sites_to_open=3, quorum=federation_pb2.Quorum(min_sites=3))
    assert reply.status.min_sites_to_open == 3 and reply.status.quorum.min_sites == 3
    warnings = reply.message.splitlines()
    assert warnings == [
        "warning: quorum.min_sites is 3 but 2 site(s) are alive now (3 site token(s) in the config, "
        "2 joined, 2 alive, 0 evicted): a round closes only once 3 uploads are accepted; "
        "with no deadline it waits until then",
        "warning: min_sites_to_open is 3 but 2 site(s) are alive now (3 site token(s) in the config, "
        "2 joined, 2 alive, 0 evicted): the next round opens once 3 are alive",
    ]

    # What no site can ever meet is refused, and changes nothing.
    error = refused(h, min_sites_to_open=4, round_deadline_s=5)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        "min_sites_to_open is 4 but at most 3 site(s) can ever take part "
        "(3 site token(s) in the config, 2 joined, 2 alive, 0 evicted)"
    )
    h.admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="b"), metadata=h.admin.metadata, timeout=10)
    error = refused(h, quorum=federation_pb2.Quorum(min_sites=3))  # an evicted site never comes back
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert (
        "quorum.min_sites is 3 but at most 2 site(s) can ever take part" in details and "1 evicted" in details
    )
    assert refused(h, quorum=federation_pb2.Quorum(min_sample_fraction=2.0)).code() is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    status = h.admin.status()
    assert (status.min_sites_to_open, status.quorum.min_sites, status.round_deadline_s) == (3, 3, 0)


# ---------------------------------------------------------------- the CLI


def test_a_stalled_run_says_why_and_close_round_says_when_the_next_opens(
    harness: MakeHarness, tmp_path: Path
) -> None:
    """The issue's stall: a site drops, the round closes without it, the next one waits for sites."""
    h = harness({"a": 10, "b": 20}, round=RoundPolicy(min_sites_to_open=2))
    h.join_all()
    assert h["a"].await_round(after=0).round == 1
    push(h, "a", round=1)
    h["b"].stop_beating()
    assert h.admin.wait_round(1).state == PUBLISHED
    stalled = "waiting for 2 sites alive to open round 2: 1 of 2 alive (min_sites_to_open)"
    waiting(h, stalled)
    with pytest.raises(grpc.RpcError) as info:
        h.admin.stub.CloseRound(admin_pb2.ControlRequest(), metadata=h.admin.metadata, timeout=10)
    assert info.value.details() == f"no round is open: round 1 is published; {stalled}"

    (rc, table, err), (rc_close, _, close_err), (rc_policy, _, policy_err) = gdfed(
        h.agg.target,
        tmp_path,
        ["status"],
        ["admin", "close-round"],
        ["admin", "policy", "--min-sites", "5"],
    )
    assert rc == 0, err
    lines = table.splitlines()
    assert lines[0].startswith("run test-run: round 1/∞ published, sites 1 alive / 2 known")
    assert lines[0].endswith("min_sites_to_open=2")
    assert lines[1] == f"waiting: {stalled}"
    [row1] = [line for line in lines if line.split()[:2] == ["1", "published"]]
    assert row1.split()[2:4] == ["1/2", "10"]
    assert row1.endswith("  all 1 live site (1 dropped)")  # not "all": b was dropped
    assert rc_close == 1 and f"no round is open: round 1 is published; {stalled}" in close_err
    assert rc_policy == 1
    assert "FAILED_PRECONDITION: quorum.min_sites is 5 but at most 2 site(s) can ever take part" in policy_err

    [(rc, out, err)] = gdfed(h.agg.target, tmp_path, ["admin", "policy", "--min-sites-to-open", "1"])
    assert rc == 0 and err == "", err
    first, *rest = out.splitlines()
    assert first.startswith("run test-run: round 2/∞ open") and first.endswith("min_sites_to_open=1")
    assert rest == ["waiting: round 2 waits for its quorum: 0 of 1 upload(s) accepted "
                    "(every live participant; 1 live participant(s)); no deadline"]  # fmt: skip
    [(rc, _, err)] = gdfed(h.agg.target, tmp_path, ["admin", "policy", "--min-sites-to-open", "2"])
    assert rc == 0 and err.startswith("warning: min_sites_to_open is 2 but 1 site(s) are alive now"), err


def _beat(h: Harness, site: str, **fields: Any) -> None:
    h[site].stub.Heartbeat(
        federation_pb2.HeartbeatRequest(site_id=site, **fields), metadata=h[site].metadata, timeout=10
    )


def test_status_of_a_collecting_round_a_site_in_detail_and_the_json_schema(
    harness: MakeHarness, tmp_path: Path
) -> None:
    h = harness({"a": 10, "b": 20}, missed_beats=600)  # no beats but this test's own: never dropped
    h["a"].samples = 270
    h.join_all(beat=False)  # this test's beats carry the progress it checks
    assert h["a"].await_round(after=0).round == 1
    # Paused, round 1 takes uploads and does not close: a round with 2 of 2 accepted, not published.
    h.admin.stub.Pause(admin_pb2.ControlRequest(reason="look first"), metadata=h.admin.metadata, timeout=10)
    empty = h.admin.round(1)
    assert (empty.state, empty.samples) == (OPEN, 0)
    [row] = [line for line in render(h.admin.status(), [empty], []).splitlines() if line.split()[:1] == ["1"]]
    assert row.split()[1:4] == ["open", "0/2", "0"] and row.split()[10:13] == ["-", "-", "so"]
    push(h, "a", round=1, train=1.0, eval=3.0)
    push(h, "b", round=1, train=4.0, eval=0.0)  # no eval reported
    _beat(h, "a", round=1, phase=federation_pb2.PHASE_TRAINING, step=125, total_steps=250, loss=0.75,
          last_problem="CUDA out of memory at batch 8; retrying with batch 4",
          timings=federation_pb2.PhaseTimings(load_seconds=61.5, sync_seconds=2.5, train_seconds=30.0))  # fmt: skip
    _beat(h, "b", phase=federation_pb2.PHASE_IDLE)
    assert h.admin.round(1).state == COLLECTING

    (
        (rc, table, err),
        (rc_json, raw, err_json),
        (rc_site, detail, _),
        (rc_site_json, site_raw, _),
        (rc_none, _, none_err),
    ) = gdfed(
        h.agg.target,
        tmp_path,
        ["status"],
        ["status", "--json"],
        ["status", "--site", "a"],
        ["status", "--site", "a", "--json"],
        ["status", "--site", "zz"],
    )
    assert rc == 0, err
    lines = table.splitlines()
    assert lines[0].startswith("run test-run (paused): round 1/∞ collecting")
    assert lines[1] == (
        "waiting: paused by the operator (look first); round 1 takes uploads but closes only on resume or "
        "close-round"
    )
    [row1] = [line for line in lines if line.split()[:2] == ["1", "collecting"]]
    cells = row1.split()
    assert cells[2:4] == ["2/2", "290"]  # the samples so far
    assert float(cells[8]) > 0  # took: open for a while now
    assert cells[9] == "-"  # not aggregated yet
    assert float(cells[10]) == pytest.approx((1.0 * 270 + 4.0 * 20) / 290, abs=1e-4)
    assert float(cells[11]) == pytest.approx(3.0 * 270 / 290, abs=1e-4)
    assert cells[12:] == ["so", "far"]
    [site_a] = [line for line in lines if line.split()[:2] == ["a", "alive"]]
    assert site_a.split()[5:8] == ["training", "125/250", "0.7500"]  # steps, not samples (270)
    assert site_a.endswith("CUDA out of memory at batch 8; retrying with batch 4")
    [site_b] = [line for line in lines if line.split()[:2] == ["b", "alive"]]
    assert site_b.split()[5:8] == ["idle", "-", "-"]  # nothing reported: "-", not 0.0000

    assert rc_site == 0
    assert detail.splitlines()[0] == "site a: alive"
    for expected in (
        "phase         training",
        "step          125/250",
        "loss          0.7500",
        "last problem  CUDA out of memory at batch 8; retrying with batch 4",
        "timings       load 61.5 s, sync 2.5 s, train 30.0 s, upload -",
        "capabilities  device -, memory -, lora rank -, samples 270",
    ):
        assert expected in [line.strip() for line in detail.splitlines()[1:]], (expected, detail)
    assert rc_none == 1 and "site 'zz' has not joined this run (joined: a, b)" in none_err

    assert rc_json == 0, err_json
    doc = json.loads(raw)
    fields = documented_fields()
    check_document(doc, fields)
    assert doc["schema"] == "gdfed.status/1"
    run = doc["run"]
    assert (run["paused"], run["pause_reason"], run["current_state"], run["total_rounds"]) == (
        True, "look first", "collecting", None
    )  # fmt: skip
    assert run["policy"] == {"min_sites": 0, "min_sample_fraction": 0.0, "round_deadline_s": 0,
                             "min_sites_to_open": 0}  # fmt: skip
    [round1] = doc["rounds"]
    assert (round1["live"], round1["accepted"], round1["samples"], round1["close_reason"]) == (
        True,
        2,
        290,
        None,
    )
    assert round1["mean_train_loss"] == pytest.approx((1.0 * 270 + 4.0 * 20) / 290)
    assert round1["aggregate_seconds"] is None and round1["published_unix_ms"] is None
    parts = {p["site_id"]: p for p in round1["participants"]}
    assert parts["b"]["eval_loss"] is None and parts["a"]["state"] == "accepted"
    sites = {s["site_id"]: s for s in doc["sites"]}
    assert (sites["a"]["step"], sites["a"]["total_steps"], sites["a"]["phase"]) == (125, 250, "training")
    assert sites["a"]["timings"]["upload_seconds"] is None and sites["a"]["timings"]["load_seconds"] == 61.5
    assert sites["b"]["loss"] is None

    site_doc = json.loads(site_raw)
    assert rc_site_json == 0 and site_doc["schema"] == "gdfed.site/1"
    check_document(site_doc, site_fields(fields))
    assert site_doc["site"] == sites["a"]


# ---------------------------------------------------------------- the schema, as docs/operator.md lists it


def documented_fields() -> dict[str, str]:
    """Path -> type of the gdfed.status/1 document, from the table of docs/operator.md's
    "Status and its JSON schema" section."""
    text = (ROOT / "docs" / "operator.md").read_text()
    section = text.split("## Status and its JSON schema", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([a-z_.\[\]]+)` \| ([a-z ]+) \|", section, flags=re.MULTILINE))


def site_fields(fields: dict[str, str]) -> dict[str, str]:
    """The gdfed.site/1 document: its ``site`` is one entry of gdfed.status/1's ``sites``."""
    return {"schema": "string"} | {
        "site." + k.removeprefix("sites[]."): v for k, v in fields.items() if k.startswith("sites[].")
    }


_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "word": str, "list": list,
          "object": dict}  # fmt: skip


def check_document(doc: dict[str, Any], fields: dict[str, str]) -> None:
    """Every documented field is there with its documented type, and nothing else is."""
    seen: dict[str, list[Any]] = {}

    def walk(value: Any, path: str) -> None:
        if path:
            seen.setdefault(path, []).append(value)
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for item in value:
                walk(item, path + "[]")

    walk(doc, "")
    objects = {p for p, v in seen.items() if isinstance(v[0], dict) and p not in fields}
    assert set(seen) - objects == set(fields), (set(seen) - objects) ^ set(fields)
    for path, kind in fields.items():
        base, _, nullable = kind.partition(" or ")
        for value in seen[path]:
            if value is None:
                assert nullable == "null", (path, kind)
                continue
            assert isinstance(value, _TYPES[base]), (path, kind, value)
            assert not (base in ("integer", "number") and isinstance(value, bool)), (path, kind, value)


# ---------------------------------------------------------------- words and notes


@pytest.mark.parametrize(
    ("table", "enum", "prefix"),
    [
        (ROUND_STATES, federation_pb2.RoundState, "ROUND_STATE_"),
        (SITE_STATES, admin_pb2.SiteState, "SITE_STATE_"),
        (PHASES, federation_pb2.Phase, "PHASE_"),
        (DEVICES, federation_pb2.Device, "DEVICE_"),
    ],
)
def test_every_wire_enum_value_has_its_documented_word(table: dict[int, str], enum: Any, prefix: str) -> None:
    section = (ROOT / "docs" / "operator.md").read_text().split("## Status and its JSON schema", 1)[1]
    expected = {v: n.removeprefix(prefix).lower() for n, v in enum.items() if v}
    assert table == expected
    for word in table.values():
        assert f"`{word}`" in section


def _round(reason: str, *marks: str, failure: str = "") -> admin_pb2.RoundStatus:
    parts = [
        admin_pb2.SiteRoundStatus(site_id=str(i), accepted=m == "accepted", dropped=m == "dropped")
        for i, m in enumerate(marks)
    ]
    return admin_pb2.RoundStatus(close_reason=reason, failure_reason=failure, participants=parts)


def test_close_notes_say_what_closed_the_round_and_with_how_many_sites() -> None:
    assert close_note(_round("all", "accepted", "accepted")) == "all 2 live sites"
    assert close_note(_round("all", "accepted", "dropped")) == "all 1 live site (1 dropped)"
    assert (
        close_note(_round("quorum", "accepted", "pending", "dropped")) == "quorum: 1 of 3 (1 dropped, 1 late)"
    )
    assert close_note(_round("deadline", "accepted", "pending")) == "deadline: 1 of 2 (1 late)"
    assert close_note(_round("admin", "accepted")) == "closed by the operator: 1 of 1"
    assert close_note(_round("", "pending", failure="deadline passed")) == "deadline passed"


def test_waiting_lines_and_their_countdown() -> None:
    quorum = rounds.waiting_for_quorum(
        RoundPolicy(min_sites=2, min_sample_fraction=0.25),
        rounds.Tally(
            accepted=1,
            accepted_samples=5,
            alive_participants=3,
            expected_samples=30,
            now_ms=0,
            deadline_ms=125_000,
        ),
        7,
    )
    assert quorum.line(0) == (
        "round 7 waits for its quorum: 1 of 2 upload(s) accepted (min_sites=2; 3 live participant(s)), "
        "5 of 8 samples (25% of 30); deadline in 2 min 5 s"
    )
    assert quorum.line(124_001).endswith("deadline in 1 s") and quorum.line(200_000).endswith(
        "deadline in 0 s"
    )
    assert rounds.waiting_to_open(next_round=3, alive=2, min_sites_to_open=2) == rounds.Waiting()
    assert rounds.paused("", open_round=0, next_round=4).line(0) == (
        "paused by the operator (no reason given); round 4 opens on resume"
    )
    assert {
        w.kind for w in (quorum, rounds.finished(3), rounds.paused("x", open_round=1, next_round=2))
    } <= set(rounds.WAITING_KINDS)
