"""Building and running the aggregator's gRPC server.

``create_server`` is the seam tests use: it returns the server, the port it
bound (ask for port 0 to get a free one) and the coordinator, already
started. ``serve`` adds what a daemon needs: signals, a clean shutdown that
makes every received byte durable, and the metrics endpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.malloc import tune_malloc
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from server.auth import Authenticator
from server.config import ServerConfig
from server.coordinator import Coordinator
from server.metrics import Metrics
from server.servicers import AdminServicer, FederationServicer

logger = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return version("gradualdiff-fed")
    except PackageNotFoundError:
        return "dev"


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if tls.cert is None or tls.key is None:  # both or neither: TlsConfig checked it
        return None
    ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC channel arguments of the daemon's server.

    Fixed per-stream windows: with BDP probing on, gRPC grew the window of
    every connected upload stream, those waiting for an upload slot too, and
    the daemon buffered what they sent; at K = 16 its RSS varied from run to
    run between 0.8 and 2.8 GB for a 62 MB state (bench.aggregator --quick).
    Fixed 4 MiB windows held it at 0.75 GB with the same ingest rate.
    """
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", config.stream_window_bytes)]


def create_server(config: ServerConfig) -> tuple[grpc.Server, int, Coordinator]:
    """A started aggregator: (server, bound port, coordinator)."""
    coordinator = Coordinator(config)
    auth = Authenticator(config.site_tokens, config.admin_token)
    if not config.site_tokens:
        logger.warning("no site tokens configured: every Federation call will be refused")
    if not config.admin_token:
        logger.warning("no admin token configured: the Admin service will refuse every call")
    # Uploads hold a thread for their whole stream; leave room for heartbeats and admin calls beside them.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="gdfed-rpc"),
        options=server_options(config),
    )
    federation = FederationServicer(
        membership=coordinator.membership,
        intake=coordinator.intake,
        fetching=coordinator.fetching,
        training=config.training,
        max_concurrent_uploads=config.max_concurrent_uploads,
        auth=auth,
    )
    admin = AdminServicer(
        admin=coordinator.admin, events=coordinator.state.events, auth=auth, version=package_version()
    )
    federation_pb2_grpc.add_FederationServicer_to_server(federation, server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    credentials = _credentials(config)
    if credentials is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, credentials)
    if port == 0:
        coordinator.stop()
        raise OSError(f"could not bind {config.listen}")
    server.start()
    coordinator.start()
    for name in services[:2]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "[serve] run=%s listening on %s (port %d, %s), state in %s",
        coordinator.run.run_id,
        config.listen,
        port,
        "TLS" if credentials else "insecure",
        config.state_dir,
    )
    return server, port, coordinator


def metrics_of(coordinator: Coordinator) -> Metrics:
    """Prometheus metrics fed by the run's measurements, gauges read from its status."""
    metrics = Metrics(coordinator.admin.status)
    coordinator.state.add_observer(metrics.observe)
    return metrics


def shutdown(server: grpc.Server, coordinator: Coordinator, grace: float = 5.0) -> None:
    """Stop taking calls, let running ones finish within ``grace``, then checkpoint."""
    coordinator.stop_rounds()  # no round decisions while calls (heartbeats too) are refused
    server.stop(grace).wait()
    coordinator.stop()


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT."""
    # Two arenas: one per RPC thread would each hoard freed message buffers, and RSS would grow with
    # the number of concurrent uploads.
    tune_malloc(arenas=2)
    server, _, coordinator = create_server(config)
    metrics = metrics_of(coordinator) if config.metrics_listen else None
    if metrics is not None:
        port = metrics.serve(config.metrics_listen)
        logger.info("[serve] metrics on %s (port %d)", config.metrics_listen, port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("[serve] signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        if coordinator.run.finished and config.rounds:
            logger.info("[serve] the run finished; the aggregator keeps serving fetches until stopped")
            break
    stop.wait()
    shutdown(server, coordinator)
    if metrics is not None:
        metrics.stop()
    return 0
