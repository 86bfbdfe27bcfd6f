"""The Prometheus endpoint: counters fed by real uploads, read over HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from server.app import metrics_of
from tests.scripted import AdminClient, Aggregator, ScriptedSite, make_config, random_delta, small_state


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_follow_a_round(tmp_path: Path) -> None:
    with Aggregator(make_config(tmp_path, ["a"])) as agg:
        metrics = metrics_of(agg.coordinator)
        port = metrics.serve("127.0.0.1:0")
        before = _scrape(port)
        assert before["gdfed_round"] == 1
        assert before["gdfed_bytes_in_total"] == 0
        with ScriptedSite(agg.target, "a") as site, AdminClient(agg.target) as admin:
            site.join()
            assert _scrape(port)["gdfed_sites_alive"] == 1
            spec = site.await_round(after=0)
            header, payload = site.header(
                random_delta(1, small_state()), round=spec.round, base=spec.base_round
            )
            assert site.push(header, payload).accepted
            admin.wait_round(1, 5)
        after = _scrape(port)
        assert after["gdfed_bytes_in_total"] == header.layout.total_bytes
        assert after["gdfed_upload_seconds_count"] == 1
        assert after["gdfed_aggregate_seconds_count"] == 1
        assert after["gdfed_round"] == 2
        metrics.stop()
