"""Building and running the aggregator's gRPC server.

``create_server`` is the seam tests use: it returns the server, the port it
bound (ask for port 0 to get a free one) and the coordinator, already
started. ``serve`` adds what a daemon needs: the state directory's lock, its
ports checked before anything is logged, signals, a clean shutdown that makes
every received byte durable, and the metrics endpoint.

What ``serve`` refuses to start on raises ``ConfigError`` with one line that
says why (port in use, state directory locked by pid N); ``gdfed`` prints it
and exits 2.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.malloc import tune_malloc
from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
from common.serde import chunk_from_wire
from server.auth import Authenticator
from server.config import ConfigError, ServerConfig
from server.coordinator import Coordinator
from server.decoding import add_service, serialized
from server.fair_share import CallKind, FairShare, pool_size
from server.metrics import Metrics
from server.servicers import AdminServicer, FederationServicer
from server.state_lock import StateDirLock
from server.tokens import SiteTokens
from server.upstream.bootstrap import prepare

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

    SO_REUSEPORT off: with gRPC's default a second daemon bound the same port without error and
    the kernel spread the connections between the two runs.
    """
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
    ]


def check_port_free(listen: str, flag: str, what: str = "port") -> None:
    """ConfigError unless ``listen`` (host:port, given as ``flag``) can be bound now; port 0 and
    unix: sockets pass. ``what`` names the port in the error ("metrics port").

    Checked before the daemon builds anything, so that a port in use is its only line of output:
    gRPC's own bind would fail too, but only after the run was loaded and logged, and with a line
    of its C core on stderr.
    """
    if listen.startswith("unix:"):
        return
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{flag} {listen!r}: must be host:port, e.g. 127.0.0.1:50051", field=flag)
    if int(port_text) == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{flag} {listen}: unknown host {host!r} ({exc.strerror})", field=flag) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As the real listener does: connections of a stopped daemon in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{what} {listen} is in use (another gdfed serve?); stop what holds it or "
                        f"choose another {flag}",
                        field=flag,
                    ) from None
                # Anything else (no IPv6 here, say) is left to the real bind to judge.


def create_server(config: ServerConfig) -> tuple[grpc.Server, int, Coordinator]:
    """A started aggregator: (server, bound port, coordinator)."""
    built = _build(config)
    _start(built)
    return built.server, built.port, built.coordinator


@dataclass(frozen=True, slots=True)
class _Built:
    """A server bound to its port but not started, and its coordinator."""

    config: ServerConfig
    server: grpc.Server
    port: int
    coordinator: Coordinator
    health: health.HealthServicer
    services: tuple[str, ...]
    tls: bool
    auth: Authenticator


def _build(config: ServerConfig) -> _Built:
    # Checked before the coordinator is built: a bad tokens file fails the start with its line.
    tokens = SiteTokens(config.site_tokens, config.site_tokens_files, config.admin_token)
    if config.upstream.enabled:
        # An intermediate: the parent's run id and spec; on the first start, the parent's state too.
        config = prepare(config)
    coordinator = Coordinator(config)
    auth = Authenticator(tokens, config.admin_token, bind_site_to_cert=config.tls.bind_site_to_cert)
    if not tokens.sites():
        logger.warning("no site tokens configured: every Federation call will be refused")
    if not config.admin_token:
        logger.warning("no admin token configured: the Admin service will refuse every call")
    # Long calls (uploads, fetches, long polls) hold a thread each, up to max_long_calls in all
    # (server.fair_share): the pool has room beyond them, so heartbeats and health checks never queue.
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=pool_size(config.max_long_calls), thread_name_prefix="gdfed-rpc"
        ),
        options=server_options(config),
    )
    share = FairShare(
        {
            CallKind.PUSH: config.max_streams_per_site,
            CallKind.FETCH: config.max_streams_per_site,
            CallKind.POLL: config.max_polls_per_site,
        },
        config.max_long_calls,
    )
    federation = FederationServicer(
        membership=coordinator.membership,
        intake=coordinator.intake,
        fetching=coordinator.fetching,
        training=config.training,
        max_concurrent_uploads=config.max_concurrent_uploads,
        auth=auth,
        fair_share=share,
    )
    admin = AdminServicer(
        admin=coordinator.admin, events=coordinator.state.events, auth=auth, version=package_version()
    )
    # Not the generated add_*_to_server: bytes that do not parse get INVALID_ARGUMENT (server.decoding).
    # PushDelta's chunks are parsed without copying their data and FetchDiff's arrive serialized
    # (common.serde's zero-copy framing, the same wire bytes as protobuf's).
    add_service(
        server,
        federation_pb2.DESCRIPTOR.services_by_name["Federation"],
        federation,
        requests={"PushDelta": chunk_from_wire},
        replies={"FetchDiff": serialized},
    )
    add_service(server, admin_pb2.DESCRIPTOR.services_by_name["Admin"], admin)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    try:
        credentials = _credentials(config)
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError:  # gRPC >= 1.5x raises where older versions returned port 0
        port = 0
    except BaseException:
        coordinator.stop()
        raise
    if port == 0:
        coordinator.stop()
        raise ConfigError(
            f"cannot listen on {config.listen} (port in use, or not an address of this machine); "
            "choose another --listen",
            field="listen",
        )
    return _Built(config, server, port, coordinator, health_servicer, services, credentials is not None, auth)


