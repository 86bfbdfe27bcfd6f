"""The worker against the faults of a real run: a slow model load, an aggregator killed mid-upload,
an eviction, an aggregator gone for good; and what the worker tells the operator (remote diagnosis).

The slow load and the slow link are the worker's own code with one function wrapped, in the
worker's process (``python -c``): nothing in the worker knows it is tested.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client import exits
from client.heartbeat import MAX_PROBLEM_BYTES, Heartbeat, ProblemLog, Status, one_line
from client.init_state import write_init_state
from client.model import fingerprint
from common.delta import MIB
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from common.spec import Phase, TrainingSpec
from server.config import RoundPolicy
from tests.federation import demo_config, demo_worker, tiny_demo
from tests.scripted import (
    ADMIN_TOKEN,
    ROOT,
    AdminClient,
    Aggregator,
    Daemon,
    ScriptedSite,
    free_port,
    make_config,
    rpc_code,
    token_of,
    wait_for,
)

SPEC = TrainingSpec(local_steps=2, batch_size=8, learning_rate=1e-3, max_seq_len=32)
SAMPLES = 72  # a demo site's 80 examples, 10 % held out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("demo"))


# ---------------------------------------------------------------- helpers


def daemon_config(tmp: Path, model: Path, sites: list[str], *, interval_s: float, missed_beats: int,
                  min_sites_to_open: int) -> tuple[Path, str]:  # fmt: skip
    """A `gdfed serve` TOML for one round of full training of ``model``; (its path, the target)."""
    init = tmp / "init.safetensors"
    write_init_state(model, init, SPEC)
    port = free_port()
    lines = [
        f'listen = "127.0.0.1:{port}"',
        f'state_dir = "{tmp / "state"}"',
        f'init_state = "{init}"',
        'run_id = "faults"',
        "rounds = 1",
        f'base_model_fingerprint = "{fingerprint(model)}"',
        f"heartbeat_interval_s = {interval_s}",
        f"missed_beats = {missed_beats}",
        "tick_s = 0.05",
        f'admin_token = "{ADMIN_TOKEN}"',
        "",
        "[round]",
        f"min_sites_to_open = {min_sites_to_open}",
        "",
        "[training]",
        f"local_steps = {SPEC.local_steps}",
        f"batch_size = {SPEC.batch_size}",
        f"learning_rate = {SPEC.learning_rate}",
        f"max_seq_len = {SPEC.max_seq_len}",
        "",
        "[sites]",
        *(f'{site} = "{token_of(site)}"' for site in sites),
    ]
    path = tmp / "gdfed.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, f"127.0.0.1:{port}"


class WorkerProcess:
    """`gdfed work` for one site in a process of its own, ``patch`` (Python) run first; its output in a log."""

    def __init__(self, tmp: Path, target: str, site: str, model: Path, data: Path, *, patch: str = "",
                 flags: tuple[str, ...] = ()) -> None:  # fmt: skip
        token = tmp / f"{site}.token"
        token.write_text(token_of(site))
        argv = [
            "work", "--aggregator", target, "--site", site, "--token-file", str(token),
            "--model", str(model), "--data", str(data), "--state-dir", str(tmp / site),
            "--quiet", "--threads", "1", *flags,
        ]  # fmt: skip
        code = f"{patch}\nfrom common.cli import main\nraise SystemExit(main({argv!r}))"
        self.log_path = tmp / f"{site}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the worker did not exit within {timeout}s:\n{self.log()[-6000:]}"
            ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[WorkerProcess | Daemon]]:
    """Processes a test starts; killed at its end whatever happened, their logs shown if it failed."""
    started: list[WorkerProcess | Daemon] = []
    yield started
    for each in started:
        if isinstance(each, Daemon):
            print(each.log())
            each.cleanup()
        else:
            print(each.log()[-6000:])
            each.close()


# ---------------------------------------------------------------- defect 1: beats from Join


@pytest.mark.slow
def test_a_site_loading_its_model_for_20_s_is_never_dropped(
    tmp_path: Path, demo: Path, processes: list[WorkerProcess | Daemon]
) -> None:
    # A 2 s allowance (1 s beats, 2 missed) against a 20 s load: only beats sent while loading keep it.
    config, target = daemon_config(
        tmp_path, demo / "model", ["site-a", "site-b"], interval_s=1, missed_beats=2, min_sites_to_open=2
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    processes.append(daemon)
    daemon.start(target)
    slow_load = (
        "import time, client.worker as w\n"
        "real = w.load_model\n"
        "def slow(*args, **kwargs):\n"
        "    time.sleep(20)\n"
        "    return real(*args, **kwargs)\n"
        "w.load_model = slow"
    )
    data = demo / "data"
    slow = WorkerProcess(tmp_path, target, "site-a", demo / "model", data / "site-a.jsonl", patch=slow_load)
    processes.append(slow)
    fast = WorkerProcess(tmp_path, target, "site-b", demo / "model", data / "site-b.jsonl")
    processes.append(fast)
    with AdminClient(target) as admin:

        def loading() -> admin_pb2.SiteStatus | None:
            s = admin.sites().get("site-a")
            return s if s is not None and s.phase == federation_pb2.PHASE_LOADING else None

        site_a = wait_for(loading, timeout=60, what="site-a to report that it loads its model")
        assert site_a.state == admin_pb2.SITE_STATE_ALIVE
        assert fast.wait(timeout=120) == 0 and slow.wait(timeout=120) == 0
        r = admin.round(1)
        assert r.state == federation_pb2.ROUND_STATE_PUBLISHED, (r.close_reason, r.failure_reason)
        assert sorted(p.site_id for p in r.participants if p.accepted) == ["site-a", "site-b"]
        assert not any(p.dropped for p in r.participants)
        assert r.samples == 2 * SAMPLES
        site_a = admin.sites()["site-a"]
        assert site_a.timings.load_seconds >= 20  # what the operator sees: why the site was slow
        assert site_a.timings.train_seconds > 0 and site_a.timings.upload_seconds > 0
    assert "dropped from round" not in daemon.log()


# ---------------------------------------------------------------- defect 2: an aggregator restart


def wide_model(demo: Path, out: Path) -> Path:
    """The demo's tokenizer with a wider Llama: ~25 MB of fp32 weights, so an upload spans several
    of the aggregator's commits (at shard ends past 8 MiB)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    shutil.copytree(demo / "model", out)
    for weights in out.glob("*.safetensors"):
        weights.unlink()
    config = AutoConfig.from_pretrained(out)
    config.hidden_size, config.intermediate_size = 320, 864
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    return out


