"""Prometheus metrics of the aggregator, on their own registry and HTTP port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from server.run_admin import StatusView


class Metrics:
    """Counters fed through ``observe`` (``RunState.add_observer``), and gauges read at scrape time
    from ``status`` (``RunAdmin.status``)."""

    def __init__(self, status: Callable[[], StatusView]) -> None:
        self.registry = CollectorRegistry()
        self.bytes_in = Counter(
            "gdfed_bytes_in", "Compressed delta bytes accepted from sites", registry=self.registry
        )
        self.bytes_out = Counter(
            "gdfed_bytes_out", "Compressed bytes served by FetchDiff", registry=self.registry
        )
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
        rounds = Gauge("gdfed_round", "The current round number", registry=self.registry)
        rounds.set_function(lambda: status().run.current_round)
        alive = Gauge(
            "gdfed_sites_alive", "Sites heartbeating within their allowance", registry=self.registry
        )
        alive.set_function(lambda: float(status().sites_alive))
        self._http: Any = None

    def observe(self, name: str, value: float) -> None:
        if name == "bytes_in":
            self.bytes_in.inc(value)
        elif name == "bytes_out":
            self.bytes_out.inc(value)
        elif name == "upload_seconds":
            self.upload_seconds.observe(value)
        elif name == "aggregate_seconds":
            self.aggregate_seconds.observe(value)

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
