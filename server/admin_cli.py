"""``gdfed status``: the run, its rounds and its sites, as a table, as JSON, or live (--watch).

The JSON document (``--json``) is built in ``server.status_json``; the table here shows the same
values: a round not published yet with its uploads so far, "-" where there is no value yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def add_connection_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The flags that say where the aggregator is and how to reach it.

    ``defaults=False`` on a subcommand's parser (``gdfed admin pause``): there a flag is taken when
    given but has no default, which would overwrite the one given before the subcommand.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--aggregator", default=default("127.0.0.1:50051"), help="host:port of the aggregator"
    )
    parser.add_argument(
        "--admin-token-file",
        default=default(None),
        help="file holding the admin token (default: $GDFED_ADMIN_TOKEN)",
    )
    parser.add_argument("--tls-ca", default=default(None), help="CA certificate: connect with TLS")
    parser.add_argument("--tls-cert", default=default(None), help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=default(None), help="client key (mutual TLS)")
    parser.add_argument(
        "--timeout", type=_seconds, default=default(10.0), help="seconds per call (default 10)"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", action="store_true", help="print events as they happen (Ctrl-C to stop)")
    parser.add_argument(
        "--round",
        type=int,
        help="details of one round: each site's upload, losses, tokens/s, step time, peak memory",
    )
    parser.add_argument("--rounds", type=int, default=10, help="how many recent rounds to list")
    parser.add_argument("--site", help="details of one site: beat, phase, progress, last problem, timings")


def connect(args: argparse.Namespace) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """An Admin stub and the call metadata.

    Raises:
        UsageError: No admin token, or a token file that is missing or empty.
    """
    from pathlib import Path

    from common.channel import ChannelConfig, auth_metadata, open_channel
    from common.pb.gradualdiff.v1 import admin_pb2_grpc

    token = admin_token(args.admin_token_file)
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


def admin_token(path: str | None) -> str:
    """The admin token: the first line of ``path``, else ``$GDFED_ADMIN_TOKEN``.

    Raises:
        UsageError: Neither is set, or the file is missing, unreadable or empty.
    """
    import os
    from pathlib import Path

    from common.cli import UsageError

    todo = "write the admin token on its first line"
    if not path:
        token = os.environ.get("GDFED_ADMIN_TOKEN", "").strip()
        if not token:
            raise UsageError("no admin token: give --admin-token-file FILE or set GDFED_ADMIN_TOKEN")
        return token
    try:
        lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except FileNotFoundError:
        raise UsageError(f"--admin-token-file {path}: no such file; {todo}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"--admin-token-file {path}: cannot read it ({reason}); {todo}") from None
    if not lines or not lines[0].strip():
        raise UsageError(f"--admin-token-file {path} is empty; {todo}")
    return lines[0].strip()


def run(args: argparse.Namespace) -> int:
    import grpc

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
    if args.site is not None:
        return show_site(args.site, sites, as_json=args.json)
    if args.json:
        from server.status_json import status_document

        print(json.dumps(status_document(status, rounds, sites), indent=2))
        return 0
    print(render(status, rounds, sites))
    return 0


def _ms(value: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(value / 1000)) if value else "-"


def _mb(value: int) -> str:
    return f"{value / 1e6:,.1f}"


def _num(value: float | None, fmt: str) -> str:
    """A measured value, or "-" where there is none yet."""
    return "-" if value is None else format(value, fmt)


def render_run(status: Any) -> list[str]:
    """The run's line, then why it waits (if it does): what ``gdfed admin`` prints after a change."""
    from server.status_json import ROUND_STATES, word

    total = status.total_rounds or "∞"
    flags = " (paused)" if status.paused else (" (finished)" if status.finished else "")
    state = word(ROUND_STATES, status.current_state) or "not started"
    deadline = f"{status.round_deadline_s}s" if status.round_deadline_s else "none"
    lines = [
        f"run {status.run_id}{flags}: round {status.current_round}/{total} {state}, "
        f"sites {status.sites_alive} alive / {status.sites_known} known, "
        f"full fp32 model {_mb(status.full_model_bytes)} MB, quorum min_sites={status.quorum.min_sites or 'all'}"
        f" min_samples={status.quorum.min_sample_fraction:.0%} deadline={deadline}"
        f" min_sites_to_open={status.min_sites_to_open}"
    ]
    if status.dp_rounds:
        lines.append(
            f"privacy: ε={status.dp_epsilon:.4g} at δ={status.dp_delta:.3g} spent by {status.dp_rounds} "
            f"round(s) with noise (noise multiplier {status.dp_noise_multiplier:.4g})"
        )
    if status.waiting_reason:
        lines.append(f"waiting: {status.waiting_reason}")
    return lines