# In the worker's process: the first try of the upload sends 10 MiB at full speed, then a chunk
# every 2 s (a slow link), so the daemon can be killed with the upload partly committed.
SLOW_LINK = """
import time, client.transfer as t
real = t.payload_chunks
def slow(payload, header, start):
    for i, chunk in enumerate(real(payload, header, start)):
        if start == 0 and i >= 10:
            time.sleep(2.0)
        yield chunk
t.payload_chunks = slow
"""


@pytest.mark.slow
def test_a_worker_rides_out_an_aggregator_killed_mid_upload_and_its_upload_counts_once(
    tmp_path: Path, demo: Path, processes: list[WorkerProcess | Daemon]
) -> None:
    model = wide_model(demo, tmp_path / "wide")
    config, target = daemon_config(
        tmp_path, model, ["site-a"], interval_s=0.5, missed_beats=20, min_sites_to_open=1
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    processes.append(daemon)
    daemon.start(target)
    worker = WorkerProcess(
        tmp_path, target, "site-a", model, demo / "data" / "site-a.jsonl", patch=SLOW_LINK,
        flags=("--max-wait-s", "90"),
    )  # fmt: skip
    processes.append(worker)
    spool = tmp_path / "state" / "spool"
    with ScriptedSite(target, "site-a") as site:

        def committed_mid_upload() -> tuple[str, int] | None:
            for part in spool.glob("*.part"):
                reply = site.offset(part.stem)
                if reply.committed_offset >= 8 * MIB and not reply.complete:
                    return part.stem, reply.committed_offset
            return None

        upload_id, committed = wait_for(committed_mid_upload, timeout=90, what="the upload's first commit")
        daemon.kill()
        time.sleep(5)  # the aggregator is down for 5 s, then comes back: same state, same port
        daemon.start(target)
        assert worker.wait(timeout=90) == 0
    log = worker.log()
    assert "Traceback" not in log
    assert f"[upload] resuming {upload_id} at offset {committed} of " in log
    assert "[upload] UNAVAILABLE" in log or "[upload offset] UNAVAILABLE" in log  # a line per wait
    total = int(log.split("; sent ")[1].split()[0])  # the payload's size, once the worker is done
    with AdminClient(target) as admin:
        r = admin.round(1)
        assert r.state == federation_pb2.ROUND_STATE_PUBLISHED, (r.close_reason, r.failure_reason)
        assert [p.site_id for p in r.participants if p.accepted] == ["site-a"]
        assert r.samples == SAMPLES  # counted once
        assert r.bytes_in == total


# ---------------------------------------------------------------- eviction, remote diagnosis


@pytest.mark.slow
def test_a_worker_started_before_its_aggregator_reports_it_and_exits_1_when_evicted(
    tmp_path: Path, demo: Path, processes: list[WorkerProcess | Daemon]
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    worker = WorkerProcess(
        tmp_path, target, "site-a", demo / "model", demo / "data" / "site-a.jsonl", flags=("--max-wait-s", "60")
    )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: "[join] UNAVAILABLE" in worker.log(), timeout=60, what="the worker's first Join")
    # Round 1 waits for a second site that never comes: the worker idles, beating.
    config = demo_config(
        tmp_path, demo, ["site-a", "site-b"], SPEC, rounds=1, listen=target, heartbeat_interval_s=0.2
    )
    with Aggregator(config) as agg, AdminClient(agg.target) as admin:

        def reported() -> admin_pb2.SiteStatus | None:
            s = admin.sites().get("site-a")
            return (
                s
                if s is not None and s.phase == federation_pb2.PHASE_IDLE and s.timings.load_seconds > 0
                else None
            )

        site = wait_for(reported, timeout=60, what="site-a idle, its load timed")
        # The warning it logged while the aggregator was away reaches the operator with the beats.
        assert "WARNING [join] UNAVAILABLE" in site.last_problem
        assert len(site.last_problem.encode()) <= MAX_PROBLEM_BYTES and "\n" not in site.last_problem
        admin.stub.EvictSite(
            admin_pb2.EvictSiteRequest(site_id="site-a", reason="test"), metadata=admin.metadata, timeout=10
        )
        assert worker.wait(timeout=30) == 1
    lines = [line for line in worker.log().splitlines() if "evicted" in line]
    assert (
        len(lines) == 1 and f"site site-a was evicted from the run by the aggregator at {target}" in lines[0]
    )
    assert "Traceback" not in worker.log()


@pytest.mark.slow
def test_a_worker_whose_aggregator_stays_away_gives_up_after_max_wait_s(
    tmp_path: Path, demo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = demo_config(tmp_path, demo, ["site-a", "site-b"], SPEC, rounds=1)
    agg = Aggregator(config)
    worker = demo_worker(agg.target, "site-a", demo, tmp_path, max_wait_s=2.0)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()))
    try:
        with caplog.at_level(logging.INFO):
            thread.start()
            with AdminClient(agg.target) as admin:
                wait_for(
                    lambda: (s := admin.sites().get("site-a")) and s.phase == federation_pb2.PHASE_IDLE,
                    timeout=60,
                )
            gone = time.monotonic()  # the first failure comes after this: the bound counts from it
            agg.stop()
            thread.join(timeout=60)
    finally:
        agg.stop()
    assert codes == [1]
    assert 2.0 <= time.monotonic() - gone < 30
    given_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(given_up) == 1 and "did not answer within 2 s" in given_up[0]
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[await] UNAVAILABLE")]
    assert waits, "one line per wait"


