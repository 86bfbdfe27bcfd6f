"""The collector: which published files the aggregator may drop once a round is published.

Keeps the last ``keep_states`` published states and snapshots (round 0's
always), and the differences a FetchDiff may still send
(``server.fetching.servable_diffs``). Dropped files go to the blob store's
recycler: the next round writes its difference and state over their blocks
instead of growing the disk and the page cache by a payload a round.
"""

from __future__ import annotations

from collections.abc import Callable

from server.blobs import BlobStore
from server.fetching import servable_diffs
from server.records import RoundRecord, RoundState
from server.store import Store


def collect_garbage(
    *, store: Store, blobs: BlobStore, keep_states: int, snapshot_estimate: Callable[[RoundRecord], int]
) -> None:
    """Drop the files no fetch can use any more, and clear their names from the round records.

    ``snapshot_estimate`` is ``Fetching.snapshot_estimate``: what sending the latest state whole
    would cost, against which a chain of differences is judged. The caller holds the run's lock.
    """
    published = store.select(RoundRecord, "state = ? AND round > 0", (int(RoundState.PUBLISHED),))
    if not published:
        return
    cut = max(0, len(published) - keep_states)
    servable = servable_diffs(published, snapshot_estimate(published[-1]))
    # Blobs are named by content: a round whose difference was all zeros has its predecessor's
    # state file (and two such rounds one difference), so a blob still named by a kept round
    # (or round 0) must stay.
    kept = {b for r in published[cut:] for b in (r.state_blob, r.snapshot_blob) if b}
    kept |= {r.diff_blob for r in published if r.round in servable and r.diff_blob}
    kept |= {b for r in store.select(RoundRecord, "round = 0") for b in (r.state_blob, r.snapshot_blob) if b}
    for index, record in enumerate(published):
        dropped = []
        if index < cut and (record.state_blob or record.snapshot_blob):
            dropped += [record.state_blob, record.snapshot_blob]
            record.state_blob = record.snapshot_blob = ""
            record.snapshot_header = record.snapshot_layout = b""
        if record.round not in servable and record.diff_blob:
            dropped.append(record.diff_blob)
            record.diff_blob = ""
            record.diff_header = record.diff_layout = b""
        if not dropped:
            continue
        store.put(record)
        for blob in dropped:
            if blob and blob not in kept:
                blobs.delete(blob)
