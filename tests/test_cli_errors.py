"""Every error path of ``gdfed`` found so far: one line naming the flag, file or setting, and the exit code.

Each case runs ``python -m common.cli`` in a fresh interpreter, as an operator would, with the files
it names written first; it must exit with the documented code (docs/operator.md, "Exit codes and
errors": 2 for usage and configuration, 1 for failures at run time), print exactly one non-empty
line holding the expected text, and no traceback. Cases whose command imports torch (serve, work,
init-state) take a couple of seconds each and are marked slow.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests.scripted import ADMIN_TOKEN, ROOT, AdminClient, Aggregator, make_config

slow = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    """``gdfed ARGV`` with ``files`` written under the test's folder; ``{name}`` is filled in (below)."""

    argv: Sequence[str]
    code: int
    expect: str
    files: Mapping[str, str] = field(default_factory=dict)


GOOD_TOKEN = {"admin.token": ADMIN_TOKEN + "\n"}
BAD_TOKEN = {"admin.token": "not-the-token\n"}
DATA = {"data.jsonl": '{"text": "one"}\n{"text": "two"}\n', "site.token": "token-a\n"}
WORK = ("work", "--aggregator", "127.0.0.1:{closed}", "--site", "a", "--model", "{tmp}/model")
WORK_FLAGS = ("--token-file", "{tmp}/site.token", "--state-dir", "{tmp}/w")
SERVE = ("serve", "--listen", "127.0.0.1:0", "--state-dir", "{tmp}/state")
STATUS = ("status", "--aggregator", "127.0.0.1:{closed}", "--timeout", "5")