# ---------------------------------------------------------------- the aggregator's side of diagnosis


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    with Aggregator(make_config(tmp_path, ["a", "b"], round=RoundPolicy(min_sites_to_open=2))) as agg:
        yield agg


def _beat(site: ScriptedSite, **fields: object) -> federation_pb2.HeartbeatReply:
    request = federation_pb2.HeartbeatRequest(site_id=site.site_id, **fields)  # type: ignore[arg-type]
    return site.stub.Heartbeat(request, metadata=site.metadata, timeout=10)


def test_a_beat_s_problem_timings_and_steps_show_in_list_sites(aggregator: Aggregator) -> None:
    with ScriptedSite(aggregator.target, "a") as site, AdminClient(aggregator.target) as admin:
        site.join()
        timings = federation_pb2.PhaseTimings(load_seconds=41.5, sync_seconds=2.0, train_seconds=9.25)
        _beat(site, phase=federation_pb2.PHASE_TRAINING, step=3, total_steps=10, loss=1.5,
              last_problem="WARNING [fetch] UNAVAILABLE: connection refused", timings=timings)  # fmt: skip
        shown = admin.sites()["a"]
        assert (shown.step, shown.total_steps, shown.phase) == (3, 10, federation_pb2.PHASE_TRAINING)
        assert shown.last_problem == "WARNING [fetch] UNAVAILABLE: connection refused"
        assert shown.timings == timings
        # The latest beat is what shows: a problem cleared, a new timing.
        _beat(site, phase=federation_pb2.PHASE_IDLE, timings=replace_timing(timings, upload_seconds=3.0))
        shown = admin.sites()["a"]
        assert shown.last_problem == "" and shown.timings.upload_seconds == 3.0


