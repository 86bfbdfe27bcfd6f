"""Retrying a call to the aggregator: exponential backoff with full jitter, bounded.

    try ─> ok: return
       └─> grpc.RpcError with a code in ``policy.retry_on``, bounds not spent, not stopped:
               wait uniform(0, min(max_delay, first_delay * multiplier ** k)), log it, try again
       └─> anything else: raise it, unchanged

Full jitter (each wait drawn from zero up to the exponential ceiling) keeps
sites that lost the aggregator at the same moment from coming back in step.
Two bounds, either or both: ``max_attempts`` (tries, the first included) and
``max_elapsed`` (seconds on ``clock`` from the first try: no try starts later,
a wait is shortened to end by then). A policy with neither is refused, so every
loop ends. ``sleep``, ``clock`` and ``rng`` are injected: tests run the loop
without waiting, and a worker's ``sleep`` wakes up when it is told to stop.
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

from common.errors import status_of

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
    max_elapsed: float = 600.0  # seconds from the first try after which none starts; inf = no limit
    retry_on: frozenset[grpc.StatusCode] = TRANSIENT

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError(f"first_delay {self.first_delay} must be > 0 and <= max_delay {self.max_delay}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier {self.multiplier} must be >= 1")
        if self.max_attempts < 0 or not self.max_elapsed > 0:
            raise ValueError("max_attempts must be >= 0 and max_elapsed > 0")
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

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried while it raises a ``grpc.RpcError`` whose code the policy retries.

        Args:
            what: names the call in the log line written before each wait.
            fn: the call; it is called again as it is, so it resumes by itself if it must.

        Returns:
            What ``fn`` returned on the first try that did not raise.

        Raises:
            grpc.RpcError: a code the policy does not retry (at once), or the last one once a
                bound is spent or ``stopped`` says so. Anything else ``fn`` raises, at once.
        """
        policy = self.policy
        give_up_at = self.clock() + policy.max_elapsed
        attempt = 1
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = status_of(exc)
                if code not in policy.retry_on or self.stopped():
                    raise
                if policy.max_attempts and attempt >= policy.max_attempts:
                    raise
                left = give_up_at - self.clock()
                if left <= 0:
                    raise
                delay = min(self.rng.uniform(0, policy.ceiling(attempt - 1)), left)
                logger.warning(
                    "[%s] %s: %s; attempt %d failed, next in %.1fs",
                    what,
                    code.name,
                    exc.details(),
                    attempt,
                    delay,
                )
                self.sleep(delay)
                if self.stopped():
                    raise
                attempt += 1