def render(status: Any, rounds: list[Any], sites: list[Any], now_ms: int | None = None) -> str:
    """The human table."""
    from server.status_json import (
        PHASES,
        ROUND_STATES,
        SITE_STATES,
        close_note,
        elapsed_s,
        is_live,
        measured,
        memory_note,
        participant_state,
        word,
    )

    now = int(time.time() * 1000) if now_ms is None else now_ms
    lines = [
        *render_run(status),
        "",
        f"{'round':>5} {'state':<12} {'sites':>5} {'samples':>8} {'MB in':>9} {'MB out':>9} {'up/full':>8} "
        f"{'opened':>8} {'took s':>7} {'agg s':>6} {'train':>7} {'eval':>7}  note",
    ]
    for r in rounds:
        accepted = sum(1 for p in r.participants if p.accepted)
        note = close_note(r) if r.close_reason or r.failure_reason else ("so far" if is_live(r) else "")
        lines.append(
            f"{r.round:>5} {word(ROUND_STATES, r.state) or '-':<12} {accepted:>2}/{len(r.participants):<2} "
            f"{r.samples:>8} {_mb(r.bytes_in):>9} {_mb(r.bytes_out):>9} "
            f"{_num(measured(r.ratio_to_full_model), '.3f'):>8} {_ms(r.opened_unix_ms):>8} "
            f"{_num(elapsed_s(r, now), '.1f'):>7} {_num(measured(r.aggregate_seconds), '.2f'):>6} "
            f"{_num(measured(r.mean_train_loss), '.4f'):>7} {_num(measured(r.mean_eval_loss), '.4f'):>7}  {note}"
        )
        if len(rounds) == 1 and r.aggregation_rule:
            rule = r.aggregation_rule + (
                f" (trimmed {r.trimmed_per_side} per side)" if r.trimmed_per_side else ""
            )
            dp = (
                f", DP noise std {r.dp_noise_std:.4g} (z={r.dp_noise_multiplier:.4g}, q={r.dp_sample_rate:.3g}), "
                f"ε so far {r.dp_epsilon:.4g}"
                if r.dp_noise_multiplier
                else ""
            )
            lines.append(f"      aggregated by {rule}{dp}")
        if len(rounds) == 1:
            for p in r.participants:
                lines.append(
                    f"      {p.site_id:<20} {participant_state(p):<9} samples={p.sample_count} "
                    f"MB={_mb(p.bytes_in)} train={_num(measured(p.train_loss), '.4f')} "
                    f"eval={_num(measured(p.eval_loss), '.4f')} "
                    f"upload={_num(measured(p.upload_seconds), '.2f')}s "
                    f"norm={_num(measured(p.norm), '.4g')} clip={_num(measured(p.clip_scale), '.3f')} "
                    f"tok/s={_num(measured(p.training.tokens_per_second), ',.0f')} "
                    f"step={_num(measured(p.training.step_seconds), '.3f')}s peak={memory_note(p.training)}"
                    + (" OUTLIER" if p.outlier else "")
                    + (f" partial sum of {p.sites} site(s)" if p.sites else "")
                )
    lines += render_tree(status)
    lines += [
        "",
        f"{'site':<20} {'state':<8} {'last beat':>9} {'rounds':>6} {'held':>5} {'phase':<10} {'step':>11} "
        f"{'loss':>8} {'tok/s':>8} {'peak memory':>20}  last problem",
    ]
    for s in sites:
        lines.append(
            f"{s.site_id:<20} {word(SITE_STATES, s.state) or '-':<8} {_ms(s.last_beat_unix_ms):>9} "
            f"{s.rounds_joined:>6} {s.held_round:>5} {word(PHASES, s.phase) or '-':<10} {_steps(s):>11} "
            f"{_num(measured(s.loss), '.4f'):>8} {_num(measured(s.training.tokens_per_second), ',.0f'):>8} "
            f"{memory_note(s.training):>20}  {_short(s.last_problem, 60)}"
        )
    return "\n".join(lines)