def replace_timing(timings: federation_pb2.PhaseTimings, **values: float) -> federation_pb2.PhaseTimings:
    copy = federation_pb2.PhaseTimings()
    copy.CopyFrom(timings)
    for name, value in values.items():
        setattr(copy, name, value)
    return copy


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"last_problem": "x" * (MAX_PROBLEM_BYTES + 1)}, "last_problem"),
        ({"last_problem": "é" * (MAX_PROBLEM_BYTES // 2 + 1)}, "last_problem"),  # bytes, not characters
        ({"timings": federation_pb2.PhaseTimings(train_seconds=-1.0)}, "timings.train_seconds"),
        ({"timings": federation_pb2.PhaseTimings(load_seconds=math.inf)}, "timings.load_seconds"),
        ({"timings": federation_pb2.PhaseTimings(upload_seconds=math.nan)}, "timings.upload_seconds"),
    ],
)
def test_a_beat_with_a_problem_too_long_or_a_bad_timing_is_refused_naming_the_field(
    aggregator: Aggregator, fields: dict[str, object], named: str
) -> None:
    with ScriptedSite(aggregator.target, "a") as site, AdminClient(aggregator.target) as admin:
        site.join()
        _beat(site, last_problem="before")
        with pytest.raises(grpc.RpcError) as info:
            _beat(site, **fields)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and named in (info.value.details() or "")
        assert admin.sites()["a"].last_problem == "before"  # nothing of the refused beat was kept
        _beat(site, last_problem="y" * MAX_PROBLEM_BYTES)  # exactly the limit is taken
        assert admin.sites()["a"].last_problem == "y" * MAX_PROBLEM_BYTES


def test_an_evicted_site_waiting_for_a_round_is_refused_at_once(aggregator: Aggregator) -> None:
    with ScriptedSite(aggregator.target, "a") as site, AdminClient(aggregator.target) as admin:
        site.join()
        waiting: list[grpc.StatusCode] = []
        thread = threading.Thread(target=lambda: waiting.append(rpc_code(lambda: site.await_round(after=0))))
        thread.start()
        wait_for(lambda: thread.is_alive(), timeout=5)
        admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="a"), metadata=admin.metadata, timeout=10)
        started = time.monotonic()
        thread.join(timeout=10)
        assert waiting == [grpc.StatusCode.PERMISSION_DENIED]
        assert time.monotonic() - started < 5  # not at the end of the 10 s long poll
        assert rpc_code(lambda: site.await_round(after=0, wait_ms=100)) is grpc.StatusCode.PERMISSION_DENIED
        assert _beat(site).directive == federation_pb2.DIRECTIVE_STOP


# ---------------------------------------------------------------- the worker's side of diagnosis


def test_one_line_keeps_a_message_within_the_limit_at_a_character_boundary() -> None:
    assert one_line("a\n  b\tc\r\n") == "a b c"
    long = "é" * 400  # 800 bytes
    cut = one_line(long)
    assert len(cut.encode()) <= MAX_PROBLEM_BYTES and cut.endswith("…") and cut.startswith("é" * 250)
    assert one_line("x" * MAX_PROBLEM_BYTES) == "x" * MAX_PROBLEM_BYTES


