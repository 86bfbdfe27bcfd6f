"""How a worker ends: its exit code and the one log line that says why.

0  the run finished, or the worker did the rounds it was asked for
1  evicted (a heartbeat's STOP "evicted", or PERMISSION_DENIED with reason SITE_EVICTED on a
   call), refused, or the aggregator away for longer than --max-wait-s (start the worker again:
   it resumes)
2  the aggregator does not know this site's token (a configuration error)
"""

from __future__ import annotations

import logging

import grpc

from client.heartbeat import Status, one_line
from client.transfer import RESUMABLE
from common.errors import CATALOG, reason_of, status_of

logger = logging.getLogger("client.worker")

FINISHED, FAILED = 0, 1


def evicted(site_id: str, aggregator: str, word: str) -> int:
    """Log that ``site_id`` was evicted (the aggregator's ``word``, if it said more); the exit code."""
    said = "" if word in ("", "evicted") else f"; it said: {one_line(word, 200)}"
    logger.error(
        "[worker] site %s was evicted from the run by the aggregator at %s (an operator's "
        "`gdfed admin evict`)%s; exiting",
        site_id,
        aggregator,
        said,
    )
    return FAILED


def refused(site_id: str, aggregator: str, details: str) -> int:
    """Log that the aggregator refuses ``site_id`` (PERMISSION_DENIED); the exit code."""
    logger.error(
        "[worker] site %s was refused by the aggregator at %s (evicted, or not allowed this call): %s; "
        "exiting",
        site_id,
        aggregator,
        details,
    )
    return FAILED


def describe(error: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, on one line."""
    code = status_of(error)
    return f"{code.name if code is not None else 'no status'}: {_details(error)}"


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    return one_line((details() if callable(details) else None) or str(error), 300)


def gave_up(error: grpc.RpcError, status: Status, *, site_id: str, aggregator: str, max_wait_s: float) -> int:
    """The exit code, and its one log line, for a call to ``aggregator`` that failed for good."""
    code = status_of(error)
    details = _details(error)
    reason = reason_of(error)  # "" from an aggregator that sends none: the code decides alone
    if status.evicted or reason == "SITE_EVICTED":
        return evicted(site_id, aggregator, status.evicted or "evicted")
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return refused(site_id, aggregator, details)
    if status.finished:
        return FINISHED  # told to stop during a wait: the run is over
    name = code.name if code is not None else "no status"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        logger.error(
            "[worker] the aggregator at %s refuses the token of site %s (%s): check --token-file",
            aggregator,
            site_id,
            details,
        )
        return FAILED
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        logger.error("[worker] gave up: %s (%s: %s)", _exhausted(reason, aggregator), name, details)
    elif code in RESUMABLE:
        logger.error(
            "[worker] gave up: the aggregator at %s did not answer within %.0f s (%s: %s); "
            "start the worker again to resume where it stopped, or give a longer --max-wait-s",
            aggregator,
            max_wait_s,
            name,
            details,
        )
    else:
        logger.error("[worker] the aggregator at %s refused a call: %s: %s", aggregator, name, details)
    return FAILED


def _exhausted(reason: str, aggregator: str) -> str:
    """Why a RESOURCE_EXHAUSTED call failed for good, by its reason if the aggregator sent one."""
    known = CATALOG.get(reason)
    if known is None:
        return f"the aggregator at {aggregator} is too busy, or the request is over one of its limits"
    if known.retryable:
        return f"the aggregator at {aggregator} stayed busy or out of disk ({reason}: {known.meaning})"
    return f"the request is over a limit of the aggregator at {aggregator} ({reason}: {known.meaning})"
