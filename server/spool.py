"""Upload spool: the bytes of each upload on disk, so uploads survive crashes and can resume.

An upload's payload is appended to ``spool/<upload_id>.part`` as chunks
arrive. Every ``commit_every`` bytes (and at the end) the file is fsynced;
only then does the caller record the new committed offset, which is what a
resuming worker is told. On resume the file is cut back to the committed
offset, so bytes received but never committed are simply received again.

Files of finished rounds are not deleted but moved to ``spool/recycled`` and
overwritten by the next uploads: rewriting blocks a file already owns (and
pages already cached) costs the kernel about 40 % of the CPU of allocating
new ones (docs/performance.md), and a round's uploads are as large as the
last round's. At most ``MAX_RECYCLED`` files wait there, so the spool's idle
footprint is the last round's uploads, never more than its peak in a round.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from common.files import Recycler, open_over

MAX_RECYCLED = 64


class Spool:
    """Spool files under ``root``."""

    def __init__(self, root: Path, max_recycled: int = MAX_RECYCLED) -> None:
        self.root = root
        self._recycler = Recycler(root / "recycled", max_recycled)

    def path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.part"

    def open_at(self, upload_id: str, offset: int) -> SpoolWriter:
        """A writer appending at ``offset`` (the committed offset; later bytes are dropped)."""
        path = self.path(upload_id)
        if offset == 0:
            # Old bytes (of a recycled file) are overwritten in place; finish() cuts what is left over.
            return SpoolWriter(open_over(path, self._recycler), 0)
        f = path.open("r+b") if path.exists() else path.open("w+b")
        f.truncate(offset)
        f.seek(offset)
        return SpoolWriter(f, offset)

    def read(self, upload_id: str, start: int, size: int) -> bytes:
        with self.path(upload_id).open("rb") as f:
            f.seek(start)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"spool of upload {upload_id} holds fewer than {start + size} bytes")
        return data

    def read_into(self, upload_id: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with the spool's bytes from ``start`` (no fresh allocation)."""
        with self.path(upload_id).open("rb", buffering=0) as f:
            f.seek(start)
            got = 0
            while got < len(out):
                n = f.readinto(out[got:])
                if not n:
                    raise OSError(f"spool of upload {upload_id} holds fewer than {start + len(out)} bytes")
                got += n

    def delete(self, upload_id: str) -> None:
        """Done with an upload's bytes: keep the file for reuse while there is room, else remove it."""
        path = self.path(upload_id)
        if path.exists():
            self._recycler.retire(path)

    def existing(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.part"))


class SpoolWriter:
    """Appends to one spool file; ``sync()`` makes what was written durable."""

    def __init__(self, f: BinaryIO, offset: int) -> None:
        self._f = f
        self.offset = offset
        self.synced = offset

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self.offset += len(data)

    def flush(self) -> None:
        """Hand buffered bytes to the OS, so a reader of the file sees them (not yet durable)."""
        if not self._f.closed:
            self._f.flush()

    def finish(self) -> int:
        """The last byte is written: cut whatever a recycled file held beyond it, fsync; the offset."""
        if not self._f.closed:
            self._f.flush()
            self._f.truncate(self.offset)
        return self.sync()

    def sync(self) -> int:
        """fsync; return the offset now durable."""
        if self._f.closed:
            return self.synced
        self._f.flush()
        os.fsync(self._f.fileno())
        self.synced = self.offset
        return self.synced

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
