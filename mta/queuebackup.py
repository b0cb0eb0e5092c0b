"""`mta queue backup FILE` and `mta queue restore FILE`: the spool as one LMDB file, and back.

backup: hot and consistent while the server runs. LMDB copies the spool from one read
transaction, compacted (free pages left out), into FILE.tmp, which is fsynced and renamed
to FILE, then the directory is fsynced (mta/outfile.py): FILE is a whole backup or
absent. The copy holds every table, indexes and counts included, so a restored spool
needs no rebuild. A message acknowledged with 250 before the backup started is in it
(250 comes after the commit); one acknowledged after it ended is not. Progress on stderr
each second, against the spool's used pages (an upper bound: free pages are left out).
An existing FILE is refused without --force.

restore: the server stopped (the spool lock `mta serve` takes is held throughout), into a
spool that holds no message unless --force. FILE is copied into <spool>/restore.tmp/
(the same file system), fsynced, and checked whole (mtaqueue/check.py: every page and
every envelope; a damaged file or one that is not a spool is refused and nothing is
changed); then it is renamed over <spool>/data.mdb, so the spool is the old one or the
restored one, never a mix. LMDB keeps the open file's last transaction in lock.mdb: the
rename is done holding an exclusive lock on lock.mdb (refused, nothing changed, while
any process still has the spool open), and that lock.mdb is invalidated and removed, so
the next open starts from the restored file alone.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import lmdb

from mta.config import Config
from mta.outfile import MIB, OutFile, Pacer, fsync_dir

DATA_FILE: Final = "data.mdb"
LOCK_FILE: Final = "lock.mdb"  # LMDB's reader table and last transaction id
STAGE_DIR: Final = "restore.tmp"
COPY_BYTES: Final = 4 * MIB
FORMATS: Final = (None, b"2")  # None: format 1, upgraded by the next `mta serve`


class RestoreError(Exception):
    """Nothing was changed; the message says why and what to do."""


@dataclass(frozen=True)
class Summary:
    messages: int
    stored_bytes: int  # message data (meta b"bytes")


def summary(path: str) -> Summary:
    """What the spool file at `path` (a spool directory, or a data file) holds, read without
    LMDB's lock file. RestoreError when it is not an mta spool (or not an LMDB file)."""
    subdir = os.path.isdir(path)
    try:
        env = lmdb.open(path, subdir=subdir, readonly=True, lock=False, max_dbs=8, create=False)
    except lmdb.Error as exc:
        raise RestoreError(f"{path} is not an LMDB file: {exc}") from None
    try:
        with env.begin(buffers=False) as txn:
            try:
                envelopes = env.open_db(b"envelope", txn=txn, create=False)
                meta = env.open_db(b"meta", txn=txn, create=False)
            except lmdb.NotFoundError:
                raise RestoreError(f"{path} is an LMDB file but not an mta spool (no envelope table)") from None
            form = txn.get(b"format", db=meta)
            if form not in FORMATS:
                raise RestoreError(f"{path} is a spool of format {form!r}, newer than this mta reads")
            stored = txn.get(b"bytes", db=meta)
            return Summary(txn.stat(envelopes)["entries"], int.from_bytes(stored or b"", "big"))
    except lmdb.Error as exc:
        raise RestoreError(f"{path}: LMDB cannot read it: {exc}") from None
    finally:
        env.close()


# --- backup ---------------------------------------------------------------------------------

