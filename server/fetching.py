"""Fetch planning: which stored deltas a FetchDiff stream sends, and what it cost.

A worker at ``have_round`` gets the chain of published differences up to the
latest round, or the latest snapshot when the chain is incomplete, larger
than a snapshot, or a snapshot was asked for. FedCyBGD's partial download is
a snapshot of some tensors, encoded for the one request.

The same rule says which differences are still worth keeping on disk
(``servable_diffs``): a difference that every chain through it would make
larger than a snapshot is never sent again, and the collector drops it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from common.codec import BROADCAST_SHARD_BYTES, encode
from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout
from common.errors import FailedPrecondition, InvalidArgument, LimitExceeded
from common.serde import header_from_bytes, layout_from_bytes
from common.statefile import StateReader
from server.blobs import BlobStore
from server.publish import store_snapshot
from server.records import RoundRecord, RoundState, SiteRecord
from server.store import Store

MAX_PREFIXES = 4096


def servable_diffs(published: Sequence[RoundRecord], snapshot_estimate: int) -> set[int]:
    """Rounds (of ``published``, in round order) whose difference some chain may still be served through.

    A chain always ends at the latest round, so the chain through round j is
    at least rounds j..latest; once their bytes exceed the snapshot's, so does
    every chain through j, and ``Fetching.plan`` would send the snapshot.
    """
    keep: set[int] = set()
    suffix = 0
    for record in reversed(published):
        suffix += record.diff_bytes
        if suffix > snapshot_estimate:
            break
        keep.add(record.round)
    return keep


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One delta to stream to a worker: its header, its layout (the shard specs its chunks carry)
    and the payload file."""

    header: DeltaHeader
    layout: PayloadLayout
    path: Path
    round: int
    temporary: bool = False  # encoded for this request only: delete once streamed


def open_all(plan: list[FetchItem]) -> list[tuple[FetchItem, BinaryIO]]:
    """Every item of ``plan`` opened; if one is gone, none stays open and the plan's temporaries are removed."""
    opened: list[tuple[FetchItem, BinaryIO]] = []
    try:
        for item in plan:
            opened.append((item, item.path.open("rb")))
    except FileNotFoundError:
        for _, source in opened:
            source.close()
        for item in plan:
            if item.temporary:
                item.path.unlink(missing_ok=True)
        raise
    return opened


