"""Prometheus metrics of the aggregator, on their own registry and HTTP port.

Names follow the Prometheus conventions: base units (bytes, seconds) in the name, before
``_total`` on counters; no ``_created`` series (they double the series count and no dashboard
here reads them); ``gdfed_build_info`` carries the version as a label, value 1. Labels take
values from fixed sets only (a refusal's or a failure's reason, ``server.reasons``; a round's
state), never a site id, so the number of series does not grow with the sites that come and go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.spec import RoundState
from server.reasons import FAILURE_REASONS, REFUSAL_REASONS
from server.run_admin import StatusView

__all__ = ["Metrics"]


class _StatusCollector(Collector):
    """Gauges read from one ``status()`` per scrape, so they agree with each other."""

    def __init__(self, status: Callable[[], StatusView]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        view = self._status()
        yield _gauge("gdfed_round", "The run's latest round (0 before round 1)", view.run.current_round)
        yield _gauge("gdfed_sites_alive", "Sites heartbeating within their allowance", view.sites_alive)
        yield _gauge("gdfed_sites_known", "Sites that ever joined, evicted ones included", view.sites_known)
        yield _gauge("gdfed_run_paused", "1 while an operator has paused the run", int(view.run.paused))
        state = GaugeMetricFamily(
            "gdfed_round_state",
            "1 for the state the latest round is in, 0 for the others",
            labels=["state"],
        )
        current = view.current.state if view.current is not None else None
        for member in RoundState:
            state.add_metric([member.name.lower()], 1.0 if member is current else 0.0)
        yield state


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


class Metrics:
    """Counters fed through ``observe`` (``RunState.add_observer``), and gauges read at scrape time
    from ``status`` (``RunAdmin.status``). ``version`` goes into ``gdfed_build_info``."""

    def __init__(self, status: Callable[[], StatusView], *, version: str = "dev") -> None:
        # Process-wide in prometheus_client (there is no registry option); the daemon has no other
        # registry whose _created series anyone reads.
        _disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        self.registry = CollectorRegistry()
        self.received_bytes = Counter(
            "gdfed_received_bytes",
            "Compressed bytes of accepted uploads",
            registry=self.registry,
        )
        self.sent_bytes = Counter(
            "gdfed_sent_bytes", "Compressed bytes served by FetchDiff", registry=self.registry
        )
        self.uploads_refused = Counter(
            "gdfed_uploads_refused",
            "Uploads refused at their header or rejected while received, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.rounds_failed = Counter(
            "gdfed_rounds_failed",
            "Rounds ended without a publish, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # every series from the start: rate() needs the zero
            self.uploads_refused.labels(reason=reason)
        for reason in FAILURE_REASONS:
            self.rounds_failed.labels(reason=reason)
        self.upload_seconds = Histogram(
            "gdfed_upload_seconds",
            "Seconds from the first chunk of an upload to its acceptance",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
            registry=self.registry,
        )
        self.aggregate_seconds = Histogram(
            "gdfed_aggregate_seconds",
            "Seconds to turn a closed round into a published one",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        info = Gauge(
            "gdfed_build_info",
            "The aggregator's version, as a label; always 1",
            ["version"],
            registry=self.registry,
        )
        info.labels(version=version).set(1)
        self.registry.register(_StatusCollector(status))
        self._http: Any = None

    def observe(self, name: str, value: float, label: str = "") -> None:
        """One measurement from ``RunState.observe``; unknown names are ignored, unknown reasons count as other."""
        if name == "bytes_in":
            self.received_bytes.inc(value)
        elif name == "bytes_out":
            self.sent_bytes.inc(value)
        elif name == "upload_seconds":
            self.upload_seconds.observe(value)
        elif name == "aggregate_seconds":
            self.aggregate_seconds.observe(value)
        elif name == "upload_refused":
            self.uploads_refused.labels(reason=label if label in REFUSAL_REASONS else "other").inc(value)
        elif name == "round_failed":
            self.rounds_failed.labels(reason=label if label in FAILURE_REASONS else "other").inc(value)

    def serve(self, listen: str) -> int:
        """Start the /metrics HTTP endpoint on ``host:port``; return the port."""
        host, _, port = listen.rpartition(":")
        self._http, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        """Close the /metrics endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
