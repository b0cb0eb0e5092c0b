"""`mta-sendmail -bs`: an SMTP session on stdin/stdout, each accepted message dropped in
the maildrop (mta/maildrop.py), as Postfix's `sendmail -bs` runs its smtpd.

The session is the sans-I/O core (mta/smtp/server.py) with the server's limits
([limits] max_message_bytes, max_recipients, ...), no AUTH, no STARTTLS, no VRFY/EXPN:
this is only thin glue that moves bytes. The caller is a local user, trusted like any
local submission: every well-formed sender and recipient is accepted (a bare
<postmaster> becomes postmaster@[server] hostname); each message gets Date, Message-ID
and From when missing (mta/localmail.py), then `250 2.0.0 Ok: queued as NAME` once its
file is on disk (NAME: the maildrop file, which the pickup logs with the queue id it
gets), or 451/452 when it cannot be written. The exit code is 0 when the session ends.
Commands are read a line at a time (content in bulk), as an interactive client sends
them, so a script may pipe a whole session in: its DATA is no synchronization error.
"""

from __future__ import annotations

import errno
import os
import secrets
import sys
import time
from typing import BinaryIO

from mta import localmail, maildrop
from mta.config import Config
from mta.durable import write_all
from mta.maildrop import Drop, DropRecipient
from mta.smtp import replies
from mta.smtp.address import Address
from mta.smtp.commands import MailFrom, RcptTo
from mta.smtp.replies import Reply
from mta.smtp.server import CLOSED, NEED_DATA, Message, ServerConnection, ServerOptions

READ_BYTES = 65536
MAX_LINE = 16384  # over the core's longest line (12288, AUTH), so it sees an over-long one as such


def run(cfg: Config, stdin: BinaryIO | None = None, stdout: int = 1) -> int:
    source = stdin if stdin is not None else sys.stdin.buffer
    limits = cfg.limits
    conn = ServerConnection(ServerOptions(
        hostname=cfg.server.hostname, max_message_bytes=limits.max_message_bytes,
        max_recipients=limits.max_recipients, max_errors=limits.max_errors,
        max_received_headers=limits.max_received_headers, bare_newline=limits.bare_newline,
        max_junk_commands=limits.max_junk_commands))
    conn.greet()
    while True:
        event = conn.next_event()
        if event is CLOSED:
            write_all(stdout, conn.data_to_send())
            return 0
        if event is NEED_DATA:
            write_all(stdout, conn.data_to_send())
            # A command line at a time, as an interactive client sends them: a script that
            # pipes a whole session is no SMTP synchronization error. Content in bulk.
            data = source.read1(READ_BYTES) if conn.in_transfer else source.readline(MAX_LINE)
            if data:
                conn.receive_data(data)
            else:
                conn.receive_eof()
        elif isinstance(event, MailFrom):
            conn.reply(replies.MAIL_OK)
        elif isinstance(event, RcptTo):
            conn.reply(replies.RCPT_OK, _qualified(event, cfg.server.hostname))
        elif isinstance(event, Message):
            conn.reply(drop(cfg, event))
        else:  # the options offer nothing else (no AUTH, STARTTLS, VRFY or EXPN)
            raise RuntimeError(f"unexpected SMTP event {event!r}")


def drop(cfg: Config, message: Message) -> Reply:
    """Drop one accepted message; the reply that says whether it is on disk."""
    sender = message.sender.address.text
    done = localmail.complete(message.data, sender=sender, full_name=None, hostname=cfg.server.hostname,
                              now=time.time(), unique=secrets.token_hex(8), extract=False)
    if len(done.message) > cfg.limits.max_message_bytes:
        return replies.SIZE_EXCEEDED
    envelope = Drop(sender, tuple(DropRecipient(r.address.text, r.notify, r.orcpt) for r in message.recipients),
                    message.sender.ret, message.sender.envid)
    try:
        name = maildrop.write(cfg.queue.maildrop_dir, envelope, done.message)
    except OSError as exc:
        return replies.QUEUE_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else replies.QUEUE_ERROR
    maildrop.poke(cfg.queue.maildrop_dir)
    return replies.queued(name)


def _qualified(rcpt: RcptTo, hostname: str) -> RcptTo:
    """The bare <postmaster> (the one path without a domain the core lets through) as postmaster@hostname."""
    if rcpt.address.domain:
        return rcpt
    return RcptTo(Address(rcpt.address.local, hostname), rcpt.notify, rcpt.orcpt or f"rfc822;{rcpt.address.text}")

