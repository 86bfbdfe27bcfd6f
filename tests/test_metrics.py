"""The Prometheus endpoint: counters fed by a real aggregator, read over HTTP on 127.0.0.1."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc

from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from server.app import metrics_of, package_version
from server.config import RoundPolicy
from server.reasons import FAILURE_REASONS, REFUSAL_REASONS
from tests.scripted import (
    AdminClient,
    Aggregator,
    ScriptedSite,
    make_config,
    random_delta,
    rpc_code,
    small_state,
    with_nan,
)

# Every family the endpoint serves, as its TYPE line names it: a rename (or a new family) shows here, and
# docs/operator.md's "Metrics" lists the same names.
FAMILIES = {
    "gdfed_received_bytes_total": "counter",
    "gdfed_sent_bytes_total": "counter",
    "gdfed_uploads_refused_total": "counter",
    "gdfed_rounds_failed_total": "counter",
    "gdfed_upload_seconds": "histogram",
    "gdfed_aggregate_seconds": "histogram",
    "gdfed_build_info": "gauge",
    "gdfed_round": "gauge",
    "gdfed_round_state": "gauge",
    "gdfed_sites_alive": "gauge",
    "gdfed_sites_known": "gauge",
    "gdfed_run_paused": "gauge",
}


def _text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _scrape(port: int) -> dict[str, float]:
    return _samples(_text(port))


def _by_reason(values: dict[str, float], family: str) -> dict[str, float]:
    pattern = re.compile(rf'^{family}_total\{{reason="(\w+)"\}}$')
    return {m[1]: v for name, v in values.items() if (m := pattern.match(name))}


def test_metrics_follow_a_round(tmp_path: Path) -> None:
    with Aggregator(make_config(tmp_path, ["a"])) as agg:
        metrics = metrics_of(agg.coordinator)
        port = metrics.serve("127.0.0.1:0")
        try:
            text = _text(port)
            types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
            assert types == FAMILIES
            assert "_created" not in text
            before = _samples(text)
            assert before[f'gdfed_build_info{{version="{package_version()}"}}'] == 1
            assert before["gdfed_round"] == 1
            assert before['gdfed_round_state{state="open"}'] == 1
            assert sum(v for k, v in before.items() if k.startswith("gdfed_round_state{")) == 1
            assert before["gdfed_received_bytes_total"] == 0
            # Every reason is a series from the start, at zero.
            assert _by_reason(before, "gdfed_uploads_refused") == dict.fromkeys(REFUSAL_REASONS, 0)
            assert _by_reason(before, "gdfed_rounds_failed") == dict.fromkeys(FAILURE_REASONS, 0)
            with ScriptedSite(agg.target, "a") as site, AdminClient(agg.target) as admin:
                site.join()
                assert _scrape(port)["gdfed_sites_alive"] == 1
                spec = site.await_round(after=0)
                header, payload = site.header(
                    random_delta(1, small_state()), round=spec.round, base=spec.base_round
                )
                assert site.push(header, payload).accepted
                admin.wait_round(1)
                fetched = site.fetch(have=0)
            after = _scrape(port)
            assert after["gdfed_received_bytes_total"] == payload.layout.total_bytes
            assert after["gdfed_sent_bytes_total"] == sum(site.fetched_bytes) > 0 and len(fetched) == 1
            assert after["gdfed_upload_seconds_count"] == 1
            assert after["gdfed_aggregate_seconds_count"] == 1
            assert after["gdfed_round"] == 2
            assert after["gdfed_sites_known"] == 1
            assert _by_reason(after, "gdfed_uploads_refused") == dict.fromkeys(REFUSAL_REASONS, 0)
        finally:
            metrics.stop()


def test_refused_uploads_and_failed_rounds_are_counted_by_reason(tmp_path: Path) -> None:
    with Aggregator(make_config(tmp_path, ["a"])) as agg:
        metrics = metrics_of(agg.coordinator)
        port = metrics.serve("127.0.0.1:0")
        try:
            with ScriptedSite(agg.target, "a") as site, AdminClient(agg.target) as admin:
                site.join()
                spec = site.await_round(after=0)
                delta = random_delta(2, small_state())
                # Refused at the header: a worker a round ahead of the aggregator.
                ahead = site.header(delta, round=spec.round + 1, base=spec.base_round)
                assert rpc_code(lambda: site.push(*ahead)) is grpc.StatusCode.FAILED_PRECONDITION
                # Rejected while received: NaN found when its shard is decoded.
                nan = with_nan(*site.header(delta, round=spec.round, base=spec.base_round))
                assert rpc_code(lambda: site.push(*nan)) is grpc.StatusCode.INVALID_ARGUMENT
                # Closed by the operator with nothing accepted: the round fails.
                admin.stub.CloseRound(admin_pb2.ControlRequest(), metadata=admin.metadata, timeout=10)
                assert admin.wait_round(1).state == federation_pb2.ROUND_STATE_FAILED
            values = _scrape(port)
            refused = _by_reason(values, "gdfed_uploads_refused")
            assert refused == dict(dict.fromkeys(REFUSAL_REASONS, 0), wrong_round=1, invalid=1)
            failed = _by_reason(values, "gdfed_rounds_failed")
            assert failed == dict(dict.fromkeys(FAILURE_REASONS, 0), operator=1)
            assert values["gdfed_received_bytes_total"] == 0
        finally:
            metrics.stop()


def test_a_round_failed_at_its_deadline_is_counted(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"], round=RoundPolicy(deadline_s=1))
    with Aggregator(config) as agg:
        metrics = metrics_of(agg.coordinator)
        port = metrics.serve("127.0.0.1:0")
        try:
            with ScriptedSite(agg.target, "a") as site, AdminClient(agg.target) as admin:
                site.join()
                site.start_beating()
                assert admin.wait_round(1, timeout=10).state == federation_pb2.ROUND_STATE_FAILED
            failed = _by_reason(_scrape(port), "gdfed_rounds_failed")
            assert failed == dict(dict.fromkeys(FAILURE_REASONS, 0), deadline=1)
        finally:
            metrics.stop()


def test_the_operator_guide_lists_every_metric_and_reason() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operator.md").read_text()
    section = guide.partition("\n## Metrics\n")[2].partition("\n## ")[0]
    for name in FAMILIES:
        assert f"`{name}`" in section, name
    for reason in (*REFUSAL_REASONS, *FAILURE_REASONS):
        assert f"`{reason}`" in section, reason
