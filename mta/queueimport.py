"""`mta queue import --bsmtp FILE`: batch SMTP (mta/bsmtp.py) into the spool.

A message with our envelope record (from `mta queue export`) is stored with exactly that
envelope: its id, arrival, next attempt, priority, states, attempts, DSN parameters. One
without (plain BSMTP from elsewhere, or written by hand) gets a new id and arrives now,
ready, with the DSN parameters of its MAIL and RCPT commands.

Messages are committed BATCH at a time (or BATCH_BYTES of content), one durable
transaction each, through the spool's add_new: an id the spool holds or has ever
imported is skipped, so importing a file twice adds nothing the second time, even after
its messages were delivered. The server may run (LMDB takes writers from several
processes; the scheduler is told of each batch with a New, as inbound tells it) or be
stopped (the messages go out when it starts). A message that cannot be taken is named
with its line and why, and the rest go on; a full queue stops the import (run it again
once there is room: what is in is skipped). Exit 0 when every message is in the spool
(imported now or before), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, BinaryIO, Final

from mta import adminclient, bsmtp, frames, messages, queuebulk
from mta.config import Config
from mta.outfile import Pacer
from mtaqueue.backend import QueueError, QueueFull
from mtaqueue.ids import MessageId, new_id
from mtaqueue.records import Envelope, NewMessage, Recipient

if TYPE_CHECKING:
    from mtaqueue.backend_lmdb import LmdbBackend

BATCH: Final = 100
BATCH_BYTES: Final = 32 * 1024 * 1024
HEADROOM_BYTES: Final = 1024 * 1024  # over [limits] max_message_bytes: our Received header, a bounce's report


def run_import(cfg: Config, args: argparse.Namespace) -> int:
    from mta.spool import open_spool
    if not os.path.isdir(cfg.queue.path):
        print(f"mta queue import: no spool at {cfg.queue.path} (config: {cfg.source}): is -c right? "
              "(`mta serve` makes it at its first start)", file=sys.stderr)
        return 1
    try:
        stream = open(args.file, "rb")
    except OSError as exc:
        print(f"mta queue import: {exc}", file=sys.stderr)
        return 1
    try:
        spool = open_spool(cfg.queue)
        try:
            return Import(cfg, spool, os.path.basename(args.file)).run(stream)
        finally:
            spool.close()
    except (OSError, QueueError, bsmtp.NotBatch) as exc:
        print(f"mta queue import: {args.file}: {exc}", file=sys.stderr)
        return 1
    finally:
        stream.close()


class Import:
    def __init__(self, cfg: Config, spool: LmdbBackend, source: str) -> None:
        self.cfg, self.spool, self.source = cfg, spool, source
        self.pending: list[NewMessage] = []
        self.pending_bytes = 0
        self.added = self.present = self.refused = 0
        self.scheduler = _SchedulerLink(cfg)

    def run(self, stream: BinaryIO) -> int:
        limit = self.cfg.limits.max_message_bytes + HEADROOM_BYTES
        pacer = Pacer()
        try:
            for item in bsmtp.read(stream, limit):
                if isinstance(item, bsmtp.BatchError):
                    self.refused += 1
                    print(f"mta queue import: not imported: {item.error}", file=sys.stderr)
                    continue
                self._add(NewMessage(item.record or self._fresh(item), item.body))
                if pacer.due():
                    done = self.added + self.present
                    print(queuebulk.progress_line("imported", done, 0), file=sys.stderr, flush=True)
            self._commit()
        except QueueFull as exc:
            self.refused += len(self.pending)
            print(f"mta queue import: the queue is full ({exc}): deliver some mail and run the import again "
                  "(the messages already in are skipped)", file=sys.stderr)
        finally:
            self.scheduler.close()
            print(f"imported {self.added} message(s) into {self.cfg.queue.path}"
                  + (f"; {self.present} were there already" if self.present else "")
                  + (f"; {self.refused} not imported" if self.refused else ""))
        return 1 if self.refused else 0

    def _fresh(self, item: bsmtp.BatchMessage) -> Envelope:
        """The envelope of a message with no record of ours: what an SMTP server would store."""
        now = time.time()
        return Envelope(
            id=new_id(now), sender=item.mail.address.text,
            recipients=[Recipient(r.address.text, r.notify, r.orcpt) for r in item.rcpts],
            size=len(item.body), arrival=now, next_attempt=now, ret=item.mail.ret, envid=item.mail.envid,
            body_type=item.mail.body, smtputf8=item.mail.smtputf8,
            client={"protocol": "BSMTP", "helo": item.helo, "file": self.source, "line": item.line})

    def _add(self, message: NewMessage) -> None:
        self.pending.append(message)
        self.pending_bytes += len(message.body)
        if len(self.pending) >= BATCH or self.pending_bytes >= BATCH_BYTES:
            self._commit()

    def _commit(self) -> None:
        if not self.pending:
            return
        added = self.spool.add_new(self.pending)
        self.added += len(added)
        self.present += len(self.pending) - len(added)
        self.pending, self.pending_bytes = [], 0
        self.scheduler.tell(added)


class _SchedulerLink:
    """New(ids) to the running scheduler after each commit, as inbound workers send; nothing
    when it does not run (it loads due messages when it starts, and rescans meanwhile)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sock: socket.socket | None = None
        self.tried = False

    def tell(self, ids: list[MessageId]) -> None:
        if not ids:
            return
        if not self.tried:
            self.tried = True
            self.sock = self._connect()
        if self.sock is None:
            return
        try:
            self.sock.sendall(frames.encode_stream_frame(messages.New(tuple(ids))))
        except OSError:
            self.close()  # its rescan finds them

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(adminclient.SCHEDULER_QUIET_SECONDS)
        try:
            sock.connect(self.cfg.queue.scheduler_socket)
            sock.sendall(frames.encode_stream_frame(messages.hello("cli")))
            hello = frames.recv_stream_frame(sock)
        except (OSError, messages.MessageError):
            sock.close()
            return None
        if not isinstance(hello, messages.Hello):
            sock.close()
            return None
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def add_parsers(qsub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    q = qsub.add_parser("import", parents=[common],
                        help="add the messages of a batch SMTP file; those imported before are skipped")
    q.add_argument("--bsmtp", dest="file", metavar="FILE", required=True, help="a batch SMTP file")
    q.set_defaults(func=run_import)
