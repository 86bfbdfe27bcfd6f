"""The reliability campaign's CI version (``python -m bench.reliability.campaign --quick``).

Real daemon processes on 127.0.0.1: SIGKILLed mid-upload, after a round's last upload and during
recovery, with the fault proxy cutting, resetting and delaying connections; a full disk; the fuzz
loop over every Federation and Admin method; 64 concurrent sites; the malicious sites. Every
zero-goal of docs/reliability.json must hold. ``make reliability`` runs the full campaign.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from bench.reliability import campaign, report
from bench.reliability.proxy import FaultProxy, FaultRates

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # about 100 s alone on 2 cores; the margin is for a loaded machine
def test_the_quick_campaign_meets_every_goal(tmp_path: Path) -> None:
    result = campaign.run(tmp_path, campaign.QUICK, seed=16)
    assert report.failed_goals(result) == [], report.table(result)
    # The campaign did inject what it claims: kills at more than one moment, proxy faults, input.
    assert result["daemon_kills"] >= 2 and result["proxy_faults"] > 0, result
    assert result["updates_acknowledged"] >= 12 and result["disk_full_events"] >= 1, result
    assert result["fuzz_cases"] >= 1_500 and result["fuzz_methods"] == 18, result
    assert result["load_sites"] == 64 and result["upload_p99_s"] is not None, result


def test_the_goals_fail_the_command_when_any_zero_goal_is_missed() -> None:
    good = dict.fromkeys(report.ZERO_GOALS, 0) | {
        "fuzz_goal": 10,
        "fuzz_cases": 10,
        "load_goal": 64,
        "load_sites": 64,
    }
    assert report.failed_goals(good) == []
    for key in report.ZERO_GOALS:
        assert report.failed_goals(good | {key: 1}) == [f"{key} = 1 (goal 0)"]
    assert report.failed_goals(good | {"fuzz_cases": 9}) and report.failed_goals(good | {"load_sites": 63})


def test_the_proxy_cuts_a_connection_within_the_bytes_it_drew() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        received: list[int] = []
        ended = threading.Event()

        def sink() -> None:
            conn, _ = server.accept()
            with conn:
                total = 0
                while data := conn.recv(65536):
                    total += len(data)
            received.append(total)
            ended.set()

        threading.Thread(target=sink, daemon=True).start()
        proxy = FaultProxy(
            server.getsockname()[1], seed=1, rates=FaultRates(delay=0, cut=1.0, reset=0, max_offset=1000)
        )
        try:
            with socket.create_connection(("127.0.0.1", proxy.port)) as client, contextlib.suppress(OSError):
                for _ in range(100):
                    client.sendall(b"x" * 1000)  # fails once the proxy has cut the connection
            assert ended.wait(10), "the proxy never closed the daemon's side"
        finally:
            proxy.close()
    assert received[0] < 1000 and proxy.counts.cut == 1
