"""A closed round's partial sum, sent to the parent once, whatever fails or restarts in between.

    closed round r here (AGGREGATING)
      -> Σ n_i·Δ_i of its accepted uploads (the running sum, rebuilt from the spools if it is not
         exactly theirs, each site clipped by this aggregator's own [influence]), fp32, the
         round's manifest, encoded exact into STATE_DIR/upstream/r<r>.sum.payload (fsynced)
      -> ledger r<r>.forward.json: READY, with the header and layout       (the point of no return)
      -> PushDelta with resume (client.transfer.push): GetUploadOffset first, so a retry or a
         restart sends only what the parent has not committed, and a complete one is a duplicate
      -> ledger: ACCEPTED, or REFUSED with the parent's word (the round closed there first)

The upload id is ``<site_id>.r<round>.sum``, the same on every try, and the
header is the one recorded: the parent counts the sum once (a second
stream of the same id resumes it; a finished one answers duplicate). A
crash before the ledger says READY leaves nothing the parent has seen, and
the sum is formed again from the spools, which the restart kept.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import grpc

from client.transfer import RESUMABLE, RoundOver, StoredPayload
from common.codec import encode
from common.delta import Codec, DeltaHeader, DeltaKind, PayloadLayout, UploadMetrics
from common.errors import status_of
from common.files import fsync_dir, fsync_file
from common.serde import header_from_bytes, header_to_bytes, layout_from_bytes, layout_to_bytes
from server.accumulation import Accumulation
from server.closing import Closing
from server.publish import fp32_manifest, rebuild
from server.records import UploadRecord
from server.run_state import RunState
from server.spool import Spool
from server.spooled import spooled_upload
from server.upstream.link import UpstreamLink

logger = logging.getLogger(__name__)


class Forwarded(StrEnum):
    """Where a round's partial sum stands with the parent."""

    READY = "ready"  # encoded; sent in part, whole, or not yet: the push resumes and finds out
    ACCEPTED = "accepted"  # the parent counted it
    REFUSED = "refused"  # the parent will not count it (its round closed first, or it refused it)


@dataclass(frozen=True, slots=True)
class ForwardRecord:
    """One round's partial sum, as the ledger keeps it."""

    round: int
    status: Forwarded
    header: DeltaHeader
    layout: PayloadLayout
    reason: str = ""  # REFUSED: what the parent said


def upload_id_of(site_id: str, round_number: int) -> str:
    """The partial sum's upload id at the parent: the same on every try and every restart."""
    return f"{site_id}.r{round_number}.sum"


