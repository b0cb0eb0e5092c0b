"""The pickup's steps on maildrop files (mta/maildrop.py), each on disk before the next.

    claim(limit)      new/NAME -> pickup/ID, ID a fresh queue id; both folders fsynced.
                      From here the file's name is the id its message is committed under.
    read(ID)          the file as untrusted input -> Claimed, or DropError (then `corrupt`)
    [the caller commits the message under ID, due SETTLE_SECONDS from now]
    finish(IDs)       unlink pickup/ID..., fsync pickup/; only then is the scheduler told.
    settle(spool)     files a crash left in pickup/: committed (the envelope is there) ->
                      finished; not committed -> claimed again under a fresh id.

Exactly once: a file's message is committed under the id the file is named by, and the
spool refuses an id twice. A file left in pickup/ whose envelope exists was committed:
it is finished, never committed again. One whose envelope is missing was not committed,
unless its message was also delivered (and deleted) before the pickup came back: the
scheduler cannot have known it before `finish` (it is told after, and a scan finds the
message only once it is due, SETTLE_SECONDS after its commit). So `settle` decides
exactly while no scheduler runs (the master, before it forks) or while the file is
younger than SETTLE_SECONDS (the id's time part says when it was claimed); past that, a
worker commits it again and logs that the copy may be a second one (never a loss).

A file is read with O_NOFOLLOW|O_NONBLOCK and must be a regular file with one link
(no symlink, FIFO, device, or hard link to someone else's file), at most
max_message_bytes + the envelope line. Its owner is the submitting uid.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from mta import logs
from mta.maildrop import CORRUPT, MAGIC, MAX_HEADER_BYTES, NEW, PICKUP, TMP_PREFIX, Drop, DropError, decode
from mta.durable import fsync_folder as _fsync_folder
from mtaqueue.ids import MessageId, is_id, new_id

SETTLE_SECONDS = 60.0  # a picked-up message is due this long after its commit (unless told at once)
ABANDONED_SECONDS = 86400.0  # a tmp. file this old belongs to a writer that died: removed
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Claimed:
    msgid: MessageId
    uid: int  # the file's owner: who submitted it
    drop: Drop
    message: bytes


class Files:
    """The maildrop's files as the pickup moves them (blocking calls: run off the event loop)."""

    def __init__(self, maildrop: str, max_message_bytes: int) -> None:
        self.maildrop = maildrop
        self.new, self.pickup, self.corrupt_dir = (os.path.join(maildrop, d) for d in (NEW, PICKUP, CORRUPT))
        self.max_message_bytes = max_message_bytes

    def claim(self, limit: int, now: float) -> list[MessageId]:
        """Up to `limit` files of new/, moved to pickup/ under fresh ids (on disk when this returns)."""
        claimed: list[MessageId] = []
        with os.scandir(self.new) as entries:
            for entry in entries:
                if len(claimed) >= limit:
                    break
                if entry.name.startswith(TMP_PREFIX):
                    self._drop_abandoned(entry.path, now)
                    continue
                msgid = new_id(now)
                try:
                    os.rename(entry.path, os.path.join(self.pickup, msgid))
                except FileNotFoundError:  # (another pickup took it: a generation overlapping ours)
                    continue
                claimed.append(msgid)
        if claimed:
            _fsync_folder(self.pickup)
            _fsync_folder(self.new)
        return claimed

    def _drop_abandoned(self, path: str, now: float) -> None:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if now - st.st_mtime > ABANDONED_SECONDS:
                os.unlink(path)
                logs.event("maildrop_abandoned", file=os.path.basename(path), uid=st.st_uid, size=st.st_size,
                           action="removed: its writer never finished it")

    def read(self, msgid: MessageId) -> Claimed:
        """The claimed file `msgid`, checked; DropError for anything that is not a sound drop."""
        path = os.path.join(self.pickup, msgid)
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never open a FIFO, a device or a symlink
            raise DropError("not a regular file")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # (swapped for a symlink since: ELOOP)
            raise DropError(f"cannot open it as a plain file: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DropError("not a regular file")
            if st.st_nlink != 1:
                raise DropError(f"it has {st.st_nlink} links (a hard link to another file?)")
            limit = self.max_message_bytes + len(MAGIC) + MAX_HEADER_BYTES + 1
            raw = _read_at_most(fd, limit + 1)
            if len(raw) > limit:
                raise DropError(f"over {limit} bytes ([limits] max_message_bytes and the envelope line)")
            drop, message = decode(raw, self.max_message_bytes)
            return Claimed(msgid, st.st_uid, drop, message)
        finally:
            os.close(fd)

    def owner(self, msgid: MessageId) -> int | None:
        with contextlib.suppress(FileNotFoundError):
            return os.lstat(os.path.join(self.pickup, msgid)).st_uid
        return None

    def corrupt(self, msgid: MessageId, why: str) -> None:
        """Set a refused file aside in corrupt/ (its name: the id it was claimed under)."""
        uid = self.owner(msgid)
        os.rename(os.path.join(self.pickup, msgid), os.path.join(self.corrupt_dir, msgid))
        _fsync_folder(self.pickup)
        logs.event("maildrop_corrupt", file=f"{CORRUPT}/{msgid}", uid=uid, error=why,
                   action=f"set aside in {self.corrupt_dir}, not delivered")

    def finish(self, msgids: list[MessageId]) -> None:
        """The committed files are gone, on disk, before anyone is told about their messages."""
        for msgid in msgids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pickup, msgid))
        _fsync_folder(self.pickup)

    def left(self) -> list[MessageId]:
        """Files in pickup/ (left by a crash, or claimed by this round), oldest first."""
        return sorted(MessageId(name) for name in os.listdir(self.pickup) if is_id(name))

    def settle(self, committed: Callable[[MessageId], bool]) -> tuple[list[MessageId], list[MessageId]]:
        """Files left in pickup/: (finished now: their message was committed, still to commit)."""
        done, pending = [], []
        for msgid in self.left():
            (done if committed(msgid) else pending).append(msgid)
        if done:
            self.finish(done)
        return done, pending

    def reclaim(self, msgid: MessageId, now: float) -> MessageId:
        """A file of pickup/ under a fresh id (the master, for files no scheduler can have seen)."""
        fresh = new_id(now)
        os.rename(os.path.join(self.pickup, msgid), os.path.join(self.pickup, fresh))
        _fsync_folder(self.pickup)
        return fresh


def claimed_at(msgid: MessageId) -> float:
    """When a file was claimed: the time part of the id it was named."""
    return int(msgid[:13], 16) / 1_000_000


def settle_at_start(maildrop: str, max_message_bytes: int, committed: Callable[[MessageId], bool]) -> int:
    """`mta serve`, before it forks (no scheduler runs): files a crash left in pickup/ are
    finished when committed, else claimed again under fresh ids for the pickup. How many were left."""
    files = Files(maildrop, max_message_bytes)
    done, pending = files.settle(committed)
    for msgid in pending:
        files.reclaim(msgid, time.time())
    if done or pending:
        logs.event("maildrop_settled", finished=len(done), again=len(pending),
                   note="files a crash left in the pickup: committed ones removed, the others picked up again")
    return len(done) + len(pending)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(READ_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)

