"""Our site process (bench/round_overhead.py's) with the upload codec chosen on the command line.

    python -m bench.wan.site --codec bf16 <bench.round_overhead's site arguments>

bench/round_overhead.py encodes every upload with the default (exact) codec; the bf16 row of
the shaped-link table needs the same site with ``Codec(cast=Cast.BF16)``.
"""

from __future__ import annotations

import sys

from bench import round_overhead
from common.delta import Cast, Codec

CASTS = {"exact": Cast.NONE, "bf16": Cast.BF16}


def main() -> int:
    argv = sys.argv[1:]
    cast = Cast.NONE
    if "--codec" in argv:
        i = argv.index("--codec")
        cast = CASTS[argv[i + 1]]
        del argv[i : i + 2]
    # round_overhead.site_main calls Codec() for each upload; it gets this cast instead.
    setattr(round_overhead, "Codec", lambda: Codec(cast=cast))  # noqa: B010 - a swap, not an attribute of ours
    sys.argv = [sys.argv[0], *argv]
    return round_overhead.main()


if __name__ == "__main__":
    sys.exit(main())
