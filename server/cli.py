"""``gdfed serve``: run the aggregator daemon."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with every setting; flags override it")
    parser.add_argument("--listen", help="host:port to serve on (default 127.0.0.1:50051)")
    parser.add_argument("--state-dir", type=Path, help="where the run's records and files live")
    parser.add_argument("--init-state", type=Path, help="safetensors file: the trainable state at round 0")
    parser.add_argument("--run-id", help="name of a new run (default: generated)")
    parser.add_argument("--rounds", type=int, help="rounds to run; 0 = until stopped")
    parser.add_argument(
        "--min-sites", type=int, dest="round.min_sites", help="uploads a round needs (0 = all)"
    )
    parser.add_argument(
        "--min-sites-to-open",
        type=int,
        dest="round.min_sites_to_open",
        help="a round opens once this many sites are alive (default 0: at once)",
    )
    parser.add_argument("--min-sample-fraction", type=float, dest="round.min_sample_fraction")
    parser.add_argument("--deadline", type=int, dest="round.deadline_s", help="seconds a round stays open")
    parser.add_argument("--tokens", dest="site_tokens_file", help="file of `site = token` lines")
    parser.add_argument("--admin-token-file", help="file holding the admin token (or set GDFED_ADMIN_TOKEN)")
    parser.add_argument("--heartbeat-interval", type=float, dest="heartbeat_interval_s")
    parser.add_argument("--missed-beats", type=int)
    parser.add_argument(
        "--optimizer", dest="optimizer.name", help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad"
    )
    parser.add_argument("--server-lr", type=float, dest="optimizer.lr")
    parser.add_argument(
        "--max-concurrent-uploads", type=int, help="uploads streamed at once; more wait (default 4)"
    )
    parser.add_argument(
        "--stream-window-bytes",
        type=int,
        help="HTTP/2 window per received stream (default 4 MiB); a stream's rate is at most window / RTT",
    )
    parser.add_argument("--metrics-listen", help="host:port for the Prometheus endpoint")
    parser.add_argument("--tls-cert", type=Path, dest="tls.cert")
    parser.add_argument("--tls-key", type=Path, dest="tls.key")
    parser.add_argument(
        "--tls-client-ca", type=Path, dest="tls.client_ca", help="require client certificates (mTLS)"
    )
    parser.add_argument(
        "--tls-bind-site-to-cert",
        action="store_const",
        const=True,
        dest="tls.bind_site_to_cert",
        help="take a site's token only with a client certificate whose CN or SAN is the site id",
    )
    tree = parser.add_argument_group(
        "intermediate of a tree", "serve as an aggregator to its sites and a site to a parent aggregator"
    )
    tree.add_argument(
        "--upstream", dest="upstream.address", metavar="HOST:PORT", help="the parent aggregator"
    )
    tree.add_argument(
        "--upstream-site-id", dest="upstream.site_id", help="this aggregator's site id at the parent"
    )
    tree.add_argument(
        "--upstream-token-file", type=Path, dest="upstream.token_file", help="its site token at the parent"
    )
    tree.add_argument(
        "--upstream-ca", type=Path, dest="upstream.ca", help="TLS to the parent, trusting this CA"
    )
    tree.add_argument(
        "--upstream-cert", type=Path, dest="upstream.cert", help="mutual TLS: this client certificate"
    )
    tree.add_argument("--upstream-key", type=Path, dest="upstream.key", help="mutual TLS: its key")
    tree.add_argument(
        "--forward-margin",
        type=float,
        dest="upstream.forward_margin_s",
        help="seconds before the parent's deadline at which this aggregator closes and forwards "
        "(default: 10%% of the parent's round)",
    )


def run(args: argparse.Namespace) -> int:
    from server.app import serve
    from server.config_file import load_config

    # The top level's flags (gdfed -v, --debug) are not settings.
    top = ("config", "command", "verbose", "debug", "_module")
    overrides = {k: v for k, v in vars(args).items() if k not in top}
    return serve(load_config(args.config, overrides))
