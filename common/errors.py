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

``CATALOG`` is the one list of reasons: each with its status code, what it
means, what a client should do, and the delay the aggregator suggests in a
``google.rpc.RetryInfo`` (docs/protocol.md's "Errors" table is this one, and
tests/test_error_details.py checks that every reason raised is listed with
the code it is raised with). ``reason_of``, ``metadata_of`` and
``retry_delay_of`` read a failed call's details on the client's side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status  # type: ignore[import-untyped]

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
        metadata: Mapping[str, str] | None = None,
        retry_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit
        if reason:
            self.reason = reason
        # ErrorInfo.metadata beyond field and limit (the round, the offset to resume from...);
        # a handler may add to it on the way out (server.intake adds the committed offset).
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_s = retry_s  # RetryInfo's delay, if not the catalog's for this reason


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


@dataclass(frozen=True, slots=True)
class Reason:
    """One machine-readable reason: the status it comes with, what it means, what a client does."""

    code: grpc.StatusCode
    meaning: str
    action: str
    retryable: bool = False  # the same call (an upload: resumed) may succeed later
    retry_s: float | None = None  # the delay sent as RetryInfo; None: none sent

    def __post_init__(self) -> None:
        if self.retry_s is not None and not self.retryable:
            raise ValueError("a RetryInfo delay on a reason that no retry helps")


_C = grpc.StatusCode
DISK_RETRY_S = 30.0  # space comes back when an operator frees it: minutes, not seconds
# A call that could not be recorded is small (a join, an offset): tried again sooner than an upload.
STORE_RETRY_S = 10.0
BUSY_RETRY_S = 5.0  # a long call ends within seconds to minutes; polls end within 60 s

