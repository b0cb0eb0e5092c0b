"""`mta queue export --bsmtp FILE (ID...|--domain D|--all) [--delete]`: queued messages out
as batch SMTP (mta/bsmtp.py), for another node's `mta queue import`.

The spool is read BATCH messages at a time (arrival order; --domain through the spool's
index; one short read transaction per batch, a body at a time) into FILE.tmp, which is
fsynced and renamed to FILE at the end (mta/outfile.py): FILE is whole or absent. The ids
written go to an unnamed temporary file, not a list: constant memory whatever the queue.
A finished message (no recipient left to deliver) is not exported.

Without --delete nothing is changed (the server may run; a message it delivers meanwhile
may be in the file too, as it was when read).

--delete removes the exported messages, and only once FILE is durable:
- server stopped: the spool lock `mta serve` takes is held throughout (no server starts
  meanwhile); deletes go to the spool, in batches.
- server running: each batch is held through the scheduler before it is read (the
  command `mta queue hold` sends), and read once no session carries one of its messages
  (ActiveQuery): an attempt that was under way has its outcome in what is read. A
  recipient goes into the file in the state it had before our hold (ready, deferred or
  held; deferred when an attempt ended meanwhile), so the next node goes on where this
  one stopped. Deletes then go through the scheduler (`mta queue delete`'s command).
  If the export fails before FILE is durable, the messages it held are released (a
  deferred recipient becomes due now), except those that had held recipients before,
  which stay held and are named.
No message is then delivered by both nodes, and none is lost.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Final

from mta import adminclient, bsmtp, messages, queuebulk, queueops
from mta.adminclient import ControlError
from mta.config import Config
from mta.outfile import OutFile, Pacer
from mtaqueue.backend import QueueError
from mtaqueue.ids import MessageId, is_id
from mtaqueue.records import Envelope

if TYPE_CHECKING:
    from mtaqueue.backend_lmdb import LmdbBackend

BATCH: Final = 1000
SETTLE_SECONDS: Final = 600.0  # the longest wait for the sessions that carry a held batch
SETTLE_ROUNDS: Final = 5  # holds of one batch before giving up (an outcome keeps arriving)
POLL_SECONDS: Final = 0.2
SHOWN: Final = 20


class ExportError(Exception):
    """The export stopped; the message says what was changed and what to do."""


def run_export(cfg: Config, args: argparse.Namespace) -> int:
    from mta.master.listeners import ServeError
    from mta.serve import lock_spool
    from mtaqueue.backend_lmdb import LmdbBackend
    if not (args.ids or args.domain or args.all):
        print("mta queue export: name message IDs, --domain D or --all", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(cfg.queue.path, "data.mdb")):
        print(f"mta queue export: no spool at {cfg.queue.path} (config: {cfg.source}): is -c right?", file=sys.stderr)
        return 1
    lock_fd = None
    if args.delete:
        try:
            lock_fd = lock_spool(cfg.queue.path)  # stopped: no server may start before we are done
        except ServeError:
            lock_fd = None  # running: the scheduler holds, then deletes
    try:
        spool = LmdbBackend(cfg.queue.path, cfg.queue.max_size_bytes, readonly=True, recount=False)
        try:
            return Export(cfg, args, spool, running=args.delete and lock_fd is None).run()
        finally:
            spool.close()
    except (OSError, QueueError, ControlError, ExportError) as exc:
        print(f"mta queue export: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mta queue export: interrupted: {args.file} was not written, nothing was deleted", file=sys.stderr)
        return 130
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


class Export:
    command = "mta queue export"  # names the command in what it prints (queuetransfer.py's Transfer too)
    not_done = "not exported"

    def __init__(self, cfg: Config, args: argparse.Namespace, spool: LmdbBackend, running: bool) -> None:
        self.cfg, self.args, self.spool, self.running = cfg, args, spool, running
        self.domain = queueops.destination_of("@" + args.domain) if args.domain else None
        # "ID FLAG\n" per message read: written (R, or K: it had held recipients before),
        # or left in the spool (S, or -: it had held recipients before)
        self.ids: IO[str] = tempfile.TemporaryFile("w+", encoding="ascii")
        self.holding: dict[MessageId, bool] = {}  # the batch held now: id -> had held recipients before
        self.count = self.finished = self.skipped = 0

    def run(self) -> int:
        with self.ids:
            if self.running and adminclient.ask_scheduler(self.cfg, messages.ActiveQuery(), messages.ActiveJobs) is None:
                raise ExportError(f"a server holds the spool at {self.cfg.queue.path} but its scheduler does not "
                                  "answer (starting or stopping?): try again")
            try:
                self._write()
            except BaseException:
                if self.running:
                    self._undo()
                raise
            print(f"exported {self.count} message(s) to {self.args.file}"
                  + (f"; {self.finished} finished one(s) left out" if self.finished else "")
                  + (f"; {self.skipped} could not be written (left in the spool)" if self.skipped else ""))
            if self.args.delete:
                self._delete()
            if self.running and self.skipped:
                self._release("S")  # held for the export, not in it: as they were (deferred ones due now)
        return 1 if self.skipped else 0

    # --- reading and writing ------------------------------------------------------------

    def _write(self) -> None:
        total = self.spool.totals()["messages"] if self.args.all else len(self.args.ids)
        pacer = Pacer()
        with OutFile(self.args.file, self.args.force) as out:
            out.write(bsmtp.header(self.cfg.server.hostname))
            for batch in self._batches():
                for envelope, body in self._settled(batch) if self.running else self._read(batch):
                    try:
                        pieces = bsmtp.message(envelope, body)
                    except ValueError as exc:  # an address no MAIL or RCPT can carry: left here
                        self._skip(envelope, str(exc))
                        continue
                    if not pieces:
                        self.finished += 1
                        continue
                    out.writelines(pieces)
                    self.ids.write(f"{envelope.id} {'K' if _had_held(envelope) else 'R'}\n")
                    self.count += 1
                if pacer.due():
                    print(queuebulk.progress_line("exported", self.count, total), file=sys.stderr, flush=True)
            out.write(bsmtp.trailer())

    def _skip(self, envelope: Envelope, why: str) -> None:
        """Not exported: left in the spool (never deleted), released at the end if we held it."""
        self.skipped += 1
        self.ids.write(f"{envelope.id} {'-' if _had_held(envelope) else 'S'}\n")
        print(f"{self.command}: {self.not_done}: {envelope.id}: {why}", file=sys.stderr)

    def _batches(self) -> Iterator[list[Envelope]]:
        """The selected messages, BATCH at a time, as the spool has them now."""
        if not (self.args.all or self.domain):
            names = [MessageId(i.upper()) for i in dict.fromkeys(self.args.ids) if is_id(i.upper())]
            for start in range(0, len(names), BATCH):
                yield [e for e in map(self.spool.envelope, names[start:start + BATCH]) if e is not None]
            return
        after = None
        while batch := self.spool.page(after, BATCH, self.domain):
            yield batch
            after = batch[-1].id

    def _read(self, batch: list[Envelope]) -> Iterator[tuple[Envelope, bytes]]:
        for e in batch:
            envelope, body = self.spool.message(e.id)
            if envelope is not None and body is not None:
                yield envelope, body

    def _settled(self, batch: list[Envelope]) -> Iterator[tuple[Envelope, bytes]]:
        """Server running: the batch held, no session carrying it, then read; each recipient
        in the state it had before the hold."""
        before = {e.id: e for e in batch if not queueops.finished(e)}
        self.holding = {msgid: _had_held(e) for msgid, e in before.items()}
        waiting = list(before)
        settled: list[MessageId] = []
        for _ in range(SETTLE_ROUNDS):
            if not waiting:
                break
            self._scheduler(messages.QueueCommand("hold", tuple(waiting)))
            self._wait_idle(set(waiting))
            again = []
            for msgid in waiting:
                envelope = self.spool.envelope(msgid)
                if envelope is None:
                    continue  # deleted meanwhile (by an operator, or delivered)
                if any(r.state in ("ready", "deferred") for r in envelope.recipients):
                    again.append(msgid)  # an outcome came after the hold: hold it again
                else:
                    settled.append(msgid)
            waiting = again
        if waiting:
            raise ExportError(f"{len(waiting)} message(s) would not stay held (e.g. {waiting[0]})")
        for msgid in settled:  # one body in memory at a time
            envelope, body = self.spool.message(msgid)
            if envelope is not None and body is None:  # damage: left here, released at the end
                self._skip(unheld(before[msgid], envelope), "its body is missing from the spool")
            elif envelope is not None and body is not None:
                yield unheld(before[msgid], envelope), body
            self.holding.pop(msgid, None)  # in the ids file from here, or gone

    def _wait_idle(self, ids: set[MessageId]) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            active = self._scheduler(messages.ActiveQuery())
            assert isinstance(active, messages.ActiveJobs)
            busy = ids & active.active.keys()
            if not busy:
                return
            if time.monotonic() > deadline:
                raise ExportError(f"{len(busy)} held message(s) still in delivery after {SETTLE_SECONDS:.0f} s "
                                  f"(e.g. {next(iter(busy))})")
            time.sleep(POLL_SECONDS)

    def _scheduler(self, question: messages.Message) -> messages.Message:
        answer = messages.CommandResult if isinstance(question, messages.QueueCommand) else messages.ActiveJobs
        got = adminclient.ask_scheduler(self.cfg, question, answer)
        if got is None:
            raise ExportError(f"the scheduler at {self.cfg.queue.scheduler_socket} went away (the server stopped?)")
        return got

    # --- after the file: delete, or undo ---------------------------------------------------

    def _id_batches(self, flags: str) -> Iterator[list[MessageId]]:
        """The ids recorded with one of `flags`, BATCH at a time."""
        self.ids.seek(0)
        batch: list[MessageId] = []
        for line in self.ids:
            msgid, _, kind = line.rstrip("\n").partition(" ")
            if kind in flags:
                batch.append(MessageId(msgid))
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _delete(self) -> None:
        done, pacer = 0, Pacer()
        for batch in self._id_batches("RK"):
            if self.running:
                self._scheduler(messages.QueueCommand("delete", tuple(batch)))
            else:
                self.spool.delete(batch)
            done += len(batch)
            if pacer.due():
                print(queuebulk.progress_line("delete", done, self.count), file=sys.stderr, flush=True)
        print(f"deleted {done} exported message(s) from {self.cfg.queue.path}"
              + (" (through the running scheduler)" if self.running else ""))

    def _undo(self) -> None:
        """The export failed: release what it held (the messages of the batch under way too)."""
        current = [msgid for msgid, had in self.holding.items() if not had]
        released = self._release("RS", current)
        kept = [msgid for msgid, had in self.holding.items() if had]
        count = len(kept) + sum(len(batch) for batch in self._id_batches("K-"))
        shown = (kept + [msgid for batch in itertools.islice(self._id_batches("K-"), 1) for msgid in batch])[:SHOWN]
        print(f"{self.command}: failed: released the {released} message(s) it had held", file=sys.stderr)
        if count:
            print(f"{self.command}: {count} message(s) had held recipients before and stay held: "
                  f"{' '.join(shown)}{' ...' if count > SHOWN else ''}; `mta queue release ID` "
                  "releases one", file=sys.stderr)


    def _release(self, flags: str, more: list[MessageId] | None = None) -> int:
        """Release the recorded ids with one of `flags` (and `more`) through the scheduler."""
        released = 0
        for batch in itertools.chain([more or []], self._id_batches(flags)):
            if batch:
                self._scheduler(messages.QueueCommand("release", tuple(batch)))
                released += len(batch)
        return released


def unheld(before: Envelope, after: Envelope) -> Envelope:
    """`after` with each recipient our hold made held put back in its state from `before`
    (deferred when an attempt ended in between: its attempts grew)."""
    for r, old in zip(after.recipients, before.recipients):
        if r.state == "held" and old.state != "held":
            r.state = "deferred" if r.attempts > old.attempts else old.state
    return after


def _had_held(envelope: Envelope) -> bool:
    return any(r.state == "held" for r in envelope.recipients)


def add_parsers(qsub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    q = qsub.add_parser("export", parents=[common],
                        help="write messages to a batch SMTP file (RFC 2442) for `mta queue import` on another node")
    q.add_argument("--bsmtp", dest="file", metavar="FILE", required=True,
                   help="the file to write (FILE.tmp, then renamed when complete)")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", metavar="ID", default=[])
    which.add_argument("--domain", help="every message with a queued recipient at this destination")
    which.add_argument("--all", action="store_true", help="every message")
    q.add_argument("--delete", action="store_true",
                   help="remove the exported messages once FILE is durable (held first while the server runs)")
    q.add_argument("--force", action="store_true", help="replace FILE if it exists")
    q.set_defaults(func=run_export, needs_spool=True)
