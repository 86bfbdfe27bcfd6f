"""``gdfed status``: the run, its rounds and its sites, as a table, as JSON, or live (--watch)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", default="127.0.0.1:50051", help="host:port of the aggregator")
    parser.add_argument(
        "--admin-token-file", help="file holding the admin token (default: $GDFED_ADMIN_TOKEN)"
    )
    parser.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    parser.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="client key (mutual TLS)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", action="store_true", help="print events as they happen (Ctrl-C to stop)")
    parser.add_argument("--round", type=int, help="details of one round")
    parser.add_argument("--rounds", type=int, default=10, help="how many recent rounds to list")


def connect(args: argparse.Namespace) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """An Admin stub and the call metadata."""
    from pathlib import Path

    from common.channel import ChannelConfig, auth_metadata, open_channel, read_token
    from common.pb.gradualdiff.v1 import admin_pb2_grpc

    token = read_token(args.admin_token_file, "GDFED_ADMIN_TOKEN")
    channel = open_channel(
        ChannelConfig(
            target=args.aggregator,
            token=token,
            ca=Path(args.tls_ca) if args.tls_ca else None,
            cert=Path(args.tls_cert) if args.tls_cert else None,
            key=Path(args.tls_key) if args.tls_key else None,
        )
    )
    return admin_pb2_grpc.AdminStub(channel), auth_metadata(token)


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from common.pb.gradualdiff.v1 import admin_pb2

    stub, metadata = connect(args)
    try:
        if args.watch:
            return _watch(stub, metadata)
        status = stub.GetStatus(admin_pb2.StatusRequest(), metadata=metadata, timeout=args.timeout)
        if args.round is not None:
            detail = stub.GetRound(
                admin_pb2.GetRoundRequest(round=args.round), metadata=metadata, timeout=args.timeout
            )
            rounds = [detail]
        else:
            rounds = list(
                stub.ListRounds(
                    admin_pb2.ListRoundsRequest(limit=args.rounds), metadata=metadata, timeout=args.timeout
                ).rounds
            )
        sites = list(
            stub.ListSites(admin_pb2.ListSitesRequest(), metadata=metadata, timeout=args.timeout).sites
        )
    except grpc.RpcError as exc:
        print(f"gdfed status: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        out = {
            "run": MessageToDict(status, preserving_proto_field_name=True),
            "rounds": [MessageToDict(r, preserving_proto_field_name=True) for r in rounds],
            "sites": [MessageToDict(s, preserving_proto_field_name=True) for s in sites],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(render(status, rounds, sites))
    return 0


def _state(value: int) -> str:
    from common.pb.gradualdiff.v1 import federation_pb2

    return federation_pb2.RoundState.Name(value).removeprefix("ROUND_STATE_").lower()  # type: ignore[arg-type]


def _ms(value: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(value / 1000)) if value else "-"


def _mb(value: int) -> str:
    return f"{value / 1e6:,.1f}"


def render(status: Any, rounds: list[Any], sites: list[Any]) -> str:
    """The human table."""
    from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2

    total = status.total_rounds or "∞"
    flags = " (paused)" if status.paused else (" (finished)" if status.finished else "")
    lines = [
        f"run {status.run_id}{flags}: round {status.current_round}/{total} {_state(status.current_state)}, "
        f"sites {status.sites_alive} alive / {status.sites_known} known, "
        f"full fp32 model {_mb(status.full_model_bytes)} MB, quorum min_sites={status.quorum.min_sites or 'all'}"
        f" min_samples={status.quorum.min_sample_fraction:.0%} deadline={str(status.round_deadline_s) + 's' if status.round_deadline_s else 'none'}",
        "",
        f"{'round':>5} {'state':<12} {'sites':>5} {'samples':>8} {'MB in':>9} {'MB out':>9} {'up/full':>8} "
        f"{'opened':>8} {'took s':>7} {'agg s':>6} {'train':>7} {'eval':>7}  note",
    ]
    for r in rounds:
        accepted = sum(1 for p in r.participants if p.accepted)
        took = (r.published_unix_ms or r.closed_unix_ms) - r.opened_unix_ms if r.opened_unix_ms else 0
        note = r.failure_reason or r.close_reason
        lines.append(
            f"{r.round:>5} {_state(r.state):<12} {accepted:>2}/{len(r.participants):<2} {r.samples:>8} "
            f"{_mb(r.bytes_in):>9} {_mb(r.bytes_out):>9} {r.ratio_to_full_model:>8.3f} {_ms(r.opened_unix_ms):>8} "
            f"{max(0, took) / 1000:>7.1f} {r.aggregate_seconds:>6.2f} {r.mean_train_loss:>7.4f} {r.mean_eval_loss:>7.4f}  {note}"
        )
        if len(rounds) == 1:
            for p in r.participants:
                mark = "accepted" if p.accepted else ("dropped" if p.dropped else "pending")
                lines.append(
                    f"      {p.site_id:<20} {mark:<9} samples={p.sample_count} MB={_mb(p.bytes_in)} "
                    f"train={p.train_loss:.4f} eval={p.eval_loss:.4f} upload={p.upload_seconds:.2f}s"
                )
    lines += [
        "",
        f"{'site':<20} {'state':<8} {'last beat':>9} {'rounds':>6} {'held':>5} {'phase':<10} {'step':>9} {'loss':>8}",
    ]
    for s in sites:
        state = admin_pb2.SiteState.Name(s.state).removeprefix("SITE_STATE_").lower()
        phase = federation_pb2.Phase.Name(s.phase).removeprefix("PHASE_").lower()
        lines.append(
            f"{s.site_id:<20} {state:<8} {_ms(s.last_beat_unix_ms):>9} {s.rounds_joined:>6} {s.held_round:>5} "
            f"{phase:<10} {s.step:>4}/{s.capabilities.num_samples:<4} {s.loss:>8.4f}"
        )
    return "\n".join(lines)


def _watch(stub: Any, metadata: tuple[tuple[str, str], ...]) -> int:
    from common.pb.gradualdiff.v1 import admin_pb2

    try:
        for event in stub.Watch(admin_pb2.WatchRequest(), metadata=metadata):
            site = f" site={event.site_id}" if event.site_id else ""
            detail = f" {event.detail}" if event.detail else ""
            print(f"{_ms(event.unix_ms)} round={event.round} {event.kind}{site}{detail}", flush=True)
    except KeyboardInterrupt:
        return 0
    return 0