# Every reason the aggregator sends, by status code. "metadata.x" is ErrorInfo.metadata["x"]; every
# reason may also carry "field" (the request field at fault) and "limit" (the limit it broke).
CATALOG: Mapping[str, Reason] = {
    # INVALID_ARGUMENT: never valid as sent; the same request fails again.
    "INVALID_ARGUMENT": Reason(_C.INVALID_ARGUMENT, "a request field is malformed or out of its range",
                               "fix the field named in metadata.field"),
    "MALFORMED_REQUEST": Reason(_C.INVALID_ARGUMENT, "the request's bytes are not the method's protobuf "
                                "message", "fix the client's serialization"),
    "MANIFEST_MISMATCH": Reason(_C.INVALID_ARGUMENT, "the delta's tensors differ from the round's upload "
                                "manifest", "build the delta from the RoundSpec's assignment"),
    "MALFORMED_SHARD": Reason(_C.INVALID_ARGUMENT, "a shard's safetensors header or frame layout does not "
                              "add up; the upload is rejected", "fix the encoder; send under a new upload id"),
    "NON_FINITE_VALUES": Reason(_C.INVALID_ARGUMENT, "a tensor holds NaN or infinity; the upload is rejected",
                                "do not send a diverged update"),
    "CHUNK_ORDER": Reason(_C.INVALID_ARGUMENT, "a chunk repeats bytes, leaves a gap or follows the last one",
                          "resume in order from metadata.offset (GetUploadOffset says the same)", True),
    "CODEC_MISMATCH": Reason(_C.INVALID_ARGUMENT, "the upload's cast, lossy form or top-k fraction differs "
                             "from RoundSpec.training.upload_codec (metadata.expected, metadata.got)",
                             "encode with the round's upload codec, under a new upload id"),
    "UPLOAD_ID_REUSED": Reason(_C.INVALID_ARGUMENT, "the upload id was started with a different header",
                               "send under a new upload id"),
    # DATA_LOSS
    "CHECKSUM_MISMATCH": Reason(_C.DATA_LOSS, "a chunk's CRC-32C or a shard's digest (codec.digest) does not match",
                                "with metadata.offset: resume from it; without: the upload is rejected, "
                                "encode it again under a new upload id", True),
    # RESOURCE_EXHAUSTED
    "LIMIT_EXCEEDED": Reason(_C.RESOURCE_EXHAUSTED, "a size or count is over the aggregator's limit "
                             "(metadata.field, metadata.limit)", "send less; a retry as it is fails again"),
    "UPLOAD_TOO_LARGE": Reason(_C.RESOURCE_EXHAUSTED, "the upload's payload runs past max_upload_bytes "
                               "(JoinReply.max_upload_bytes, metadata.limit)",
                               "upload with a lossier codec or ask the operator for a higher limit"),
    "SITE_BUSY": Reason(_C.RESOURCE_EXHAUSTED, "the site already holds as many streams or long polls as "
                        "it may (metadata.limit)", "finish or cancel one; retry after RetryInfo", True,
                        BUSY_RETRY_S),
    "AGGREGATOR_BUSY": Reason(_C.RESOURCE_EXHAUSTED, "the aggregator holds max_long_calls long calls "
                              "from all sites", "retry after RetryInfo", True, BUSY_RETRY_S),
    "DISK_FULL": Reason(_C.RESOURCE_EXHAUSTED, "the aggregator's disk is full; what was received is kept",
                        "resume from metadata.offset after RetryInfo", True, DISK_RETRY_S),
    # ABORTED: the call stopped part way; only ROUND_CLOSED means that resuming is useless.
    "RESUME_AT_OFFSET": Reason(_C.ABORTED, "the upload stream ended before its last chunk",
                               "resume from metadata.offset", True),
    "UPLOAD_CANCELLED": Reason(_C.ABORTED, "the aggregator stopped this stream of the upload (a newer "
                               "stream of the same upload, a shutdown, an eviction)",
                               "resume from metadata.offset (GetUploadOffset)", True),
    "ROUND_CLOSED": Reason(_C.ABORTED, "the round (metadata.round) closed or takes no more uploads",
                           "drop the upload; AwaitRound the next round"),
    # FAILED_PRECONDITION: valid, but not in the run's present state.
    "FAILED_PRECONDITION": Reason(_C.FAILED_PRECONDITION, "the request does not fit the run's state",
                                  "read the message; fix the state it names"),
    "NOT_JOINED": Reason(_C.FAILED_PRECONDITION, "the site has not joined the run", "call Join first"),
    "FINGERPRINT_MISMATCH": Reason(_C.FAILED_PRECONDITION, "the site loaded another base model than the run's",
                                   "load the run's base model"),
    "WRONG_RUN": Reason(_C.FAILED_PRECONDITION, "header.run_id is not this run's (metadata.run_id)",
                        "Join again and train from its state"),
    "WRONG_ROUND": Reason(_C.FAILED_PRECONDITION, "header.round is not the open round (metadata.round: the "
                          "open one, 0 for none)", "drop the upload; AwaitRound"),
    "WRONG_BASE_ROUND": Reason(_C.FAILED_PRECONDITION, "header.base_round is not the latest published round "
                               "(metadata.base_round)", "FetchDiff, train again from the latest state"),
    "NOT_ASSIGNED": Reason(_C.FAILED_PRECONDITION, "the site has no part in the open round",
                           "AwaitRound the next round"),
    "RUN_FINISHED": Reason(_C.FAILED_PRECONDITION, "the run is finished", "stop"),
    "UPLOAD_ID_SPENT": Reason(_C.FAILED_PRECONDITION, "the upload id was rejected or abandoned before",
                              "send under a new upload id"),
    "WRONG_OFFSET": Reason(_C.FAILED_PRECONDITION, "the stream starts neither at 0 nor at the committed "
                           "offset (metadata.offset)", "resume from metadata.offset", True),
    "ROUND_NOT_PUBLISHED": Reason(_C.FAILED_PRECONDITION, "have_round is past the latest published round "
                                  "(metadata.latest_round)", "fetch a snapshot (have_round 0, snapshot)"),
    "NO_OPEN_ROUND": Reason(_C.FAILED_PRECONDITION, "no round is open to close", "wait for one to open"),
    # PERMISSION_DENIED: who the caller is is known, and it may not do this.
    "PERMISSION_DENIED": Reason(_C.PERMISSION_DENIED, "the credentials do not allow this call", "stop"),
    "SITE_EVICTED": Reason(_C.PERMISSION_DENIED, "an operator evicted the site from the run", "stop"),
    "SITE_ID_MISMATCH": Reason(_C.PERMISSION_DENIED, "the request's site_id (or header.site_id) is not the "
                               "token's site (metadata.expected)", "send the token's site id"),
    "UPLOAD_OWNER_MISMATCH": Reason(_C.PERMISSION_DENIED, "the upload id belongs to another site",
                                    "use an upload id of this site's own"),
    "WRONG_SERVICE": Reason(_C.PERMISSION_DENIED, "a site token on the Admin service, or the admin token on "
                            "Federation", "use the credential of the service's role"),
    "CERT_MISMATCH": Reason(_C.PERMISSION_DENIED, "the client certificate does not name the token's site "
                            "(metadata.expected, metadata.presented)",
                            "connect with the site's own certificate and token"),
    "NOT_AN_INTERMEDIATE": Reason(_C.PERMISSION_DENIED, "a PARTIAL_SUM from a site that is not one of the "
                                  "root's [tree] intermediates", "upload DIFF; or the operator lists the "
                                  "site in [tree] intermediates"),
    "PARTIAL_SUMS_ONLY": Reason(_C.PERMISSION_DENIED, "a DIFF from one of the root's [tree] intermediates, "
                                "which holds no data of its own", "upload the subtree's PARTIAL_SUM"),
    # UNAUTHENTICATED
    "UNAUTHENTICATED": Reason(_C.UNAUTHENTICATED, "the call carries no valid credential", "check the token"),
    "NO_TOKEN": Reason(_C.UNAUTHENTICATED, "no `authorization: Bearer <token>` metadata",
                       "send the token"),
    "UNKNOWN_TOKEN": Reason(_C.UNAUTHENTICATED, "the token matches no site (or is not the admin token)",
                            "check the token file; ask the operator"),
    # The rest
    "NOT_FOUND": Reason(_C.NOT_FOUND, "the round or site asked for does not exist", "ask for another"),
    "ALREADY_EXISTS": Reason(_C.ALREADY_EXISTS, "the thing being created exists already", "none needed"),
    "ALREADY_UPLOADED": Reason(_C.ALREADY_EXISTS, "the site has another upload accepted in this round",
                               "none: its update counts once"),
    "STORE_UNAVAILABLE": Reason(_C.UNAVAILABLE, "the aggregator could not record the call (its disk is "
                                "full)", "retry after RetryInfo", True, STORE_RETRY_S),
    "INTERNAL": Reason(_C.INTERNAL, "a fault in the aggregator (its log has the traceback)",
                       "retry with backoff; report it if it persists", True),
}  # fmt: skip