def render_tree(status: Any) -> list[str]:
    """The root of a tree: each intermediate and its last accepted partial sum (none: no lines)."""
    from server.status_json import SITE_STATES, word

    if not status.intermediates:
        return []
    lines = [
        "",
        f"{'intermediate':<20} {'state':<10} {'last beat':>9} {'round':>5} {'sites':>5} {'samples':>8} {'accepted':>8}",
    ]
    for i in status.intermediates:
        state = word(SITE_STATES, i.state) or ("-" if i.joined else "not joined")
        sent = [str(i.round), str(i.sites), str(i.samples)] if i.round else ["-", "-", "-"]
        lines.append(
            f"{i.site_id:<20} {state:<10} {_ms(i.last_beat_unix_ms):>9} {sent[0]:>5} {sent[1]:>5} "
            f"{sent[2]:>8} {_ms(i.accepted_unix_ms):>8}"
        )
    return lines


def _steps(site: Any) -> str:
    """``step/total_steps`` of the round the site trains; "-" before it reports any."""
    if not site.step and not site.total_steps:
        return "-"
    return f"{site.step}/{site.total_steps}" if site.total_steps else str(site.step)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_site(site: Any, now_ms: int | None = None) -> str:
    """One site in detail (``gdfed status --site S``): why it is slow or failing, without a shell on it."""
    from server.status_json import DEVICES, PHASES, SITE_STATES, measured, word

    now = int(time.time() * 1000) if now_ms is None else now_ms
    caps, t = site.capabilities, site.timings
    beat = "never"
    if site.last_beat_unix_ms:
        beat = f"{_ms(site.last_beat_unix_ms)} ({max(0, now - site.last_beat_unix_ms) / 1000:.1f} s ago)"
    timings = ", ".join(
        f"{name} {_num(measured(value), '.1f')}" + (" s" if measured(value) is not None else "")
        for name, value in (
            ("load", t.load_seconds),
            ("sync", t.sync_seconds),
            ("train", t.train_seconds),
            ("upload", t.upload_seconds),
        )
    )
    memory = f"{caps.memory_bytes / 2**30:.1f} GiB" if caps.memory_bytes else "-"
    return "\n".join(
        [
            f"site {site.site_id}: {word(SITE_STATES, site.state) or '-'}",
            f"  last beat     {beat}",
            f"  phase         {word(PHASES, site.phase) or '-'}",
            f"  step          {_steps(site)}",
            f"  loss          {_num(measured(site.loss), '.4f')}",
            f"  held round    {site.held_round} (rounds joined: {site.rounds_joined})",
            f"  capabilities  device {word(DEVICES, caps.device) or '-'}, memory {memory}, "
            f"lora rank {caps.lora_rank or '-'}, samples {caps.num_samples}",
            f"  last problem  {site.last_problem or '-'}",
            f"  timings       {timings}",
            f"  training      {_training(site.training)}",
        ]
    )


def _training(t: Any) -> str:
    """A heartbeat's training figures in words: throughput, step time, peak memory, ranks, tokens."""
    from server.status_json import measured, memory_note

    return (
        f"{_num(measured(t.tokens_per_second), ',.0f')} tokens/s, step {_num(measured(t.step_seconds), '.3f')} s, "
        f"peak {memory_note(t)}, ranks {t.ranks or '-'}, tokens {t.tokens or '-'}"
    )


def show_site(site_id: str, sites: list[Any], *, as_json: bool) -> int:
    """Print one site (as a ``gdfed.site/1`` document with ``as_json``); 1 if no such site joined."""
    from server.status_json import site_document

    found = [s for s in sites if s.site_id == site_id]
    if not found:
        known = ", ".join(sorted(s.site_id for s in sites)) or "none"
        print(f"gdfed status: site {site_id!r} has not joined this run (joined: {known})", file=sys.stderr)
        return 1
    print(json.dumps(site_document(found[0]), indent=2) if as_json else render_site(found[0]))
    return 0


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
