"""What the root of a tree takes from whom: the checks of an upload's kind and of a partial sum's codec.

A DIFF is one site's own delta Δ_i, weighed by its sample_count n_i. A
PARTIAL_SUM is an intermediate aggregator's Σ n_i·Δ_i over ``sites`` uploads
of its own sites, with sample_count Σ n_i: the root folds it with weight 1 and
adds Σ n_i to the round's weight (``Accumulation.mark_partial``), so the mean
is that of a flat federation. Only the sites the root's ``[tree]
intermediates`` names send partial sums, and they send nothing else: an
intermediate has no data of its own. (docs/protocol.md, PushDelta.)
"""

from __future__ import annotations

from collections.abc import Collection

from common.delta import Cast, Codec, DeltaHeader, DeltaKind, Lossy
from common.errors import InvalidArgument, PermissionDenied

__all__ = ["check_kind", "check_partial_codec", "is_partial"]


def is_partial(header: DeltaHeader) -> bool:
    """Whether the upload is an intermediate's partial sum (weight 1 in the fold)."""
    return header.kind is DeltaKind.PARTIAL_SUM


def check_kind(site_id: str, header: DeltaHeader, intermediates: Collection[str]) -> None:
    """Refuse a kind the site may not upload, and a ``sites`` that does not fit the kind.

    Raises:
        PermissionDenied: NOT_AN_INTERMEDIATE (a PARTIAL_SUM from a site not in ``intermediates``),
            PARTIAL_SUMS_ONLY (a DIFF from one in it).
        InvalidArgument: another kind; a PARTIAL_SUM with ``sites`` 0 or more sites than samples;
            a DIFF with ``sites`` set.
    """
    kind = header.kind
    if kind is DeltaKind.PARTIAL_SUM:
        if site_id not in intermediates:
            listed = ", ".join(sorted(intermediates)) or "none: it is not the root of a tree"
            raise PermissionDenied(
                f"header.kind is PARTIAL_SUM, but site {site_id!r} is not one of this aggregator's "
                f"[tree] intermediates ({listed}); a site uploads DIFF",
                field="kind",
                reason="NOT_AN_INTERMEDIATE",
            )
        if header.sites < 1:
            raise InvalidArgument(
                "header.sites is 0; a PARTIAL_SUM holds the uploads of at least 1 site",
                field="sites",
                limit=1,
            )
        if header.sites > header.sample_count:
            raise InvalidArgument(
                f"header.sites is {header.sites} but header.sample_count is {header.sample_count}: each "
                "site's upload in a partial sum holds at least one sample",
                field="sites",
                limit=header.sample_count,
            )
        return
    if kind is not DeltaKind.DIFF:
        raise InvalidArgument(
            f"header.kind is {kind.name}; an upload is DIFF (PARTIAL_SUM from a root's intermediate)",
            field="kind",
        )
    if site_id in intermediates:
        raise PermissionDenied(
            f"header.kind is DIFF, but site {site_id!r} is one of this aggregator's [tree] intermediates, "
            "which hold no data of their own: it uploads its sites' PARTIAL_SUM",
            field="kind",
            reason="PARTIAL_SUMS_ONLY",
        )
    if header.sites:
        raise InvalidArgument(
            f"header.sites is {header.sites}; it counts the uploads of a PARTIAL_SUM, and is 0 for a DIFF",
            field="sites",
            limit=0,
        )


def check_partial_codec(codec: Codec) -> None:
    """Refuse a partial sum that is not sent exact (cast none, lossy none), whatever the round's codec.

    Its values are n-weighted sums of many sites: F16 would overflow where the sites' own deltas do
    not, BF16 would round the sum once more where a flat federation rounds each site's delta only,
    and a lossy form would need an error-feedback residual at the intermediate.

    Raises:
        InvalidArgument: CODEC_MISMATCH, naming ``codec.cast`` or ``codec.lossy``.
    """
    for field, got, exact in (
        ("codec.cast", codec.cast, Cast.NONE),
        ("codec.lossy", codec.lossy, Lossy.NONE),
    ):
        if got is not exact:
            raise InvalidArgument(
                f"{field} is {got.name.lower()}; a PARTIAL_SUM travels exact (cast none, lossy none), "
                "whatever the round's upload codec: its values are sums of many sites' weighted deltas",
                field=field,
                reason="CODEC_MISMATCH",
                metadata={"expected": "none", "got": got.name.lower()},
            )
