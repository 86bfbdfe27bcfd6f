"""Upload spool: the bytes of each upload on disk, so uploads survive crashes and can resume.

An upload's payload is appended to ``spool/<upload_id>.part`` as chunks
arrive. Every ``commit_every`` bytes (and at the end) the file is fsynced;
only then does the caller record the new committed offset, which is what a
resuming worker is told. On resume the file is cut back to the committed
offset, so bytes received but never committed are simply received again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


class Spool:
    """Spool files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.part"

    def open_at(self, upload_id: str, offset: int) -> SpoolWriter:
        """A writer appending at ``offset`` (the committed offset; later bytes are dropped)."""
        path = self.path(upload_id)
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
        path = self.path(upload_id)
        if path.exists():
            path.unlink()

    def existing(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.part"))


class SpoolWriter:
    """Appends to one spool file; ``sync()`` makes what was written durable."""

    def __init__(self, f: BinaryIO, offset: int) -> None:
        self._f = f
        self.offset = offset
        self.synced = offset

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.offset += len(data)

    def flush(self) -> None:
        """Hand buffered bytes to the OS, so a reader of the file sees them (not yet durable)."""
        if not self._f.closed:
            self._f.flush()

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
