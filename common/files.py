"""Durable file writes: fsync a file or a directory, so a rename that follows survives power loss;
and files rewritten over the blocks of spent ones."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Recycler:
    """Spent files kept in ``directory`` so that new files can take over their disk blocks.

    Rewriting blocks a file already owns (its pages often still cached) costs
    the kernel well under half the CPU of allocating new ones: no block
    allocation, no new page-cache pages, a lighter fsync (docs/performance.md).
    Whoever writes the same volume round after round (upload spools, state
    files, payloads) retires spent files here instead of deleting them. At
    most ``keep`` files wait; beyond that, retiring deletes.
    """

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # files are taken and retired from concurrent threads

    def retire(self, path: Path) -> None:
        """Done with ``path``: keep its file for reuse while there is room, else remove it."""
        with self._lock:
            if len(list(self.directory.glob("*.spent"))) < self.keep:
                with suppress(FileNotFoundError):
                    path.rename(self.directory / f"{uuid.uuid4().hex}.spent")
                return
        path.unlink(missing_ok=True)

    def take(self, path: Path) -> bool:
        """Move the largest spent file to ``path`` (which must not exist); False when there is none.

        A file this process still has open is skipped: a reader that opened it
        before it was retired (a snapshot being encoded from an old state, a
        slow FetchDiff stream) must go on reading what it opened, as it would
        from a deleted file. Where open files cannot be listed, nothing is reused.
        """
        busy = _open_files()
        if busy is None:
            return False
        with self._lock:
            spent = []
            for candidate in self.directory.glob("*.spent"):
                if str(candidate.resolve()) in busy:
                    continue
                try:
                    spent.append((candidate.stat().st_size, candidate))
                except FileNotFoundError:
                    continue
            for _, candidate in sorted(spent, reverse=True):
                try:
                    candidate.rename(path)
                except FileNotFoundError:
                    continue
                return True
        return False


def _open_files() -> set[str] | None:
    """Paths of the files this process has open (Linux /proc), or None where that is unknown."""
    fd_dir = "/proc/self/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    paths = set()
    for fd in fds:
        with suppress(OSError):
            paths.add(os.readlink(f"{fd_dir}/{fd}"))
    return paths


@contextmanager
def rewrite(path: Path, recycler: Recycler | None = None) -> Iterator[BinaryIO]:
    """Open ``path`` for writing from its start, as ``open("wb")`` does, but over old blocks.

    An existing file at ``path`` is overwritten in place rather than emptied
    first; otherwise a spent file of ``recycler`` is taken over. When the
    block ends without error the file is cut where the writing stopped, so
    nothing of the old contents is left past it.
    """
    with open_over(path, recycler) as f:
        yield f
        f.truncate()


def open_over(path: Path, recycler: Recycler | None = None) -> BinaryIO:
    """``path`` opened for writing from its start, over an existing file or a spent one's blocks.

    Unlike ``open("wb")`` nothing is emptied first: the caller cuts the file
    (``truncate()``) once the last byte is written.
    """
    reuse = path.exists() or (recycler is not None and recycler.take(path))
    return path.open("r+b" if reuse else "wb")
