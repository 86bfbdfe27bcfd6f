"""``gdfed admin``: steer a running aggregator (pause, resume, close the round, evict, reload tokens, change policy)."""

from __future__ import annotations

import argparse
import sys

from server.admin_cli import add_connection_arguments, connect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions = []
    for name, help_text in (
        ("pause", "open no new round, close none by quorum or deadline"),
        ("resume", "undo pause"),
        ("close-round", "close the open round now with the uploads accepted so far"),
        ("reload-tokens", "re-read the site tokens file: added sites may join, removed ones are refused"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--reason", default="", help="recorded in the aggregator's log")
        actions.append(p)
    evict = sub.add_parser(
        "evict", help="remove a site from the run", description="remove a site from the run"
    )
    evict.add_argument("site_id")
    evict.add_argument("--reason", default="")
    retry = sub.add_parser(
        "retry-round",
        help="aggregate a failed round again from its accepted uploads",
        description="aggregate a failed round again from its accepted uploads (the latest round only)",
    )
    retry.add_argument("round", type=int)
    retry.add_argument("--reason", default="")
    policy = sub.add_parser(
        "policy", help="change the quorum or the deadline", description="change the quorum or the deadline"
    )
    policy.add_argument("--min-sites", type=int, help="uploads a round needs (0 = every participant)")
    policy.add_argument("--min-sample-fraction", type=float, help="fraction of participants' samples needed")
    policy.add_argument("--deadline", type=int, help="seconds a round stays open (0 = no deadline)")
    policy.add_argument("--min-sites-to-open", type=int, help="alive sites a round waits for before it opens")
    # `gdfed admin pause --admin-token-file F` as well as `gdfed admin --admin-token-file F pause`.
    for p in (*actions, evict, retry, policy):
        add_connection_arguments(p, defaults=False)


def run(args: argparse.Namespace) -> int:
    import grpc

    from common.pb.gradualdiff.v1 import admin_pb2, federation_pb2
    from server.admin_cli import render_run

    stub, metadata = connect(args)
    kw = {"metadata": metadata, "timeout": args.timeout}
    try:
        if args.action == "pause":
            reply = stub.Pause(admin_pb2.ControlRequest(reason=args.reason), **kw)
        elif args.action == "resume":
            reply = stub.Resume(admin_pb2.ControlRequest(reason=args.reason), **kw)
        elif args.action == "close-round":
            reply = stub.CloseRound(admin_pb2.ControlRequest(reason=args.reason), **kw)
        elif args.action == "reload-tokens":
            reply = stub.ReloadTokens(admin_pb2.ControlRequest(reason=args.reason), **kw)
        elif args.action == "retry-round":
            reply = stub.RetryRound(admin_pb2.RetryRoundRequest(round=args.round, reason=args.reason), **kw)
        elif args.action == "evict":
            reply = stub.EvictSite(admin_pb2.EvictSiteRequest(site_id=args.site_id, reason=args.reason), **kw)
        else:
            request = admin_pb2.SetRoundPolicyRequest()
            if args.deadline is not None:
                request.round_deadline_s = args.deadline
            if args.min_sites_to_open is not None:
                request.min_sites_to_open = args.min_sites_to_open
            if args.min_sites is not None or args.min_sample_fraction is not None:
                current = stub.GetStatus(admin_pb2.StatusRequest(), **kw).quorum
                request.quorum.CopyFrom(
                    federation_pb2.Quorum(
                        min_sites=current.min_sites if args.min_sites is None else args.min_sites,
                        min_sample_fraction=(
                            current.min_sample_fraction
                            if args.min_sample_fraction is None
                            else args.min_sample_fraction
                        ),
                    )
                )
            reply = stub.SetRoundPolicy(request, **kw)
    except grpc.RpcError as exc:
        print(f"gdfed admin {args.action}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print("\n".join(render_run(reply.status)))
    if reply.message:  # warnings: settings taken that the sites alive now cannot meet; reload's summary
        print(reply.message, file=sys.stderr)
    return 0
