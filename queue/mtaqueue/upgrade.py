"""Rebuilding the spool's indexes and counts from its envelopes, in batches: the upgrade
of a format-1 spool and the recount after a quarantine (indexes.py has the layout).

`on_open` runs at every LmdbBackend open and decides:
  format 2, nothing pending            nothing to do
  no format, no envelope, no rebuild   a new spool: format 2 is written (read-write open)
  no format, envelopes: format 1       rebuild; a read-only open raises QueueIOError
                                       telling the operator to start `mta serve` once
  format 2, b"recount" or b"rebuild"   rebuild, unless the open is read-only or passes
                                       recount=False (mta serve's workers: the master
                                       recounts before it forks); those go on with the
                                       counts as they are, stale bydest entries skipped
  any other format                     QueueIOError (written by a newer mta)

`rebuild`: one transaction empties counts and bydest and sets meta b"rebuild" = b""
(taking b"recount" away); then one transaction per BATCH envelopes in id order counts
them, puts their bydest entries, puts or drops their due entry by the due rule (format 1
had one for every message), moves an envelope that does not decode to the corrupt
table, and moves b"rebuild" to the last id it counted. The transaction that finds no
more envelopes removes b"rebuild" and writes format 2. Killed anywhere, the next open
goes on from b"rebuild": each batch commits with its cursor. Writers meanwhile keep the
indexes of ids <= the cursor only (indexes.py), so the result is exact whoever writes
meanwhile, and two processes that both rebuild share the work batch by batch.
`mta serve`'s master opens the spool before it forks anything, so the rebuild runs
there, once, with progress in its log (mta/serve.py).
"""

from __future__ import annotations

from collections.abc import Callable

import lmdb

from mtaqueue import records
from mtaqueue.backend import QueueIOError
from mtaqueue.ids import MessageId
from mtaqueue.indexes import REBUILD, RECOUNT, Changes, Dbs
from mtaqueue.records import CorruptRecord

FORMAT_KEY = b"format"
FORMAT = b"2"
BATCH = 5000

OnProgress = Callable[[int, int], None]  # (envelopes counted, envelopes when it started)
OnCorrupt = Callable[[MessageId, str, bool], None]


def pending(txn: lmdb.Transaction, dbs: Dbs) -> str | None:
    """"new", "upgrade" (format 1), "recount", or None (nothing to do)."""
    found = txn.get(FORMAT_KEY, db=dbs.meta)
    rebuilding = txn.get(REBUILD, db=dbs.meta) is not None
    if found is None:
        if rebuilding or txn.stat(dbs.envelope)["entries"]:
            return "upgrade"
        return "new"
    if bytes(found) != FORMAT:
        raise QueueIOError(f"the queue is in format {bytes(found).decode('ascii', 'replace')}, written by a "
                           f"newer mta; this one reads format {FORMAT.decode()}")
    return "recount" if rebuilding or txn.get(RECOUNT, db=dbs.meta) is not None else None


def on_open(env: lmdb.Environment, dbs: Dbs, path: str, readonly: bool, recount: bool,
            on_progress: OnProgress | None, on_corrupt: OnCorrupt | None) -> None:
    try:
        with env.begin() as txn:
            todo = pending(txn, dbs)
        if todo is None or todo == "recount" and (readonly or not recount):
            return
        if readonly:
            raise QueueIOError(f"the queue at {path} has the layout of an older mta (format 1): start `mta serve` "
                               "once with this version (it upgrades the queue, with progress in its log), "
                               "then try again")
        rebuild(env, dbs, on_progress, on_corrupt)
    except lmdb.Error as exc:
        raise QueueIOError(f"cannot rebuild the indexes of the queue at {path}: {exc}") from exc


def rebuild(env: lmdb.Environment, dbs: Dbs, on_progress: OnProgress | None = None,
            on_corrupt: OnCorrupt | None = None) -> int:
    """Rebuild (or go on rebuilding) counts, bydest and due from the envelopes; the
    number of envelopes this call counted."""
    with env.begin(write=True) as txn:
        todo = pending(txn, dbs)
        if todo == "new":
            txn.put(FORMAT_KEY, FORMAT, db=dbs.meta)
            return 0
        if todo is None:
            return 0  # another process finished it meanwhile
        if txn.get(REBUILD, db=dbs.meta) is None:
            txn.drop(dbs.counts, delete=False)
            txn.drop(dbs.bydest, delete=False)
            txn.delete(RECOUNT, db=dbs.meta)
            txn.put(REBUILD, b"", db=dbs.meta)
        total = txn.stat(dbs.envelope)["entries"]
    done = 0
    while True:
        moved: list[tuple[bytes, str]] = []
        with env.begin(write=True, buffers=True) as txn:
            cursor_key = txn.get(REBUILD, db=dbs.meta)
            if cursor_key is None:
                return done  # another process finished it meanwhile
            batch = _next_batch(txn, dbs, bytes(cursor_key))
            changes = Changes(txn, dbs)
            for key, raw in batch:
                try:
                    changes.count_rebuilt(key, records.decode(raw))
                except CorruptRecord as exc:
                    changes.quarantine(key, raw, str(exc))
                    moved.append((key, str(exc)))
            changes.flush()
            if len(batch) < BATCH:
                txn.delete(REBUILD, db=dbs.meta)
                txn.put(FORMAT_KEY, FORMAT, db=dbs.meta)
            else:
                txn.put(REBUILD, batch[-1][0], db=dbs.meta)
        done += len(batch)
        for key, error in moved:
            if on_corrupt is not None:
                on_corrupt(MessageId(key.decode("ascii", "replace")), error, True)
        if on_progress is not None:
            on_progress(done, max(total, done))
        if len(batch) < BATCH:
            return done


def _next_batch(txn: lmdb.Transaction, dbs: Dbs, after: bytes) -> list[tuple[bytes, bytes]]:
    """Up to BATCH (id, envelope) after `after` (b"": from the first)."""
    out: list[tuple[bytes, bytes]] = []
    cursor = txn.cursor(db=dbs.envelope)
    found = cursor.set_range(after) if after else cursor.first()
    if found and after and cursor.key() == after:
        found = cursor.next()
    while found and len(out) < BATCH:
        out.append((bytes(cursor.key()), bytes(cursor.value())))
        found = cursor.next()
    return out
