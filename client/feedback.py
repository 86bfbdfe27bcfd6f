"""Error feedback for a worker's lossy uploads: the residual, kept on disk across rounds and restarts.

Under a lossy upload codec (top-k or int8, ``common.codec.compact``) each round
sends C(e + Δ) and keeps e ← (e + Δ) − sent, so what a round leaves out is
delayed, not lost (``common.lossy`` has the algebra). The residual e must
change exactly once per upload that the aggregator counts, whatever dies
when. Files, in the worker's state directory (``client.local_state``):

    feedback.safetensors       e after the last upload whose fate is settled
                               (metadata: format, run_id, upload = that upload's id)
    pending/<id>.residual      e' = (e + Δ) − sent: the residual once upload <id> counts

The commit point is ``pending/<id>.header`` (``LocalState.save_pending``),
written after the whole payload, its layout and ``pending/<id>.residual``, and
before the push's last chunk leaves (client.outgoing: the push streams the
payload while it is encoded, but the aggregator accepts nothing before it):

- :meth:`UploadFeedback.prepare` computes e + Δ, the compact tensors and e',
  and writes e' (temporary name, fsync, rename). Killed before the header
  exists (while encoding, perhaps with part of the payload sent), the worker
  trains the round again from the old e: nothing counted twice.
- :meth:`UploadFeedback.acknowledged` (the aggregator took the upload) renames
  e' over feedback.safetensors: one atomic step. Killed after it, a restarted
  worker finds the file already naming the upload and does nothing.
- :meth:`UploadFeedback.not_taken` (RoundOver: nothing of it was counted) sets
  e ← e' + sent = e + Δ, with ``sent`` decoded from the payload on disk. The
  sum is exact: wherever sent ≠ 0 it is within a factor 2 of e + Δ (a bf16
  rounding of it, or q·scale with |q| ≥ 1 rounded to nearest), so e' = (e + Δ)
  − sent was exact (Sterbenz) and adding sent back restores e + Δ bit for bit.
  The file is then marked with the upload's id and e' removed, so no later
  settlement can apply it again.
- A pending upload of an earlier round, left by a worker killed between
  encoding and the aggregator's answer, is settled at the next ``prepare``:
  the aggregator is asked whether it accepted it (``GetUploadOffset``).

The residual is kept per run id: a new run starts from zero. Exact codecs
leave it alone (a run that switches back to a lossy codec picks it up).
A tensor whose shape changed since its residual was kept starts from zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

from client.local_state import Pending, read_pending
from common.codec.compact import compact_tensor, decode_dense, is_lossy, plan
from common.delta import Codec, TensorSpec
from common.dtypes import DType
from common.files import fsync_dir, fsync_file
from common.lossy import ErrorFeedback
from common.pb.gradualdiff.v1 import federation_pb2, federation_pb2_grpc
from common.retry import Retrier

logger = logging.getLogger(__name__)

FORMAT = "gdfed-upload-feedback-v1"


def upload_accepted(
    stub: federation_pb2_grpc.FederationStub,
    metadata: tuple[tuple[str, str], ...],
    site_id: str,
    *,
    retrier: Retrier | None = None,
) -> Callable[[str], bool]:
    """A question for the aggregator: did it accept upload ``id``? (GetUploadOffset's ``complete``)."""
    retry = retrier or Retrier()

    def ask(upload_id: str) -> bool:
        reply = retry.call(
            "upload offset",
            lambda: stub.GetUploadOffset(
                federation_pb2.UploadOffsetRequest(site_id=site_id, upload_id=upload_id),
                metadata=metadata,
                timeout=30,
            ),
        )
        return bool(reply.complete)

    return ask


class UploadFeedback:
    """A worker's error-feedback residual, in its state directory ``root``."""

    def __init__(self, root: Path, *, accepted: Callable[[str], bool]) -> None:
        self.root = root
        self.path = root / "feedback.safetensors"
        self._pending = root / "pending"
        self._pending.mkdir(parents=True, exist_ok=True)
        self._accepted = accepted

    def residual_path(self, upload_id: str) -> Path:
        return self._pending / f"{upload_id}.residual"

    # ------------------------------------------------------------ the round
    def prepare(
        self, run_id: str, upload_id: str, delta: Mapping[str, torch.Tensor], codec: Codec
    ) -> dict[str, torch.Tensor]:
        """The tensors to encode for ``delta``: compact forms of e + Δ under a lossy codec, else ``delta``.

        Writes e' = (e + Δ) − sent durably for upload ``upload_id``; it becomes
        the residual when the upload is acknowledged.
        """
        if not is_lossy(codec):
            return dict(delta)
        self._settle_stale(run_id, upload_id)
        feedback = ErrorFeedback()
        residual, _ = self._read(self.path, run_id)
        feedback.load_state_dict(residual)
        tensors: dict[str, torch.Tensor] = {}
        for name, d in delta.items():
            try:
                compensated = feedback.compensate(name, d)
            except ValueError as exc:
                logger.warning("[feedback] %s; its residual starts from zero", exc)
                compensated = d.detach().to("cpu", torch.float32).clone()
            wire, sent = compact_tensor(name, compensated, codec)
            tensors.update(wire)
            feedback.update(name, compensated, sent)
        self._write(self.residual_path(upload_id), feedback.state_dict(), run_id, upload_id)
        return tensors

    def acknowledged(self, run_id: str, upload_id: str) -> None:
        """Upload ``upload_id`` counts: its e' becomes the residual (one atomic rename)."""
        source = self.residual_path(upload_id)
        if not source.exists():
            return  # an exact codec, or renamed already by a run that died before clearing pending/
        _, marker = self._read(source, run_id)
        if marker != upload_id:
            logger.warning("[feedback] %s names another upload or run; ignored", source.name)
            return
        os.replace(source, self.path)
        fsync_dir(self.root)

    def not_taken(self, run_id: str, upload: Pending) -> None:
        """``upload`` was not counted (its round is over): the residual becomes e' + sent = e + Δ."""
        header, layout = upload.header, upload.layout
        source = self.residual_path(header.upload_id)
        if not source.exists():
            return
        _, settled = self._read(self.path, run_id)
        if settled == header.upload_id:
            self._discard(source)  # done already by a run that died right after
            return
        residual, marker = self._read(source, run_id)
        if marker != header.upload_id:
            logger.warning("[feedback] %s names another upload or run; ignored", source.name)
            return
        # The upload carries the tensors of its round (a FedCyBGD site: one block) of all those kept.
        carried = {spec.name for spec in layout.manifest}
        manifest = [
            spec
            for name, t in residual.items()
            for spec in [TensorSpec(name, DType.F32, tuple(t.shape))]
            if any(part.name in carried for part in plan([spec], layout.codec)[0].parts)
        ]
        with upload.payload.open("rb") as f:
            sent = decode_dense(layout, f, manifest)
        for name, values in sent.items():
            residual[name].add_(values)
        self._write(self.path, residual, run_id, header.upload_id)
        # Once settled, e' must go: a later settlement would otherwise find it again.
        self._discard(source)
        logger.info(
            "[feedback] upload %s was not taken: its values wait for the next round", header.upload_id
        )

    def residual(self, run_id: str) -> dict[str, torch.Tensor]:
        """The settled residual e for ``run_id`` (empty when there is none)."""
        return self._read(self.path, run_id)[0]

    # ------------------------------------------------------------ helpers
    def _settle_stale(self, run_id: str, current: str) -> None:
        """Settle the committed uploads of earlier rounds that a killed worker left in pending/."""
        stale: list[Pending] = []
        for residual in self._pending.glob("*.residual"):
            upload_id = residual.name.removesuffix(".residual")
            found = None if upload_id == current else read_pending(self._pending, upload_id)
            if found is None:
                continue  # not committed: the round was trained again (or is being)
            if found.header.run_id == run_id:
                stale.append(found)
        for upload in sorted(stale, key=lambda u: u.header.round):  # oldest first
            header = upload.header
            upload_id = header.upload_id
            _, settled = self._read(self.path, run_id)
            if settled == upload_id:
                self._discard(self.residual_path(upload_id))
                continue
            if self._accepted(upload_id):
                logger.info("[feedback] upload %s of round %d was accepted", upload_id, header.round)
                self.acknowledged(run_id, upload_id)
            else:
                self.not_taken(run_id, upload)

    def _discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    @staticmethod
    def _read(path: Path, run_id: str) -> tuple[dict[str, torch.Tensor], str]:
        """The residual in ``path`` and the upload it settles, if it belongs to ``run_id``."""
        if not path.exists():
            return {}, ""
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("run_id") != run_id:
                return {}, ""
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        return tensors, meta.get("upload", "")

    def _write(self, path: Path, residual: Mapping[str, torch.Tensor], run_id: str, upload_id: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {name: t.contiguous() for name, t in residual.items()},
            str(tmp),
            {"format": FORMAT, "run_id": run_id, "upload": upload_id},
        )
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
