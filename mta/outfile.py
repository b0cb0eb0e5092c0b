"""Files the operator's commands write whole or not at all: a backup, a BSMTP export.

`OutFile(path, force)` writes PATH.tmp (mode 0600: it holds mail), and on a clean exit
fsyncs it, renames it to PATH and fsyncs the directory: PATH is then durable. On any
error (Ctrl-C included) PATH.tmp is removed and PATH is left as it was. An existing PATH
is refused (FileExistsError) unless `force`. Progress lines for long copies are paced
here too (`Pacer`). `editor_lock(path)`: one editor at a time of a file the `mta`
commands edit in place (flock on `<path>.lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO, Final

FILE_MODE: Final = 0o600
PROGRESS_SECONDS: Final = 1.0
MIB: Final = 1024 * 1024


class OutFile:
    def __init__(self, path: str, force: bool = False) -> None:
        self.path = path
        self.tmp = path + ".tmp"
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists: pass --force to replace it")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory: name a file")
        self.file: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # a PATH.tmp left by a killed run may have had another mode
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.file is not None
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
            if kind is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp)
        if kind is None:
            os.replace(self.tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))


@contextlib.contextmanager
def editor_lock(path: str) -> Iterator[None]:
    """Hold the exclusive flock on `<path>.lock` (made 0600 if missing) for the block."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def fsync_dir(path: str) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Pacer:
    """True at most once per PROGRESS_SECONDS (never at the first call: short runs print nothing)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return False
        self.last = now
        return True