CASES = [
    # ---------------------------------------------------------------- the command line itself
    pytest.param(Case([], 2, "the following arguments are required: COMMAND"), id="no-command"),
    pytest.param(Case(["launch"], 2, "invalid choice: 'launch'"), id="unknown-command"),
    pytest.param(Case(["status", "--timeout", "soon"], 2, "argument --timeout"), id="bad-number"),
    pytest.param(Case(["status", "--timeout", "0"], 2, "0 must be > 0"), id="zero-timeout"),
    pytest.param(Case(["admin"], 2, "required: ACTION"), id="admin-no-action"),
    pytest.param(Case(["admin", "evict"], 2, "required: site_id"), id="admin-evict-no-site"),
    pytest.param(Case(["demo", "launch", "{tmp}"], 2, "invalid choice: 'launch'"), id="demo-bad-action"),
    pytest.param(Case(["export"], 2, "the following arguments are required"), id="export-no-flags"),
    # ---------------------------------------------------------------- status and admin
    pytest.param(Case(STATUS, 2, "no admin token: give --admin-token-file"), id="status-no-token"),
    pytest.param(
        Case([*STATUS, "--admin-token-file", "{tmp}/none"], 2, "--admin-token-file {tmp}/none: no such file"),
        id="status-token-file-missing",
    ),
    pytest.param(
        Case(
            [*STATUS, "--admin-token-file", "{tmp}/t"], 2, "--admin-token-file {tmp}/t is empty", {"t": "\n"}
        ),
        id="status-token-file-empty",
    ),
    pytest.param(
        Case(
            ["admin", "pause", "--admin-token-file", "{tmp}/none"],
            2,
            "--admin-token-file {tmp}/none: no such file",
        ),
        id="admin-connection-flags-after-action",
    ),
    pytest.param(
        Case([*STATUS, "--admin-token-file", "{tmp}/admin.token"], 1, "UNAVAILABLE", GOOD_TOKEN),
        id="status-aggregator-down",
    ),
    pytest.param(
        Case(
            [
                "admin",
                "resume",
                "--aggregator",
                "127.0.0.1:{closed}",
                "--admin-token-file",
                "{tmp}/admin.token",
            ],
            1,
            "UNAVAILABLE",
            GOOD_TOKEN,
        ),
        id="admin-aggregator-down",
    ),
    pytest.param(
        Case(
            [*STATUS, "--admin-token-file", "{tmp}/admin.token", "--tls-ca", "{tmp}/ca.pem"],
            2,
            "--tls-ca {tmp}/ca.pem: no such file",
            GOOD_TOKEN,
        ),
        id="status-tls-ca-missing",
    ),
    pytest.param(
        Case(
            ["status", "--aggregator", "{target}", "--admin-token-file", "{tmp}/admin.token"],
            1,
            "UNAUTHENTICATED",
            BAD_TOKEN,
        ),
        id="status-wrong-token",
    ),
    # ---------------------------------------------------------------- serve: its configuration
    pytest.param(
        Case(["serve", "--config", "{tmp}/none.toml"], 2, "--config {tmp}/none.toml: no such file"),
        id="serve-config-missing",
        marks=slow,
    ),
    pytest.param(
        Case(
            ["serve", "--config", "{tmp}/a.toml"], 2, "not valid TOML", {"a.toml": "rounds = 2\nlisten = \n"}
        ),
        id="serve-config-not-toml",
        marks=slow,
    ),
    pytest.param(
        Case(
            ["serve", "--config", "{tmp}/a.toml"],
            2,
            "admin_token_file (in {tmp}/a.toml) {tmp}/missing.token: no such file",
            {"a.toml": 'admin_token_file = "missing.token"\n'},
        ),
        id="serve-config-names-missing-token-file",
        marks=slow,
    ),
    pytest.param(
        Case(
            ["serve", "--config", "{tmp}/a.toml"],
            2,
            "unknown settings ['lissen']",
            {"a.toml": 'lissen = "x"\n'},
        ),
        id="serve-config-unknown-setting",
        marks=slow,
    ),
    pytest.param(
        Case([*SERVE, "--tokens", "{tmp}/none"], 2, "--tokens {tmp}/none: no such file"),
        id="serve-tokens-missing",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*SERVE, "--tokens", "{tmp}/t"],
            2,
            "line 2: 'site-b' is not `site = token`",
            {"t": "a = x\nsite-b\n"},
        ),
        id="serve-tokens-bad-line",
        marks=slow,
    ),
    pytest.param(
        Case([*SERVE, "--admin-token-file", "{tmp}/t"], 2, "--admin-token-file {tmp}/t is empty", {"t": ""}),
        id="serve-admin-token-empty",
        marks=slow,
    ),
    pytest.param(
        Case([*SERVE, "--rounds", "-1"], 2, "rounds = -1: must be >= 0"), id="serve-bad-value", marks=slow
    ),
    pytest.param(
        Case([*SERVE, "--tls-cert", "{tmp}/c"], 2, "tls.key is not set", {"c": "x"}),
        id="serve-tls-half",
        marks=slow,
    ),
    pytest.param(
        Case([*SERVE, "--tls-cert", "{tmp}/c", "--tls-key", "{tmp}/k"], 2, "tls.cert {tmp}/c: no such file"),
        id="serve-tls-files-missing",
        marks=slow,
    ),
    pytest.param(
        Case([*SERVE, "--init-state", "{tmp}/none.st"], 2, "--init-state {tmp}/none.st: no such file"),
        id="serve-init-state-missing",
        marks=slow,
    ),
    pytest.param(Case(SERVE, 2, "holds no run yet: give --init-state"), id="serve-no-init-state", marks=slow),
    pytest.param(
        Case(["serve", "--listen", "127.0.0.1:abc", "--state-dir", "{tmp}/s"], 2, "must be host:port"),
        id="serve-listen-malformed",
        marks=slow,
    ),
    # ---------------------------------------------------------------- serve: what it runs on
    pytest.param(
        Case(
            ["serve", "--listen", "127.0.0.1:{busy}", "--state-dir", "{tmp}/s"],
            2,
            "port 127.0.0.1:{busy} is in use",
        ),
        id="serve-port-in-use",
        marks=slow,
    ),
    pytest.param(
        Case([*SERVE, "--metrics-listen", "127.0.0.1:{busy}"], 2, "metrics port 127.0.0.1:{busy} is in use"),
        id="serve-metrics-port-in-use",
        marks=slow,
    ),
    pytest.param(
        Case(
            ["serve", "--listen", "127.0.0.1:0", "--state-dir", "{locked}"],
            2,
            "{locked} is locked by pid {pid}",
        ),
        id="serve-state-dir-locked",
        marks=slow,
    ),
    pytest.param(
        Case(["serve", "--state-dir", "{tmp}/f"], 2, "state directory {tmp}/f: not a directory", {"f": ""}),
        id="serve-state-dir-is-a-file",
        marks=slow,
    ),
    # ---------------------------------------------------------------- work
    pytest.param(
        Case([*WORK, "--data", "{tmp}/data.jsonl"], 2, "give --token-file or set GDFED_SITE_TOKEN", DATA),
        id="work-no-token",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, "--data", "{tmp}/data.jsonl", "--token-file", "{tmp}/none"],
            2,
            "--token-file {tmp}/none: no such",
        ),
        id="work-token-file-missing",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, "--data", "{tmp}/data.jsonl", "--token-file", "{tmp}/t"],
            2,
            "token file {tmp}/t is empty",
            {**DATA, "t": "\n"},
        ),
        id="work-token-file-empty",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, *WORK_FLAGS, "--data", "{tmp}/none.jsonl"],
            2,
            "--data {tmp}/none.jsonl: no such file",
            DATA,
        ),
        id="work-data-missing",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, *WORK_FLAGS, "--data", "{tmp}/d.jsonl"],
            2,
            "{tmp}/d.jsonl:2: not JSON",
            {**DATA, "d.jsonl": '{"text": "fine"}\n{"text": "cut\n'},
        ),
        id="work-jsonl-not-json-on-line-2",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, *WORK_FLAGS, "--data", "{tmp}/d.jsonl"],
            2,
            "{tmp}/d.jsonl:4: each line must be a JSON object with 'text'",
            {**DATA, "d.jsonl": '{"text": "a"}\n\n{"prompt": "b", "response": "c"}\n{"txt": "d"}\n'},
        ),
        id="work-jsonl-wrong-keys",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, *WORK_FLAGS, "--data", "{tmp}/d.jsonl"],
            2,
            "{tmp}/d.jsonl:2: messages[1].role is 'robot'; must be one of system, user, assistant, tool",
            {
                **DATA,
                "d.jsonl": '{"text": "a"}\n{"messages": [{"role": "user", "content": "hi"}, '
                '{"role": "robot", "content": "beep"}]}\n',
            },
        ),
        id="work-jsonl-chat-role",
        marks=slow,
    ),
    pytest.param(
        Case(
            [*WORK, *WORK_FLAGS, "--data", "{tmp}/d.jsonl"],
            2,
            "{tmp}/d.jsonl holds no examples",
            {**DATA, "d.jsonl": "\n"},
        ),
        id="work-jsonl-empty",
        marks=slow,
    ),
    pytest.param(
        Case(
            [
                "work",
                "--aggregator",
                "{target}",
                "--site",
                "a",
                "--model",
                "{tmp}/model",
                "--data",
                "{tmp}/data.jsonl",
                "--token-file",
                "{tmp}/wrong.token",
                "--state-dir",
                "{tmp}/w",
            ],
            1,
            "check --token-file",
            {**DATA, "wrong.token": "not-the-token\n"},
        ),
        id="work-wrong-token",
        marks=slow,
    ),
    # ---------------------------------------------------------------- the other commands
    pytest.param(
        Case(
            ["init-state", "--model", "{tmp}/none", "--out", "{tmp}/i.st"],
            2,
            "{tmp}/none is not a model directory",
        ),
        id="init-state-no-model",
        marks=slow,
    ),
    pytest.param(
        Case(["demo", "init", "{tmp}/f"], 2, "{tmp}/f/model: not a directory", {"f": ""}),
        id="demo-init-onto-a-file",
        marks=slow,
    ),
]


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aggregator]:
    with Aggregator(make_config(tmp_path_factory.mktemp("agg"), ["a"])) as agg:
        yield agg


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture(scope="module")
def locked_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory whose lock this test process holds, as a running daemon would."""
    state = tmp_path_factory.mktemp("locked")
    fd = os.open(state / "LOCK", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield state
    os.close(fd)


def closed_port() -> int:
    """A port nothing listens on (bound a moment ago, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gdfed(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GDFED_ADMIN_TOKEN", "GDFED_SITE_TOKEN")}
    env.update(PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single non-empty line of the command's output (stdout and stderr); fails otherwise."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{output}"
    return lines[0]


@dataclass(frozen=True)
class Outcome:
    result: subprocess.CompletedProcess[str]
    expect: str  # the case's expected text, filled in


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every selected case of the table, run side by side: most pay a second or two importing torch."""
    selected: list[tuple[str, Case]] = [
        (item.callspec.id, cast(Case, item.callspec.params["case"]))
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is sys.modules[__name__]
        and item.originalname == "test_error_is_one_line_with_its_exit_code"
    ]

    def fill_for(case: Case, tmp: Path) -> dict[str, str]:
        fill = {"tmp": str(tmp), "closed": str(closed_port()), "pid": str(os.getpid())}
        words = " ".join([*case.argv, case.expect])
        for name, fixture in (("target", "aggregator"), ("busy", "busy_port"), ("locked", "locked_dir")):
            if "{" + name + "}" in words:
                value = request.getfixturevalue(fixture)
                fill[name] = value.target if isinstance(value, Aggregator) else str(value)
        return fill

    def run(case_id: str, case: Case, fill: dict[str, str]) -> Outcome:
        return Outcome(gdfed([word.format(**fill) for word in case.argv]), case.expect.format(**fill))

    jobs = []
    for case_id, case in selected:
        tmp = tmp_path_factory.mktemp(case_id)
        for name, text in case.files.items():
            (tmp / name).write_text(text)
        jobs.append((case_id, case, fill_for(case, tmp)))  # fixtures set up here, in this thread
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case_id: pool.submit(run, case_id, case, fill) for case_id, case, fill in jobs}
    return {case_id: future.result() for case_id, future in futures.items()}


@pytest.mark.parametrize("case", CASES)
def test_error_is_one_line_with_its_exit_code(
    case: Case, outcomes: dict[str, Outcome], request: pytest.FixtureRequest
) -> None:
    outcome = outcomes[request.node.callspec.id]
    line = one_line(outcome.result)
    assert outcome.result.returncode == case.code, line
    assert outcome.expect in line
    assert line.startswith("gdfed") or case.code == 1, line  # a worker's refusal is a log line


def test_rpc_error_at_the_top_is_one_line_naming_the_aggregator() -> None:
    """What a worker's call dumped as _InactiveRpcError: a real failed call, classified."""
    import grpc

    from common import cli

    target = f"127.0.0.1:{closed_port()}"
    with grpc.insecure_channel(target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/gradualdiff.v1.Federation/Join"
        )
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=5)
    code, message = cli.classify(info.value, argparse.Namespace(aggregator=target))
    assert code == cli.EXIT_RUNTIME
    assert message.startswith(f"aggregator {target}: UNAVAILABLE: ")
    assert message.endswith("is the aggregator running, and is --aggregator its address?")
    assert "\n" not in message


def test_debug_prints_the_traceback_then_the_line(tmp_path: Path) -> None:
    result = gdfed(["--debug", "status", "--admin-token-file", str(tmp_path / "none")])
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "UsageError" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"gdfed status: --admin-token-file {tmp_path / 'none'}: no such file; write the admin token on its first line"
    )


def test_admin_takes_connection_flags_before_and_after_the_action(
    aggregator: Aggregator, tmp_path: Path
) -> None:
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    paused = gdfed(["admin", "pause", "--aggregator", aggregator.target, "--admin-token-file", str(token)])
    assert paused.returncode == 0, paused.stderr
    with AdminClient(aggregator.target) as admin:
        assert admin.status().paused
        resumed = gdfed(
            ["admin", "--aggregator", aggregator.target, "resume", "--admin-token-file", str(token)]
        )
        assert resumed.returncode == 0, resumed.stderr
        assert not admin.status().paused


def test_status_into_a_closed_pipe_stops_quietly(aggregator: Aggregator, tmp_path: Path) -> None:
    """``gdfed status | head``: the reader went away before the table was written."""
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "GDFED_ADMIN_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "status", "--aggregator", aggregator.target, "--admin-token-file", str(token)],
        cwd=ROOT,
        env=dict(env, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # long before the interpreter has started: its first write meets a closed pipe
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141, stderr
    assert stderr == b""
