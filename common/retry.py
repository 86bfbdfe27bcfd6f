"""Retrying a call to the aggregator: exponential backoff with full jitter, bounded.

    try ─> ok: return
       └─> grpc.RpcError with a code in ``policy.retry_on``, bounds not spent, not stopped:
               wait uniform(0, min(max_delay, first_delay * multiplier ** k)), log it, try again
       └─> anything else: raise it, unchanged

Full jitter (each wait drawn from zero up to the exponential ceiling) keeps
sites that lost the aggregator at the same moment from coming back in step.
Two bounds, either or both: ``max_attempts`` (tries, the first included) and
``max_elapsed`` (seconds on ``clock`` from the first failure: no try starts
later, a wait is shortened to end by then). A policy with neither is refused,
so every loop ends. The bound counts from the first failure, not the first try,
so that it measures the wait for the aggregator and not the work: an upload
that streams for an hour before its connection drops still gets the whole
allowance. A call that reports ``progress`` (bytes moved) and made some since
the last failure starts its bounds again: it is moving, not stuck.

RESOURCE_EXHAUSTED means an aggregator too busy to take the call, or a request
over one of its limits (``LimitExceeded``), which no retry changes. An
aggregator that sends reasons tells them apart (``common.errors.CATALOG``): a
reason no retry helps is raised at once, a busy one is retried without being
counted. For a status without a reason the code alone cannot tell, so a code in
``limited_on`` gets at most ``limited_attempts`` tries however long the time bound.

A ``google.rpc.RetryInfo`` in the status (``retry_delay_of``: the aggregator
says when to come back, e.g. 5 s for a site over its share of long calls)
replaces the drawn wait: that delay plus up to a quarter more of jitter, still
ended by the time bound.

``sleep``, ``clock`` and ``rng`` are injected: tests run the loop without
waiting, and a worker's ``sleep`` wakes up when it is told to stop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from common.errors import CATALOG, reason_of, retry_delay_of, status_of

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The aggregator or the network is away, slow or busy: the same call may well succeed later.
TRANSIENT: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry a call, and on which status codes.

    Raises:
        ValueError: a negative or inconsistent setting, or no bound at all.
    """

    first_delay: float = 0.5  # the ceiling of the first wait, in seconds
    multiplier: float = 2.0  # each further wait's ceiling grows by this factor ...
    max_delay: float = 30.0  # ... up to this
    max_attempts: int = 0  # tries in all, the first included; 0 = no limit
    max_elapsed: float = 600.0  # seconds from the first failure after which no try starts; inf = no limit
    retry_on: frozenset[grpc.StatusCode] = TRANSIENT
    # Codes that may as well mean "never" (see the module docstring): tried at most limited_attempts times.
    limited_on: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
    limited_attempts: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError(f"first_delay {self.first_delay} must be > 0 and <= max_delay {self.max_delay}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier {self.multiplier} must be >= 1")
        if self.max_attempts < 0 or not self.max_elapsed > 0:
            raise ValueError("max_attempts must be >= 0 and max_elapsed > 0")
        if self.limited_attempts < 1:
            raise ValueError(f"limited_attempts {self.limited_attempts} must be >= 1")
        if self.max_attempts == 0 and math.isinf(self.max_elapsed):
            raise ValueError("a retry policy needs max_attempts or a finite max_elapsed")

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (0 = the wait after the first failure)."""
        # min() on the exponent first: multiplier ** retry overflows a float long before retries run out.
        steps = math.log(self.max_delay / self.first_delay, self.multiplier) if self.multiplier > 1 else 0
        return min(self.max_delay, self.first_delay * self.multiplier ** min(retry, math.ceil(steps)))


@dataclass(frozen=True, slots=True)
class Retrier:
    """A ``RetryPolicy`` with the means to wait: ``retrier.call("what", fn)`` runs ``fn`` until it succeeds.

    ``stopped`` is asked before each wait and after it: once it says yes the
    last error is raised instead of trying again (a worker told to stop).
    """

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], object] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    stopped: Callable[[], bool] = lambda: False

    def with_policy(self, policy: RetryPolicy) -> Retrier:
        """The same means of waiting under another policy."""
        return Retrier(policy, self.sleep, self.clock, self.rng, self.stopped)

    def call(self, what: str, fn: Callable[[], T], *, progress: Callable[[], int] | None = None) -> T:
        """``fn()``, retried while it raises a ``grpc.RpcError`` whose code the policy retries.

        Args:
            what: names the call in the log line written before each wait.
            fn: the call; it is called again as it is, so it resumes by itself if it must.
            progress: a count of the work ``fn`` has done so far (bytes moved), if it keeps one;
                a failure after the count grew starts the bounds again.

        Returns:
            What ``fn`` returned on the first try that did not raise.

        Raises:
            grpc.RpcError: a code the policy does not retry (at once), or the last one once a
                bound is spent or ``stopped`` says so. Anything else ``fn`` raises, at once.
        """
        policy = self.policy
        done = progress() if progress is not None else 0
        give_up_at = 0.0
        failed = False
        attempt = limited = 0  # failures since the bounds (re)started, and those of a limited code
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = status_of(exc)
                if code not in policy.retry_on or self.stopped():
                    raise
                now = self.clock()
                moved = progress() if progress is not None else 0
                if moved > done or not failed:
                    done, attempt, limited, failed = max(done, moved), 0, 0, True
                    give_up_at = now + policy.max_elapsed
                attempt += 1
                if code in policy.limited_on:
                    known = CATALOG.get(reason_of(exc))
                    if known is not None and not known.retryable:
                        raise  # over a limit: the same call fails again
                    limited += known is None
                if policy.max_attempts and attempt >= policy.max_attempts:
                    raise
                if limited >= policy.limited_attempts:
                    raise
                left = give_up_at - now
                if left <= 0:
                    raise
                hint = retry_delay_of(exc)
                if hint is not None:  # the aggregator's word; jittered up so sites do not return in step
                    delay = min(hint * (1 + 0.25 * self.rng.random()), left)
                else:
                    delay = min(self.rng.uniform(0, policy.ceiling(attempt - 1)), left)
                logger.warning(
                    "[%s] %s: %s; attempt %d failed, next in %.1fs (giving up %s)",
                    what,
                    code.name if code is not None else "no status",
                    _one_line(exc.details() if callable(getattr(exc, "details", None)) else str(exc)),
                    attempt,
                    delay,
                    "never" if math.isinf(left) else f"in {left:.1f}s",
                )
                self.sleep(delay)
                if self.stopped():
                    raise


def _one_line(text: object) -> str:
    # gRPC details may span lines (a remote traceback); a log line per wait must stay one line.
    return " ".join(str(text or "").split())[:300]
