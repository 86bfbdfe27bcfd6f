"""Content-addressed files: encoded payloads and state files, named by their digest.

A payload is addressed by its layout's digest (the hash tree over its
frames, BLAKE3 or SHA-256 as its codec says), which the encoder computes
anyway; a state file by the SHA-256 of its bytes. Files are written under ``tmp/``, fsynced, then renamed into
``blobs/ab/<digest>``: a crash never leaves a half-written blob under a
valid name. Deleted blobs wait in ``recycled/`` for a new state file or
payload to be written over them (common.files.Recycler): a round writes a
state and a difference about as large as the ones it retires.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from common.files import Recycler, fsync_dir, fsync_file

# A round retires one state file and one difference (and now and then a snapshot); four cover it.
KEEP_RECYCLED = 4


class BlobStore:
    """Immutable files under ``root/blobs``, written through ``root/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self.recycler = Recycler(root / "recycled", KEEP_RECYCLED)
        for stale in self._tmp.iterdir():
            # Leftovers of a write that crashed before its rename; never referenced.
            stale.unlink()

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path to write a future blob to."""
        return self._tmp / f"{uuid.uuid4().hex}{suffix}"

    def path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (it may not exist)."""
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a 32-byte hex digest: {digest!r}")
        return self._blobs / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return bool(digest) and self.path(digest).exists()

    def adopt(self, temp: Path, digest: str | None = None) -> str:
        """Move a finished temp file into the store under ``digest`` (computed if not given)."""
        if digest is None:
            digest = file_sha256(temp)
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        fsync_file(temp)
        os.replace(temp, target)
        fsync_dir(target.parent)
        return digest

    def delete(self, digest: str) -> None:
        path = self.path(digest)
        if path.exists():
            self.recycler.retire(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
