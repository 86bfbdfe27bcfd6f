"""A refusal as the status a client can branch on: google.rpc.Status with ErrorInfo and RetryInfo.

The status message is the error's message (for people); the details carry
``google.rpc.ErrorInfo`` (reason, ``common.errors.REASON_DOMAIN``, metadata:
``field``, ``limit`` and whatever the raise site added, e.g. the ``offset`` to
resume from or the ``round`` that closed) and, where ``common.errors.CATALOG``
says a wait helps, ``google.rpc.RetryInfo``. Clients read them back with
``common.errors.reason_of`` and ``retry_delay_of``.
"""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status  # type: ignore[import-untyped]

from common.errors import CATALOG, REASON_DOMAIN, GdfedError

logger = logging.getLogger(__name__)

# A disk that filled up is the operator's to fix, not a bug: the status every call gets then.
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
INTERNAL = "INTERNAL"


def error_status(error: GdfedError) -> grpc.Status:
    """``error`` as the status to abort its call with."""
    metadata = dict(error.metadata)
    if error.field:
        metadata.setdefault("field", error.field)
    if error.limit is not None:
        metadata.setdefault("limit", _number(error.limit))
    entry = CATALOG.get(error.reason)
    if entry is None:  # tests/test_error_details.py checks the raise sites; this is the last guard
        logger.error("reason %s is not in common.errors.CATALOG", error.reason)
    delay = error.retry_s if error.retry_s is not None else (entry.retry_s if entry else None)
    return status(error.code, error.message, error.reason, metadata, delay)


def status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    retry_s: float | None = None,
) -> grpc.Status:
    """A status with ErrorInfo (``reason`` in REASON_DOMAIN) and, for a ``retry_s``, RetryInfo."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=REASON_DOMAIN, metadata=metadata or {})
    details = [_packed(info)]
    if retry_s is not None and math.isfinite(retry_s) and retry_s >= 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_s * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    result: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=details)
    )
    return result


def _packed(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