class Ledger:
    """The forward records and payloads, one file each per round, in ``root`` (STATE_DIR/upstream)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def payload(self, round_number: int) -> Path:
        return self.root / f"r{round_number}.sum.payload"

    def _path(self, round_number: int) -> Path:
        return self.root / f"r{round_number}.forward.json"

    def get(self, round_number: int) -> ForwardRecord | None:
        try:
            raw = json.loads(self._path(round_number).read_text())
        except FileNotFoundError:
            return None
        return ForwardRecord(
            round=int(raw["round"]),
            status=Forwarded(raw["status"]),
            header=header_from_bytes(bytes.fromhex(raw["header"])),
            layout=layout_from_bytes(bytes.fromhex(raw["layout"])),
            reason=str(raw.get("reason", "")),
        )

    def put(self, record: ForwardRecord) -> None:
        """Write ``record`` durably: a temporary file, fsynced, renamed over the old one."""
        path = self._path(record.round)
        temp = path.with_name(path.name + ".tmp")
        body = {
            "round": record.round,
            "status": record.status.value,
            "upload_id": record.header.upload_id,
            "header": header_to_bytes(record.header).hex(),
            "layout": layout_to_bytes(record.layout).hex(),
            "reason": record.reason,
        }
        temp.write_text(json.dumps(body, indent=1))
        fsync_file(temp)
        os.replace(temp, path)
        fsync_dir(self.root)

    def settle(self, round_number: int) -> None:
        """The round is over here: its payload is no longer needed (the record stays)."""
        self.payload(round_number).unlink(missing_ok=True)


class Forwarder:
    """Forms, records and sends each closed round's partial sum (see the module docstring).

    Given the run's ``state``, ``closing`` (the round's manifest, clipping bounds and running
    sum's precision), the ``spool`` of the accepted uploads and the ``ledger``.
    """

    def __init__(
        self, *, state: RunState, closing: Closing, spool: Spool, ledger: Ledger, precision: str
    ) -> None:
        self._state = state
        self._closing = closing
        self._spool = spool
        self.ledger = ledger
        self._precision = precision

    def prepare(self, round_number: int, site_id: str) -> ForwardRecord | None:
        """The round's forward record: the ledger's, or a new one with its payload written (READY);
        None when the round has no accepted upload (nothing to send)."""
        known = self.ledger.get(round_number)
        if known is not None:
            return known
        state = self._state
        with state.lock:
            accepted = state.accepted_records(round_number)
            base_round = state.latest_published().round
            acc = state.acc
        if not accepted:
            return None
        acc = self._sum(round_number, accepted, acc)
        path = self.ledger.payload(round_number)
        try:
            with path.open("wb") as sink:
                sums = dict(acc.sum.totals())  # views of the sum's memory until release()
                layout = encode(sums, Codec(), sink, manifest=fp32_manifest(self._closing.manifest))
                del sums
            fsync_file(path)
        finally:
            acc.release()
            with state.lock:
                if state.acc is acc:
                    state.acc = None
        samples = sum(u.sample_count for u in accepted)
        header = DeltaHeader(
            spec=layout.spec,
            run_id=state.run.run_id,
            round=round_number,
            site_id=site_id,
            upload_id=upload_id_of(site_id, round_number),
            sample_count=samples,
            base_round=base_round,
            kind=DeltaKind.PARTIAL_SUM,
            metrics=_metrics(accepted),
            sites=sum(u.sites or 1 for u in accepted),  # a partial sum from below counts its sites
        )
        record = ForwardRecord(round_number, Forwarded.READY, header, layout)
        self.ledger.put(record)
        logger.info(
            "[upstream] round=%d partial sum of %d upload(s), %d samples: %d bytes, upload %s",
            round_number,
            len(accepted),
            samples,
            layout.total_bytes,
            header.upload_id,
        )
        return record

    def _sum(self, round_number: int, accepted: list[UploadRecord], acc: Accumulation | None) -> Accumulation:
        """The running sum if it is exactly the accepted uploads' (as Closing publishes it), else
        one rebuilt from their spools in acceptance order."""
        ids = [u.upload_id for u in accepted]
        if acc is not None and acc.round == round_number and not acc.dirty and acc.accepted == ids:
            return acc
        logger.info(
            "[upstream] round=%d rebuilding the sum from %d accepted spool(s)", round_number, len(ids)
        )
        norms: dict[str, float] = {}
        if acc is not None and acc.round == round_number:
            norms = {u: acc.norm(u) for u in acc.accepted}
            acc.release()
        fresh = Accumulation(
            round_number, self._closing.manifest, self._precision, bounds=self._closing.bounds(round_number)
        )
        with self._state.lock:
            self._state.acc = fresh
        rebuild(fresh, [spooled_upload(u) for u in accepted], self._spool, norms)
        return fresh

    def send(self, record: ForwardRecord, link: UpstreamLink) -> ForwardRecord:
        """``send`` with this forwarder's ledger."""
        return send(record, self.ledger, link)


def send(record: ForwardRecord, ledger: Ledger, link: UpstreamLink) -> ForwardRecord:
    """Push a READY record's payload, resuming where the parent stands with it; the record
    ACCEPTED (a duplicate too: the parent has it) or REFUSED, in the ledger too.

    Raises:
        grpc.RpcError: the parent stayed away through the link's retries (still READY).
    """
    payload = StoredPayload(ledger.payload(record.round), record.layout)
    try:
        receipt = link.push(record.header, payload)
    except RoundOver as exc:
        return _settled(ledger, record, Forwarded.REFUSED, str(exc) or "the parent's round is closed")
    except grpc.RpcError as exc:
        if status_of(exc) in RESUMABLE:
            raise
        # Refused for good (its token, a [tree] that does not list this aggregator...).
        code = status_of(exc)
        said = f"{code.name if code else 'error'}: {exc.details() or ''}"
        return _settled(ledger, record, Forwarded.REFUSED, said)
    logger.info(
        "[upstream] round=%d partial sum %s by the parent (%d bytes)",
        record.round,
        "was already counted" if receipt.duplicate else "accepted",
        record.layout.total_bytes,
    )
    return _settled(ledger, record, Forwarded.ACCEPTED, "")


def _settled(ledger: Ledger, record: ForwardRecord, status: Forwarded, reason: str) -> ForwardRecord:
    settled = replace(record, status=status, reason=reason)
    ledger.put(settled)
    if status is Forwarded.REFUSED:
        logger.error("[upstream] round=%d the parent refused the partial sum: %s", record.round, reason)
    return settled


def _metrics(accepted: list[UploadRecord]) -> UploadMetrics:
    """The sample-weighted means of the uploads' losses."""
    samples = sum(u.sample_count for u in accepted)
    return UploadMetrics(
        train_loss=sum(u.train_loss * u.sample_count for u in accepted) / samples,
        eval_loss=sum(u.eval_loss * u.sample_count for u in accepted) / samples,
    )