def run_backup(cfg: Config, args: argparse.Namespace) -> int:
    from mtaqueue.backend import QueueError
    from mtaqueue.backend_lmdb import LmdbBackend
    if not os.path.exists(os.path.join(cfg.queue.path, DATA_FILE)):
        print(f"mta queue backup: no spool at {cfg.queue.path} (config: {cfg.source}): is -c right?", file=sys.stderr)
        return 1
    try:
        out = OutFile(args.file, args.force)
        spool = LmdbBackend(cfg.queue.path, cfg.queue.max_size_bytes, readonly=True, recount=False)
        try:
            total = spool.stats().map_used_bytes
            with out as f:
                _copy(spool.copy_to, f.fileno(), total)
        finally:
            spool.close()
        held = summary(args.file)
    except (OSError, QueueError, RestoreError) as exc:
        print(f"mta queue backup: {exc}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.file)
    print(f"backup: {args.file}: {held.messages} message(s), {held.stored_bytes} bytes of message data, "
          f"{size} bytes in the file (from {cfg.queue.path})")
    return 0


def _copy(copy_to: Callable[[int], None], fd: int, total: int) -> None:
    """copy_to(fd) in a thread (LMDB's copy releases the GIL), its progress printed meanwhile."""
    failed: list[BaseException] = []

    def body() -> None:
        try:
            copy_to(fd)
        except BaseException as exc:  # handed to the main thread, raised there
            failed.append(exc)

    worker = threading.Thread(target=body, name="backup", daemon=True)
    worker.start()
    pacer = Pacer()
    while worker.is_alive():
        worker.join(0.2)
        if worker.is_alive() and pacer.due():
            done = os.fstat(fd).st_size
            print(f"backup: {done / MIB:.1f} MiB written, at most {total / MIB:.1f} MiB", file=sys.stderr, flush=True)
    if failed:
        raise failed[0]


# --- restore --------------------------------------------------------------------------------

def run_restore(cfg: Config, args: argparse.Namespace) -> int:
    from mta.master.listeners import ServeError
    from mta.serve import lock_spool
    spool = os.path.abspath(cfg.queue.path)
    if not os.path.isfile(args.file):
        print(f"mta queue restore: no backup file {args.file}", file=sys.stderr)
        return 1
    try:
        lock_fd = lock_spool(spool)
    except ServeError as exc:
        print(f"mta queue restore: {exc}; a restore needs the server stopped", file=sys.stderr)
        return 1
    stage = os.path.join(spool, STAGE_DIR)
    try:
        held = _stage(cfg, args, spool, stage)
        _install(os.path.join(stage, DATA_FILE), spool)
    except (OSError, RestoreError) as exc:
        print(f"mta queue restore: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(lock_fd)
    print(f"restored {held.messages} message(s), {held.stored_bytes} bytes of message data, from {args.file} "
          f"into {spool} (config: {cfg.source}); start mta to deliver them")
    if held.stored_bytes > cfg.queue.max_size_bytes:
        print(f"note: that is more than [queue] max_size_bytes ({cfg.queue.max_size_bytes}): mta takes no new "
              "mail until enough is delivered", file=sys.stderr)
    return 0


def _stage(cfg: Config, args: argparse.Namespace, spool: str, stage: str) -> Summary:
    """The backup copied next to the spool and checked; what it holds. RestoreError when it
    must not be installed (the spool holds mail and no --force, the backup is damaged)."""
    from mtaqueue.check import check_spool
    if os.path.exists(os.path.join(spool, DATA_FILE)):
        current = summary(spool)
        if current.messages and not args.force:
            raise RestoreError(f"the spool at {spool} holds {current.messages} message(s): deliver them, move them "
                               "with `mta queue export --bsmtp FILE --all --delete`, or pass --force to replace them")
    shutil.rmtree(stage, ignore_errors=True)  # left by a restore that was killed
    os.mkdir(stage, 0o700)
    target = os.path.join(stage, DATA_FILE)
    total = os.path.getsize(args.file)
    pacer = Pacer()
    with open(args.file, "rb") as src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
        while chunk := src.read(COPY_BYTES):
            dst.write(chunk)
            if pacer.due():
                print(f"restore: copied {dst.tell() / MIB:.1f} of {total / MIB:.1f} MiB", file=sys.stderr, flush=True)
        dst.flush()
        os.fsync(dst.fileno())
    print("restore: checking the backup (every page, every envelope)", file=sys.stderr, flush=True)
    report = check_spool(stage)
    if report.fatal:
        raise RestoreError(f"{args.file} is damaged: {'; '.join(report.damage[:3])}; nothing was changed "
                           "(`mta queue salvage` reads what a damaged spool still holds)")
    for msgid, error in report.undecodable[:10]:
        print(f"restore: note: envelope {msgid} does not decode ({error}): mta moves it aside", file=sys.stderr)
    return summary(target)


def _install(staged: str, spool: str) -> None:
    """Rename the staged file over the spool's, with no process having the spool open."""
    lock_path = os.path.join(spool, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RestoreError(f"a process still has the spool at {spool} open (a running `mta queue` command, or "
                               "workers of an mta that was killed): wait for it to end, then try again; "
                               "nothing was changed") from None
        os.replace(staged, os.path.join(spool, DATA_FILE))
        # A process that waited for this lock would take lock.mdb's state for the old file's:
        # a bad magic number makes LMDB refuse it instead; the next open makes a new one.
        os.pwrite(fd, b"\0" * 8, 0)
        os.unlink(lock_path)
        fsync_dir(spool)
    finally:
        os.close(fd)


def add_parsers(qsub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    q = qsub.add_parser("backup", parents=[common],
                        help="copy the spool into FILE, consistent while the server runs (LMDB's compacting copy)")
    q.add_argument("file", metavar="FILE", help="the backup file (written as FILE.tmp, then renamed)")
    q.add_argument("--force", action="store_true", help="replace FILE if it exists")
    q.set_defaults(func=run_backup, needs_spool=True)
    q = qsub.add_parser("restore", parents=[common],
                        help="replace the spool with a backup FILE (server stopped; checked before it is installed)")
    q.add_argument("file", metavar="FILE", help="a file written by `mta queue backup`")
    q.add_argument("--force", action="store_true", help="replace a spool that still holds messages")
    q.set_defaults(func=run_restore)
