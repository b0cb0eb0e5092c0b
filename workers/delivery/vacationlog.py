"""Which senders a mailbox's vacation already answered: `<mailbox>/.mta-vacation`.

RFC 5230 4.2: at most one reply per (sender, :handle) per :days. The record lives in
the mailbox (it moves, is backed up and is deleted with it; no shared cache to evict
it), one line per reply: `<expires unix seconds> <key>`, the key a SHA-256 of the
sender (lower-cased) and the handle, so the file names no correspondent. The check,
the reply's commit to the queue and its record (an fsynced append, after the commit)
happen under one flock of the file (delivery workers are separate processes), so
concurrent deliveries never both reply, and a crash between commit and record costs a
second reply, never a missed one. Expired lines are dropped when they are over half
of the file (rewritten in place under the lock). A line that does not parse (a torn
append) is ignored.

A Maildir++ reader ignores it: a file, not a ".Folder" directory.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os

from mta.durable import write_all

FILE_NAME = ".mta-vacation"
DAY_SECONDS = 86400
LOCK_POLL_SECONDS = 0.01


def _key(sender: str, handle: str) -> str:
    return hashlib.sha256(f"{sender.lower()}\0{handle}".encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _read(fd: int) -> list[tuple[float, str]]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    entries = []
    for line in b"".join(chunks).decode("ascii", "replace").splitlines():
        expires, _, key = line.partition(" ")
        try:
            entries.append((float(expires), key))
        except ValueError:
            continue
    return entries


class VacationLog:
    """The record of one mailbox, locked (flock, exclusive) from `acquire` to `close`:
    the check, the commit of the reply and its record happen under the lock, so two
    deliveries at once (in this process or another) never both answer one sender."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    async def acquire(cls, mailbox: str) -> VacationLog:
        """Wait for the lock without blocking the event loop (or an executor thread)."""
        fd = os.open(os.path.join(mailbox, FILE_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            box, mine = os.stat(mailbox), os.fstat(fd)
            if (mine.st_uid, mine.st_gid) != (box.st_uid, box.st_gid) and os.geteuid() == 0:
                os.fchown(fd, box.st_uid, box.st_gid)  # the mailbox's owner's, like its mail ([local] owner)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return cls(fd)
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        os.close(self._fd)  # (releases the lock)

    def answered(self, sender: str, handle: str, now: float) -> bool:
        """True when `sender` got a reply under `handle` that has not expired yet."""
        key = _key(sender, handle)
        return any(k == key and expires > now for expires, k in _read(self._fd))

    def record(self, sender: str, handle: str, days: int, now: float) -> None:
        """Note a reply to `sender` under `handle`, not to be repeated for `days` (fsynced)."""
        line = f"{now + max(days, 1) * DAY_SECONDS:.0f} {_key(sender, handle)}\n".encode("ascii")
        fd = self._fd
        entries = _read(fd)
        live = [(expires, key) for expires, key in entries if expires > now]
        if len(entries) > 16 and len(live) * 2 < len(entries):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            write_all(fd, "".join(f"{expires:.0f} {key}\n" for expires, key in live).encode("ascii"))
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            line = b"\n" + line  # after a torn append: never glue the two lines
        write_all(fd, line)
        os.fsync(fd)
