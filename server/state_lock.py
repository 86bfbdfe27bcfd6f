"""One daemon per state directory: an exclusive lock on ``STATE_DIR/LOCK``, held for the daemon's life.

Two daemons on one directory would both append to its spool and both decide
its rounds. ``flock`` is released by the kernel when its holder exits, however
it exits, so a daemon killed with SIGKILL leaves a ``LOCK`` file that blocks
nobody; the file is never removed (removing it would let a third daemon lock a
new file while a second still holds the old one). The holder writes its pid in
the file so that the one refused can say whom it lost to.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from server.config import ConfigError

LOCK_NAME = "LOCK"


class StateDirLock:
    """The lock of one state directory; ``release`` (or exiting the process) gives it up."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        """Lock ``state_dir`` (created if missing) for this process.

        Raises:
            ConfigError: Another process holds it (naming its pid), or the directory cannot be made.
        """
        lock = cls(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            problem = (
                "not a directory"
                if state_dir.exists() and not state_dir.is_dir()
                else (exc.strerror or str(exc)).lower()
            )
            raise ConfigError(
                f"state directory {state_dir}: {problem}; choose another --state-dir", field="state_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise ConfigError(
                f"state directory {state_dir} is locked by pid {holder} (another gdfed serve?); "
                "stop that daemon or choose another --state-dir",
                field="state_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        lock._fd = fd
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    """The pid its holder wrote ("unknown" in the moment between its lock and its write)."""
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"
