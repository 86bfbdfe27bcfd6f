"""``gdfed token SITE``: a new random token for a site, and the line for the aggregator's tokens file.

The token goes to the site only; the line holds its hash (``sha256:…``), so the aggregator's file is
no credential. Add the line, then ``gdfed admin reload-tokens`` (or SIGHUP the daemon): no restart.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site_id", help="the site's id (1..64 characters of A-Z a-z 0-9 . _ -)")
    parser.add_argument(
        "--token-file",
        type=Path,
        help="also write the token to this new file, mode 0600 (for the site's worker --token-file)",
    )


def run(args: argparse.Namespace) -> int:
    from common.cli import UsageError
    from common.errors import InvalidArgument
    from server.records import check_id
    from server.tokens import hashed, new_token

    try:
        check_id(args.site_id, "site_id")
    except InvalidArgument as exc:
        raise UsageError(f"{exc.message}; choose another") from None
    token = new_token()
    if args.token_file is not None:
        try:  # O_EXCL: never overwrite a token some site may still hold
            fd = os.open(args.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc.strerror}; name a new file") from None
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
    print(f"# token for site {args.site_id}: give it to that site only (its worker's token file)")
    print(token)
    print("# add this line to the aggregator's tokens file, then `gdfed admin reload-tokens` (or SIGHUP):")
    print(f"{args.site_id} = {hashed(token)}")
    return 0