def _start(built: _Built) -> None:
    built.server.start()
    built.coordinator.start()
    for name in built.services[:2]:
        built.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    built.health.set("", health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "[serve] run=%s listening on %s (port %d, %s), state in %s",
        built.coordinator.run.run_id,
        built.config.listen,
        built.port,
        "TLS" if built.tls else "insecure",
        built.config.state_dir,
    )


def metrics_of(coordinator: Coordinator) -> Metrics:
    """Prometheus metrics fed by the run's measurements, gauges read from its status."""
    metrics = Metrics(coordinator.admin.status, version=package_version())
    coordinator.state.add_observer(metrics.observe)
    return metrics


def shutdown(server: grpc.Server, coordinator: Coordinator, grace: float = 5.0) -> None:
    """Stop taking calls, let running ones finish within ``grace``, then checkpoint."""
    coordinator.stop_rounds()  # no round decisions while calls (heartbeats too) are refused
    server.stop(grace).wait()
    coordinator.stop()


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT.

    Raises:
        ConfigError: A port in use, the state directory locked by another daemon (its pid named),
            or a setting found wrong while the run is loaded; nothing was served.
    """
    # Two arenas: one per RPC thread would each hoard freed message buffers, and RSS would grow with
    # the number of concurrent uploads.
    tune_malloc(arenas=2)
    check_port_free(config.listen, "--listen")
    if config.metrics_listen:
        check_port_free(config.metrics_listen, "--metrics-listen", "metrics port")
    # Before anything in the directory is read or written; held until this function returns (or the
    # process dies: the kernel releases it).
    with StateDirLock.acquire(config.state_dir):
        return _serve_locked(config)


def _serve_locked(config: ServerConfig) -> int:
    built = _build(config)
    metrics: Metrics | None = None
    metrics_port = 0
    started = False
    try:
        if config.metrics_listen:
            metrics = metrics_of(built.coordinator)
            # Bound before the daemon says it listens: a port in use fails the start, not later.
            metrics_port = _serve_metrics(metrics, config.metrics_listen)
        signals = _catch_signals()
        _start(built)
        started = True
        if metrics is not None:
            logger.info("[serve] metrics on %s (port %d)", config.metrics_listen, metrics_port)
        _wait_for_signal(built.coordinator, config, built.auth, signals)
    finally:
        if started:
            shutdown(built.server, built.coordinator)
        else:
            built.server.stop(None)
            built.coordinator.stop()
        if metrics is not None:
            metrics.stop()
    return 0


def _serve_metrics(metrics: Metrics, listen: str) -> int:
    try:
        return metrics.serve(listen)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            problem = "is in use; stop what holds it or choose another --metrics-listen"
        else:
            problem = f"cannot be bound ({exc.strerror or exc}); fix --metrics-listen"
        raise ConfigError(f"metrics port {listen} {problem}", field="metrics_listen") from None
    except ValueError:
        raise ConfigError(
            f"--metrics-listen {listen!r}: must be host:port, e.g. 127.0.0.1:9464", field="metrics_listen"
        ) from None


def reload_tokens(auth: Authenticator, why: str) -> bool:
    """Reload the site tokens, logging what changed or why the old ones stay; True if reloaded."""
    try:
        report = auth.reload()
    except ConfigError as exc:
        logger.error("[serve] %s: site tokens NOT reloaded, the old ones stay in force: %s", why, exc.message)
        return False
    logger.warning("[serve] %s: site tokens reloaded: %s", why, report.describe())
    return True


def _catch_signals() -> tuple[threading.Event, threading.Event]:
    """(stop, hangup): set by SIGTERM/SIGINT and by SIGHUP. Installed before the server starts, so
    a SIGHUP sent as soon as the port answers reloads instead of killing the daemon."""
    stop = threading.Event()
    hangup = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("[serve] signal %d: shutting down", signum)
        stop.set()

    def on_hangup(_signum: int, _frame: object) -> None:
        hangup.set()  # the reload reads files and logs: not in a signal handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    return stop, hangup


def _wait_for_signal(
    coordinator: Coordinator,
    config: ServerConfig,
    auth: Authenticator,
    signals: tuple[threading.Event, threading.Event],
) -> None:
    stop, hangup = signals
    announced = False
    while not stop.wait(0.5):
        if hangup.is_set():
            hangup.clear()
            reload_tokens(auth, "SIGHUP")
        if coordinator.run.finished and config.rounds and not announced:
            announced = True
            logger.info("[serve] the run finished; the aggregator keeps serving fetches until stopped")
