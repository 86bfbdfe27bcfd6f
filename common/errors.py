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
reading a worker's log knows what to change. On the worker's side of a call,
``is_round_over`` reads the status back: code, never message text.
"""

from __future__ import annotations

import grpc


class GdfedError(Exception):
    """Base of every error the project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str = "", limit: int | float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit


class InvalidArgument(GdfedError):
    """A request or delta that can never be valid as sent."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ManifestMismatch(InvalidArgument):
    """The delta's tensors differ from those the round trains."""


class MalformedShard(InvalidArgument):
    """A shard's safetensors header or frame layout does not add up."""


class NonFiniteValues(InvalidArgument):
    """A tensor holds NaN or infinity."""


class ChunkOrderError(InvalidArgument):
    """Chunks arrived out of order, duplicated, or with a gap."""


class DataLoss(GdfedError):
    """A checksum did not match: the bytes were damaged in transit or at rest."""

    code = grpc.StatusCode.DATA_LOSS


class LimitExceeded(GdfedError):
    """A size or count is over its configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TruncatedStream(GdfedError):
    """The stream ended before the chunk marked last; it can be resumed."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(GdfedError):
    """The request is valid but not now: wrong round, paused, not joined."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RoundClosed(GdfedError):
    """The round closed while the request was in flight."""

    code = grpc.StatusCode.ABORTED


class AlreadyExists(GdfedError):
    """The thing being created exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(GdfedError):
    """The thing asked for does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(GdfedError):
    """No credentials, or credentials that match nobody."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GdfedError):
    """Valid credentials that do not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


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
