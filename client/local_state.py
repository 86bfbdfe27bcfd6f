"""What a worker keeps on its own disk, so a restarted worker picks up where it was.

    <state_dir>/held.safetensors          the trainable state at the last round it synced to
                                          (metadata: run_id, round)
    <state_dir>/pending/<id>.header       an upload not yet acknowledged: its DeltaHeader...
    <state_dir>/pending/<id>.layout       ...its PayloadLayout (common.serde.layout_to_bytes)...
    <state_dir>/pending/<id>.payload      ...and its encoded payload, to resume from the
                                          offset the aggregator acknowledged
    <state_dir>/recycled/                 spent payload files, which the next payload is
                                          written over (common.files.Recycler)

Files are written to a temporary name and renamed, so a crash leaves the old
file or the new one, never half of one. The header is written last, once the
payload is whole (client.outgoing): it is what makes an upload pending. A
payload without one (a worker killed while encoding) is a spool that never
became an upload: its round is trained again under a new upload id.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.delta import DeltaHeader, PayloadLayout
from common.errors import GdfedError
from common.files import Recycler, fsync_file
from common.serde import header_from_bytes, header_to_bytes, layout_from_bytes, layout_to_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Held:
    run_id: str
    round: int
    state: dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Pending:
    """An upload written whole and not yet acknowledged: what a push resumes from."""

    header: DeltaHeader
    layout: PayloadLayout
    payload: Path


def read_pending(directory: Path, upload_id: str) -> Pending | None:
    """Upload ``upload_id`` recorded in ``directory``, if its header, layout and payload are all there."""
    head, layout, payload = (
        directory / f"{upload_id}{suffix}" for suffix in (".header", ".layout", ".payload")
    )
    if not (head.exists() and layout.exists() and payload.exists()):
        return None
    try:
        return Pending(header_from_bytes(head.read_bytes()), layout_from_bytes(layout.read_bytes()), payload)
    except GdfedError as exc:
        # Written by this worker: only a worker of another wire revision leaves what does not parse.
        logger.warning("[state] pending upload %s cannot be read (%s); it is left alone", upload_id, exc)
        return None


class LocalState:
    """A worker's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pending = root / "pending"
        self._pending.mkdir(parents=True, exist_ok=True)
        # One upload per round, each as large as the last: one spent payload to write over.
        self.recycler = Recycler(root / "recycled", keep=1)

    def load_held(self, run_id: str) -> Held | None:
        """The held state, if it belongs to ``run_id``."""
        path = self.root / "held.safetensors"
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("run_id") != run_id:
                return None
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return Held(run_id, int(meta.get("round", "0")), state)

    def save_held(self, run_id: str, round_number: int, state: dict[str, torch.Tensor]) -> None:
        path = self.root / "held.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp),
            {"run_id": run_id, "round": str(round_number)},
        )
        fsync_file(tmp)
        os.replace(tmp, path)

    def payload_path(self, upload_id: str) -> Path:
        return self._pending / f"{upload_id}.payload"

    def save_pending(self, header: DeltaHeader, layout: PayloadLayout) -> None:
        """Record an upload whose payload is already whole at ``payload_path(upload_id)``.

        The header goes last: until it is there, nothing of the upload is pending.
        """
        fsync_file(self.payload_path(header.upload_id))
        self._write(self._pending / f"{header.upload_id}.layout", layout_to_bytes(layout))
        self._write(self._pending / f"{header.upload_id}.header", header_to_bytes(header))

    def pending(self, run_id: str, round_number: int) -> Pending | None:
        """The unacknowledged upload for this run and round, if any."""
        for path in sorted(self._pending.glob("*.header")):
            found = read_pending(self._pending, path.stem)
            if found is not None and found.header.run_id == run_id and found.header.round == round_number:
                return found
        return None

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        fsync_file(tmp)
        os.replace(tmp, path)

    def clear_pending(self) -> None:
        """Forget every pending upload (acknowledged, or its round is over)."""
        for path in self._pending.iterdir():
            if path.suffix == ".payload":
                self.recycler.retire(path)
            else:
                path.unlink()
