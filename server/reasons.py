"""Why an upload was refused, why a round failed: each as one of a few fixed words.

The metrics label refusals and failures by these words (``server.metrics``). A label takes its
values from a fixed set so the number of series stays bounded whatever the sites send: an error
message, a site id or an upload id as a label would add a series per value, forever. Pure, at the
bottom of the layering, so intake and closing name the reason where it happens.
"""

from __future__ import annotations

from common.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    GdfedError,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    RoundClosed,
    Unauthenticated,
)

__all__ = ["FAILURE_REASONS", "REFUSAL_REASONS", "refusal_reason"]

REFUSAL_REASONS = (
    "invalid",  # malformed header or delta: wrong tensors, NaN, bad layout, bad offset
    "corrupt",  # a checksum did not match
    "too_large",  # over a configured size or count limit
    "wrong_round",  # for another round, base round or run: a worker behind the aggregator
    "duplicate",  # the site already has an upload accepted this round, or the upload id was used
    "round_closed",  # the round no longer takes uploads
    "unauthorized",  # a site acting for another, or an evicted one
    "other",
)

# Named where the failure is decided: rounds.decide (deadline, operator), Closing.aggregate (the rest).
FAILURE_REASONS = (
    "deadline",  # the deadline passed without the quorum
    "operator",  # close-round before any upload was accepted
    "aggregation",  # publishing the round raised
    "no_uploads",  # the round closed with nothing accepted
    "other",
)

# FailedPrecondition covers several refusals; its field tells them apart.
_PRECONDITION_FIELDS = {
    "round": "wrong_round",
    "base_round": "wrong_round",
    "run_id": "wrong_round",
    "upload_id": "duplicate",  # the id was rejected or abandoned before: a new upload needs a new id
    "offset": "invalid",
}


def refusal_reason(error: GdfedError) -> str:
    """The word in ``REFUSAL_REASONS`` for an upload refused with ``error``.

    Example:
        >>> refusal_reason(LimitExceeded("too big", field="total_bytes"))
        'too_large'
    """
    match error:
        case RoundClosed():
            return "round_closed"
        case AlreadyExists():
            return "duplicate"
        case LimitExceeded():
            return "too_large"
        case DataLoss():
            return "corrupt"
        case Unauthenticated() | PermissionDenied():
            return "unauthorized"
        case InvalidArgument():
            return "invalid"
        case FailedPrecondition():
            return _PRECONDITION_FIELDS.get(error.field, "other")
    return "other"
