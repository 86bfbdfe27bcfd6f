"""glibc malloc settings for the processes that stream megabyte messages: the daemon and the worker.

Every gRPC message of a delta stream is about 1 MiB, and each one passes
through several short-lived buffers of that size (gRPC's slices, the Python
bytes, protobuf's arena). glibc's defaults handle that pattern badly:

- Freed chunks at the top of a heap beyond ``M_TRIM_THRESHOLD`` are handed
  back to the kernel, so the next message faults the same pages in again
  (one zeroed page per 4 KiB; on VMs that return freed pages to their host,
  a host-side fault too). Setting ``M_MMAP_THRESHOLD`` fixes the trim
  threshold at its 128 KiB default instead of letting it grow with the
  chunk sizes seen, so each 1 MiB message trims and refaults.
- One arena per RPC thread lets each hoard freed buffers, so the daemon's
  RSS would grow with the number of concurrent uploads.

Measured on the benchmark host, a 0.5 GiB stream of 1 MiB ``DeltaChunk``
messages over loopback (process CPU, median of 4): the receiver takes
0.86-1.3 CPU-s with the daemon's earlier settings (2 arenas, 4 MiB mmap
threshold), 0.71-0.89 s with glibc's defaults, 0.46-0.58 s with these;
constructing and serializing one 1 MiB message in a loop, 1.6 ms with the
defaults against 0.07 ms with these. The daemon's ingest of 16 concurrent
uploads (bench.aggregator) ran 30 % faster with the trim threshold than
without, 4 uploads 6-11 %, one upload the same; a whole K = 4 round
(bench.round_overhead) showed no difference beyond its noise
(docs/performance.md).
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 4 * 1024 * 1024  # above the 1 MiB message buffers: those come from the heaps
TRIM_THRESHOLD = 32 * 1024 * 1024  # free heap top kept per arena: a few dozen message buffers


def tune_malloc(*, arenas: int | None = None) -> bool:
    """Apply the settings above to this process; ``arenas`` caps glibc's arenas (the daemon: 2).

    Returns False where the C library is not glibc (nothing is changed there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    if arenas is not None:
        settings.insert(0, (M_ARENA_MAX, arenas))
    # Every setting is tried, even after one is refused.
    refused = [param for param, value in settings if mallopt(param, value) != 1]
    if refused:
        logger.warning("[malloc] mallopt refused parameter(s) %s; glibc's defaults stay for those", refused)
    return not refused
