"""Fair share of the daemon's RPC threads: per-site and total limits on long-lived calls.

gRPC's synchronous server runs every call on a thread of one pool; a call
that waits (an upload stream, a fetch, an AwaitRound long poll) holds its
thread the whole time. Without limits one site opening 70 idle streams took
all 64 threads, and the others' heartbeats and health checks queued until
they timed out. Here each site may hold at most ``per_site[kind]`` calls of a
kind, and all sites together at most ``total`` long-lived calls; the pool is
sized ``total + UNARY_THREADS``, so unary calls (heartbeats, joins, offsets,
health, admin) always find a thread. A call beyond a limit is refused at once
with RESOURCE_EXHAUSTED naming the limit and when to retry: reason SITE_BUSY
(the site's own limit) or AGGREGATOR_BUSY (the total), with a RetryInfo.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections import Counter
from collections.abc import Iterator, Mapping

from common.errors import LimitExceeded

# Threads of the RPC pool beyond the long-lived calls: heartbeats, joins, offsets, health checks and
# admin calls are short, and this many at once leaves none of them queued behind a long call.
UNARY_THREADS = 32
RETRY_HINT_S = 5


class CallKind(enum.Enum):
    """The long-lived Federation calls, each limited per site."""

    PUSH = "PushDelta streams"
    FETCH = "FetchDiff streams"
    POLL = "AwaitRound long polls"


def pool_size(total: int) -> int:
    """Threads the RPC pool needs so that ``total`` long calls leave room for the unary ones."""
    return total + UNARY_THREADS


class FairShare:
    """Counts the long-lived calls in flight, per site and kind and in all; refuses beyond the limits."""

    def __init__(self, per_site: Mapping[CallKind, int], total: int) -> None:
        self._per_site = dict(per_site)
        self._total = total
        self._lock = threading.Lock()
        self._held: Counter[tuple[str, CallKind]] = Counter()
        self._all = 0

    def in_flight(self, site: str | None = None) -> int:
        """Long calls held now, by ``site`` or (None) by all."""
        with self._lock:
            if site is None:
                return self._all
            return sum(n for (s, _), n in self._held.items() if s == site)

    @contextlib.contextmanager
    def slot(self, site: str, kind: CallKind) -> Iterator[None]:
        """Hold one call of ``kind`` for ``site`` while the block runs; LimitExceeded if over a limit."""
        limit = self._per_site[kind]
        key = (site, kind)
        with self._lock:
            if self._held[key] >= limit:
                raise LimitExceeded(
                    f"site {site!r} already has {self._held[key]} {kind.value} open; the limit is "
                    f"{limit} per site (max_{'polls' if kind is CallKind.POLL else 'streams'}_per_site): "
                    f"finish or cancel one, or retry in {RETRY_HINT_S} s",
                    field="site_id",
                    limit=limit,
                    reason="SITE_BUSY",
                    retry_s=RETRY_HINT_S,
                )
            if self._all >= self._total:
                raise LimitExceeded(
                    f"the aggregator holds {self._all} long calls, its limit (max_long_calls = "
                    f"{self._total}); retry in {RETRY_HINT_S} s",
                    field="max_long_calls",
                    limit=self._total,
                    reason="AGGREGATOR_BUSY",
                    retry_s=RETRY_HINT_S,
                )
            self._held[key] += 1
            self._all += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]
                self._all -= 1