def status_of(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call; ``None`` for a bare ``grpc.RpcError`` that carries none."""
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _error_info(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, float | None]:
    """The ErrorInfo (of REASON_DOMAIN) and RetryInfo delay in a failed call's status details.

    A call without details (an aggregator older than the reasons, a fake in a test, a status made
    by gRPC itself) gives (None, None); details that contradict the call's code or message too.
    """
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except (AttributeError, TypeError, ValueError):  # no trailing metadata, or inconsistent details
        return None, None
    if status is None:
        return None, None
    info, delay = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            candidate = error_details_pb2.ErrorInfo()
            detail.Unpack(candidate)
            if candidate.domain == REASON_DOMAIN:
                info = candidate
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return info, delay


def reason_of(error: grpc.RpcError) -> str:
    """The failed call's reason (a ``CATALOG`` key), or "" when the status carries none."""
    info, _ = _error_info(error)
    return info.reason if info is not None else ""


def metadata_of(error: grpc.RpcError) -> dict[str, str]:
    """The failed call's ErrorInfo metadata (``field``, ``limit``, ``offset``, ``round``...); {} if none."""
    info, _ = _error_info(error)
    return dict(info.metadata) if info is not None else {}


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """The delay the aggregator asks before the same call again (RetryInfo), in seconds; None if none."""
    _, delay = _error_info(error)
    return delay


def is_round_over(error: grpc.RpcError) -> bool:
    """Whether a call failed because its round closed (reason ``ROUND_CLOSED``), not because it broke.

    An aggregator that sends reasons tells a closed round (ROUND_CLOSED) from an upload to resume
    (RESUME_AT_OFFSET, UPLOAD_CANCELLED), which share the status ABORTED. For a status without
    details (an aggregator older than the reasons) it falls back to the code alone: ABORTED is
    taken as a closed round, which is what such an aggregator meant by it but for a stream that
    ended early, which a worker's push never sends (a push that breaks fails on the worker's side).
    """
    reason = reason_of(error)
    if reason:
        return reason == RoundClosed.reason
    return status_of(error) is RoundClosed.code