class Fetching:
    """Plans FetchDiff streams and records what they sent.

    Given the run's ``store`` and ``blobs``; the coordinator's ``lock``, under which every
    record here is read and written; the ``run_id`` that partial snapshots carry;
    ``metrics``, the coordinator's metrics hook; ``joined_site``, which returns a site's record
    or raises FailedPrecondition if it has not joined; and ``latest_published``, the latest published round's record.
    Encoding a snapshot takes a while: it happens outside the lock, one at a time.
    """

    def __init__(
        self,
        *,
        store: Store,
        blobs: BlobStore,
        lock: threading.RLock,
        run_id: str,
        metrics: Callable[[str, float], None],
        joined_site: Callable[[str], SiteRecord],
        latest_published: Callable[[], RoundRecord],
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._lock = lock
        self._snapshot_lock = threading.Lock()
        self._run_id = run_id
        self._metrics = metrics
        self._joined_site = joined_site
        self._latest_published = latest_published

    def open(
        self, site_id: str, have_round: int, snapshot: bool, only_prefixes: Sequence[str] = ()
    ) -> list[tuple[FetchItem, BinaryIO]]:
        """``plan``, with every payload already open for reading (the caller closes them).

        Once open, a payload is read whole even if the collector drops it (the
        recycler never reuses a file this process holds open). A file dropped
        between planning and opening means a newer round was published in
        between: the plan is made again, once.
        """
        try:
            return open_all(self.plan(site_id, have_round, snapshot, only_prefixes))
        except FileNotFoundError:
            return open_all(self.plan(site_id, have_round, snapshot, only_prefixes))

    @contextlib.contextmanager
    def opened(
        self, site_id: str, have_round: int, snapshot: bool, only_prefixes: Sequence[str] = ()
    ) -> Iterator[list[tuple[FetchItem, BinaryIO]]]:
        """``open``, closing every payload and deleting the plan's temporaries however the stream ends."""
        plan = self.open(site_id, have_round, snapshot, only_prefixes)
        try:
            yield plan
        finally:
            for item, source in plan:
                source.close()
                if item.temporary:
                    item.path.unlink(missing_ok=True)

    def plan(
        self, site_id: str, have_round: int, snapshot: bool, only_prefixes: Sequence[str] = ()
    ) -> list[FetchItem]:
        """The deltas that bring a worker from ``have_round`` to the latest published state."""
        if only_prefixes:
            return [self._partial_snapshot(site_id, tuple(only_prefixes))]
        with self._lock:
            self._joined_site(site_id)
            latest = self._latest_published()
            if have_round > latest.round:
                raise FailedPrecondition(
                    f"have_round is {have_round}, but the latest published round is {latest.round}",
                    field="have_round",
                    reason="ROUND_NOT_PUBLISHED",
                    metadata={"latest_round": str(latest.round)},
                )
            if have_round == latest.round and not snapshot:
                return []
            chain = self._store.select(
                RoundRecord,
                "round > ? AND round <= ? AND state = ?",
                (have_round, latest.round, int(RoundState.PUBLISHED)),
            )
            complete = all(r.diff_blob and self._blobs.exists(r.diff_blob) for r in chain)
            servable = servable_diffs(chain, self.snapshot_estimate(latest))
            if not (snapshot or not complete or not chain or chain[0].round not in servable):
                return [
                    FetchItem(
                        header_from_bytes(r.diff_header),
                        layout_from_bytes(r.diff_layout),
                        self._blobs.path(r.diff_blob),
                        r.round,
                    )
                    for r in chain
                ]
        record = self._ensure_snapshot(latest.round)
        return [
            FetchItem(
                header_from_bytes(record.snapshot_header),
                layout_from_bytes(record.snapshot_layout),
                self._blobs.path(record.snapshot_blob),
                record.round,
            )
        ]

    def _partial_snapshot(self, site_id: str, prefixes: tuple[str, ...]) -> FetchItem:
        """The latest state's tensors under ``prefixes``, encoded for this request (FedCyBGD's compressed download)."""
        if len(prefixes) > MAX_PREFIXES:
            raise LimitExceeded(
                f"only_prefixes has {len(prefixes)} entries; the limit is {MAX_PREFIXES}",
                field="only_prefixes",
                limit=MAX_PREFIXES,
            )
        with self._lock:
            self._joined_site(site_id)
            latest = self._latest_published()
        reader = StateReader(self._blobs.path(latest.state_blob))
        manifest = tuple(t for t in reader.manifest if t.name.startswith(prefixes))
        if not manifest:
            raise InvalidArgument(
                f"only_prefixes {list(prefixes)[:3]} name no tensor of the state", field="only_prefixes"
            )
        temp = self._blobs.temp_path(".payload")
        with temp.open("wb") as sink:
            layout = encode(
                {t.name: reader.read(t.name) for t in manifest},
                Codec(),
                sink,
                manifest=manifest,
                shard_bytes=BROADCAST_SHARD_BYTES,
            )
        header = DeltaHeader(
            spec=layout.spec, run_id=self._run_id, round=latest.round, kind=DeltaKind.SNAPSHOT
        )
        return FetchItem(header, layout, temp, latest.round, temporary=True)

    def snapshot_estimate(self, latest: RoundRecord) -> int:
        """What a snapshot of ``latest`` costs: its own size once encoded, until then round 0's
        (weights compress alike from round to round)."""
        if latest.snapshot_bytes:
            return latest.snapshot_bytes
        genesis = self._store.get(RoundRecord, 0)
        return genesis.snapshot_bytes if genesis else 0

    def _ensure_snapshot(self, round_number: int) -> RoundRecord:
        """The round's record with its snapshot encoded (on first request: most sites only fetch diffs)."""
        with self._snapshot_lock:
            with self._lock:
                record = self._store.get(RoundRecord, round_number)
                assert record is not None
                if record.snapshot_blob and self._blobs.exists(record.snapshot_blob):
                    return record
                if not record.state_blob:
                    raise FailedPrecondition(
                        f"the state of round {round_number} is no longer kept", field="have_round"
                    )
            stored = store_snapshot(self._blobs, record.state_blob, self._run_id, round_number)
            with self._lock:
                record = self._store.get(RoundRecord, round_number)
                assert record is not None
                record.snapshot_blob = stored.blob
                record.snapshot_header = stored.header
                record.snapshot_layout = stored.layout
                record.snapshot_bytes = stored.nbytes
                self._store.put(record)
                return record

    def count_bytes_out(self, round_number: int, nbytes: int) -> None:
        with self._lock:
            record = self._store.get(RoundRecord, round_number)
            if record is not None:
                record.bytes_out += nbytes
                self._store.put(record)
        self._metrics("bytes_out", nbytes)

    def mark_synced(self, site_id: str, round_number: int) -> None:
        with self._lock:
            site = self._store.get(SiteRecord, site_id)
            if site is not None:
                site.held_round = round_number
                self._store.put(site)