def test_the_problem_log_keeps_the_last_warning_of_the_worker_s_loggers() -> None:
    status = Status()
    with ProblemLog(status):
        logging.getLogger("client.worker").info("[round 1] all well")
        assert status.problem == ""
        logging.getLogger("common.retry").warning("[upload] UNAVAILABLE: gone\nsecond line")
        assert status.problem.endswith("WARNING [upload] UNAVAILABLE: gone second line")
        logging.getLogger("transformers").warning("not ours")
        assert "not ours" not in status.problem
        try:
            raise ValueError("bad shape")
        except ValueError:
            logging.getLogger("client.worker").exception("[round 2] training failed")
        assert status.problem.endswith("ERROR [round 2] training failed: ValueError: bad shape")
    logging.getLogger("client.worker").warning("after the worker ended")
    assert "after" not in status.problem


def test_timed_phases_keep_the_latest_duration_even_of_a_failure() -> None:
    status = Status()
    with status.timed(Phase.SYNCING, "sync"):
        assert status.phase is Phase.SYNCING
        time.sleep(0.01)
    assert status.timings["sync"] >= 0.01
    with pytest.raises(RuntimeError), status.timed(Phase.UPLOADING, "upload"):
        raise RuntimeError("gave up")
    assert status.timings["upload"] > 0
    with pytest.raises(ValueError), status.timed(Phase.IDLE, "idle"):
        pass


def test_the_heartbeat_carries_what_the_worker_logged(aggregator: Aggregator) -> None:
    with ScriptedSite(aggregator.target, "a") as site, AdminClient(aggregator.target) as admin:
        site.join()
        status = Status(phase=Phase.LOADING)
        beats = Heartbeat(site.stub, site.metadata, "a", status, interval_s=0.1)
        with ProblemLog(status):
            beats.start()
            wait_for(lambda: admin.sites()["a"].phase == federation_pb2.PHASE_LOADING, timeout=10)
            logging.getLogger("client.worker").warning("[round 1] upload not taken: round 1 is published")
            with status.timed(Phase.TRAINING, "train"):
                time.sleep(0.01)

            def shown() -> admin_pb2.SiteStatus | None:
                s = admin.sites()["a"]
                return s if "upload not taken" in s.last_problem and s.timings.train_seconds > 0 else None

            wait_for(shown, timeout=10)
            beats.stop()
        admin.stub.EvictSite(admin_pb2.EvictSiteRequest(site_id="a"), metadata=admin.metadata, timeout=10)
        beats.beat(timeout=5)
        assert status.evicted == "evicted" and status.stop.is_set() and not status.finished


class Failed(grpc.RpcError):
    """What a failed call raises: a status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "status", "exit_code", "says"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            Status(),
            1,
            "gave up: the aggregator at agg:1 did not answer within 60 s",
        ),
        (grpc.StatusCode.PERMISSION_DENIED, Status(), 1, "site s was refused by the aggregator at agg:1"),
        (grpc.StatusCode.UNAVAILABLE, Status(evicted="evicted"), 1, "site s was evicted from the run by"),
        (grpc.StatusCode.UNAUTHENTICATED, Status(), 1, "refuses the token of site s"),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Status(),
            1,
            "too busy, or the request is over one of its limits",
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, Status(), 1, "refused a call: INVALID_ARGUMENT: why"),
        (grpc.StatusCode.UNAVAILABLE, Status(finished=True), 0, ""),
    ],
)
def test_a_worker_that_ends_on_a_failed_call_says_why_in_one_line(
    caplog: pytest.LogCaptureFixture, code: grpc.StatusCode, status: Status, exit_code: int, says: str
) -> None:
    with caplog.at_level(logging.INFO, logger="client.worker"):
        got = exits.gave_up(
            Failed(code, "why\nand more"), status, site_id="s", aggregator="agg:1", max_wait_s=60
        )
    assert got == exit_code
    lines = [r.getMessage() for r in caplog.records]
    if says:
        assert len(lines) == 1 and says in lines[0] and "\n" not in lines[0]
    else:
        assert lines == []
