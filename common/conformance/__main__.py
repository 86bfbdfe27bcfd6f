"""``python -m common.conformance --write`` regenerates the vectors; ``--check`` verifies them.

``--check`` decodes every valid vector to its stored tensors, refuses every
malformed one with its stated status, reason and stage, and re-encodes and
re-streams the valid ones (byte for byte when the installed zstd is the one
that made them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.conformance.check import check_all
from common.conformance.malformed import malformed_vectors
from common.conformance.valid import valid_vectors
from common.conformance.vectors import VECTORS_DIR, load, read_index, write, zstd_versions

NOTES = {
    "generator": "python -m common.conformance --write (check: --check)",
    "spec": "docs/protocol.md, section 'Conformance vectors'",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.conformance", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the vectors directory")
    action.add_argument("--check", action="store_true", help="verify the vectors against this implementation")
    parser.add_argument(
        "--dir", type=Path, default=VECTORS_DIR, help=f"vectors directory (default {VECTORS_DIR})"
    )
    args = parser.parse_args(argv)
    if args.write:
        vectors = valid_vectors() + malformed_vectors()
        # Nothing is written that this implementation does not itself decode or refuse as stated.
        problems, _ = check_all(vectors, zstd_versions())
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        files = write(args.dir, vectors, NOTES)
        total = sum(f.stat().st_size for f in files)
        print(f"wrote {len(vectors)} vectors, {len(files)} files, {total} bytes to {args.dir}")
        return 0
    vectors = load(args.dir)
    problems, skipped = check_all(vectors, read_index(args.dir)["zstd"])
    for line in skipped:
        print(f"note: {line}")
    for line in problems:
        print(line, file=sys.stderr)
    valid = sum(v.refusal is None for v in vectors)
    print(f"{valid} valid and {len(vectors) - valid} malformed vectors: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
