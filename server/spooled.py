"""An accepted upload as the close reads it back from its spool: its id, its weight and its layout.

Wire revision 2 sends an upload's shard specs with its chunks, not in its
header, so the layout that says where each shard lies in the spool is the one
recorded at acceptance (``UploadRecord.layout``). Rebuilding a dirty sum, the
robust rules, FlexLoRA's SVD and the norms all read an upload through this.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.delta import DeltaKind, PayloadLayout
from common.errors import FailedPrecondition
from common.serde import layout_from_bytes
from server.records import UploadRecord


@dataclass(frozen=True, slots=True)
class SpooledUpload:
    """An accepted upload whose payload lies in the spool under ``upload_id``."""

    upload_id: str
    sample_count: int
    layout: PayloadLayout
    partial: bool = False  # an intermediate's PARTIAL_SUM: folds with weight 1 (Accumulation.mark_partial)


def spooled_upload(record: UploadRecord) -> SpooledUpload:
    """``record`` (an accepted upload) with its recorded layout; refused if it has none."""
    if not record.layout:
        raise FailedPrecondition(
            f"upload {record.upload_id!r} was accepted without a recorded layout (wire revision 1 of "
            "gradualdiff.v1); its spool cannot be read back by this aggregator (wire revision 2)",
            field="upload_id",
        )
    return SpooledUpload(
        record.upload_id,
        record.sample_count,
        layout_from_bytes(record.layout),
        partial=record.kind == DeltaKind.PARTIAL_SUM,
    )
