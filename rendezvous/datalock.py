"""One server per data folder: an exclusive `fcntl` lock on DATA/serve.lock.

`serve` takes the lock before it touches the folder and holds it until the process ends
(the kernel drops it on any exit, SIGKILL included, so a crash never leaves a stale lock).
The file holds the holder's pid, so a second `serve`, `restore` or an operator command can
say which process serves the folder and signal it (`holder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "serve.lock"


class DataInUse(Exception):
    """Another process holds the folder's lock; `pid` is it, when the file says."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"{data_dir} is already served by {who} "
                         "(one server per data folder)")
        self.pid = pid


class DataLock:
    """The held lock; `release()` (or the process ending) frees it."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path) -> DataLock:
        """Lock DATA/serve.lock (made if missing) and write our pid; DataInUse if held."""
        path = Path(data_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataInUse(Path(data_dir), _read_pid(path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor drops the flock


def holder(data_dir: Path) -> tuple[bool, int | None]:
    """Whether a process serves `data_dir` (holds its lock), and its pid if the file says."""
    path = Path(data_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _read_pid(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
