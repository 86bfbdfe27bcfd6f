"""The root's view of its tree: each intermediate, whether it is there, and what its last partial sum carried.

Read from the records (``SiteRecord`` for its liveness, the latest accepted
``UploadRecord`` of kind PARTIAL_SUM for the sites and samples it carried), for
``gdfed status`` (``RunStatus.intermediates``, ``intermediates`` in
``gdfed.status/1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.delta import DeltaKind
from server.records import SiteRecord, UploadRecord, UploadState
from server.store import Store

__all__ = ["IntermediateView", "intermediates_view"]


@dataclass(frozen=True, slots=True)
class IntermediateView:
    """One intermediate: its site record (None before it joined) and its last accepted partial sum."""

    site_id: str
    site: SiteRecord | None
    last: UploadRecord | None


def intermediates_view(store: Store, intermediates: Sequence[str]) -> tuple[IntermediateView, ...]:
    """Each of ``intermediates``, in the config's order (caller holds the state's lock)."""
    views = []
    for site_id in intermediates:
        last = store.select(
            UploadRecord,
            "site_id = ? AND state = ? AND kind = ?",
            (site_id, int(UploadState.ACCEPTED), int(DeltaKind.PARTIAL_SUM)),
            order="round DESC LIMIT 1",  # the latest only: a long run holds one per round
        )
        views.append(IntermediateView(site_id, store.get(SiteRecord, site_id), last[0] if last else None))
    return tuple(views)
