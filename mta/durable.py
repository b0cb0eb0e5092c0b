"""Durable file writes: every byte of a buffer written, and a folder's entries fsynced.

Shared by whatever must say "on disk" before it answers: Maildir delivery, the
maildrop's writer and its pickup. Standard library only (mta-sendmail imports it).
"""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_folder(path: str) -> None:
    """Make the folder's entries (a create, a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
