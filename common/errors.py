"""The project's exceptions, each bound to the gRPC status it answers with.

    GdfedError                      (INTERNAL)
    ├── InvalidArgument             (INVALID_ARGUMENT)  malformed request or delta
    │   ├── ManifestMismatch        delta header disagrees with what the round expects
    │   ├── MalformedShard          safetensors header or frame layout is inconsistent
    │   ├── NonFiniteValues         NaN or infinity in a delta
    │   └── ChunkOrderError         gap, duplicate or reordering in a chunk stream
    ├── DataLoss                    (DATA_LOSS)  checksum mismatch: the bytes were damaged
    ├── LimitExceeded               (RESOURCE_EXHAUSTED)  a size or count over its limit
    ├── TruncatedStream             (ABORTED)  the stream ended before its last chunk
    ├── FailedPrecondition          (FAILED_PRECONDITION)  wrong round, wrong state
    ├── RoundClosed                 (ABORTED)  the round closed before the upload finished
    ├── AlreadyExists               (ALREADY_EXISTS)
    ├── NotFound                    (NOT_FOUND)
    ├── Unauthenticated             (UNAUTHENTICATED)
    └── PermissionDenied            (PERMISSION_DENIED)

Messages name the field and, where there is one, the limit, so an operator
reading a worker's log knows what to change. Each error also carries a
machine-readable ``reason`` (an UPPER_SNAKE word, sent as ``google.rpc.ErrorInfo``
in the status details under the ``REASON_DOMAIN`` domain): the class gives a
default, a raise site may name a narrower one (``CODEC_MISMATCH``,
``SITE_EVICTED``...). Clients branch on code and reason, never on message text.
"""

from __future__ import annotations

import grpc

# ErrorInfo.domain of every reason below: reasons are unique within it, and stay stable within v1.
REASON_DOMAIN = "gradualdiff.v1"


class GdfedError(Exception):
    """Base of every error the project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str = "",
        limit: int | float | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit
        if reason:
            self.reason = reason


class InvalidArgument(GdfedError):
    """A request or delta that can never be valid as sent."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class ManifestMismatch(InvalidArgument):
    """The delta's tensors differ from those the round trains."""

    reason = "MANIFEST_MISMATCH"


class MalformedShard(InvalidArgument):
    """A shard's safetensors header or frame layout does not add up."""

    reason = "MALFORMED_SHARD"


class NonFiniteValues(InvalidArgument):
    """A tensor holds NaN or infinity."""

    reason = "NON_FINITE_VALUES"


class ChunkOrderError(InvalidArgument):
    """Chunks arrived out of order, duplicated, or with a gap."""

    reason = "CHUNK_ORDER"


class DataLoss(GdfedError):
    """A checksum did not match: the bytes were damaged in transit or at rest."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "CHECKSUM_MISMATCH"


class LimitExceeded(GdfedError):
    """A size or count is over its configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"


class TruncatedStream(GdfedError):
    """The stream ended before the chunk marked last; it can be resumed."""

    code = grpc.StatusCode.ABORTED
    reason = "RESUME_AT_OFFSET"


class FailedPrecondition(GdfedError):
    """The request is valid but not now: wrong round, paused, not joined."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class RoundClosed(GdfedError):
    """The round closed while the request was in flight."""

    code = grpc.StatusCode.ABORTED
    reason = "ROUND_CLOSED"


class AlreadyExists(GdfedError):
    """The thing being created exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class NotFound(GdfedError):
    """The thing asked for does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class Unauthenticated(GdfedError):
    """No credentials, or credentials that match nobody."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(GdfedError):
    """Valid credentials that do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


def status_of(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call; ``None`` for a bare ``grpc.RpcError`` that carries none."""
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def is_round_over(error: grpc.RpcError) -> bool:
    """Whether a call failed because its round closed (``RoundClosed``'s status), not because it broke.

    Decided on the status code alone, whatever the message says. ``TruncatedStream``
    shares the code, but the aggregator answers it only to a stream that ended,
    without error, before its last chunk, which a worker's push never sends: a
    push that breaks fails on the worker's side (UNAVAILABLE, CANCELLED, ...).
    """
    return status_of(error) is RoundClosed.code
