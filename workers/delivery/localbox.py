"""Local delivery of one message to one recipient: which mailbox, its quota, the store, the warning.

Without [local] mailboxes the recipient's own directory must exist (maildir.deliver).
With it, the file (mta/mailboxfile.py, re-read when it changes) names the mailbox: its
address or one of its aliases, else 5.1.1; its directory is made at the first delivery.
A mailbox with a quota (mta/quota.py, Maildir++ maildirsize): a message that does not
fit is refused 4.2.2 (deferred; the scheduler bounces it with 5.2.2 at the queue
lifetime), or 5.2.2 at once with [local] quota_full = "bounce". A stored message is
counted in maildirsize. A delivery that takes usage from below [local]
quota_warn_percent to it or above stores one warning message in the mailbox; the marker
file (quota.WARNED_MARKER) remembers it, and is removed by a delivery that finds usage
below the threshold again, so each crossing warns once.

Blocking file I/O: called on a thread (DeliveryWorker._deliver_local).
"""

from __future__ import annotations

import email.utils
import os
import secrets

from mta import logs, quota
from mta.config import Config
from mta.mailboxes import Owner, UnsafeName, mailbox_path, resolve_owner
from mta.mailboxfile import Mailbox, MailboxFile
from workers.delivery import maildir
from workers.delivery.maildir import MaildirError


class LocalDelivery:
    def __init__(self, config: Config) -> None:
        self.root = config.local.maildir_root
        self.hostname = config.server.hostname
        self.bounce_when_full = config.local.quota_full == "bounce"
        self.warn_percent = config.local.quota_warn_percent
        self.owner: Owner | None = resolve_owner(config.local.owner)
        self.mailboxes = MailboxFile(config.local.mailboxes) if config.local.mailboxes else None

    def mailbox_dir(self, address: str) -> str | None:
        """The existing folder of the mailbox `address` names (with the file: its address or an
        alias); None when there is none yet (the Sieve script and vacation record live there)."""
        if self.mailboxes is not None:
            box = self.mailboxes.lookup(address)
            if box is None:
                return None
            user, domain = box.user, box.domain
        else:
            user, _, domain = address.rpartition("@")
        try:
            mailbox = mailbox_path(self.root, domain, user)
        except UnsafeName:
            return None
        return mailbox if os.path.isdir(mailbox) else None

    def deliver(self, address: str, body: bytes, *, return_path: str, folder: str = "") -> str:
        """Store `body` for `address` in its INBOX, or in its Maildir++ `folder` (".Name", a Sieve
        fileinto: made when missing); the file's path, or MaildirError. Quota counts every folder."""
        user, _, domain = address.rpartition("@")
        if self.mailboxes is None:
            return maildir.deliver(self.root, domain.lower(), user, body, return_path=return_path,
                                   delivered_to=address, hostname=self.hostname, owner=self.owner, folder=folder)
        box = self.mailboxes.lookup(address)
        if box is None:
            raise MaildirError(False, "5.1.1", f"no mailbox for {address.lower()} in {self.mailboxes.path}")
        mailbox = maildir.open_mailbox(self.root, box.domain, box.user, create=True, owner=self.owner)
        target = maildir.open_folder(mailbox, folder, self.owner) if folder else mailbox
        data = maildir.prepare(body, return_path=return_path, delivered_to=box.address)
        if not box.has_quota:
            return maildir.store(target, data, self.hostname, self.owner)
        limits = quota.Limits(box.quota_bytes, box.quota_messages)
        try:
            before = quota.usage(mailbox, limits, owner=self.owner)
        except OSError as exc:
            raise maildir.as_maildir_error(exc) from exc
        if not before.fits(limits, len(data)):
            raise MaildirError(not self.bounce_when_full, "5.2.2" if self.bounce_when_full else "4.2.2",
                               f"Mailbox full: {box.address} holds {_describe(before, limits)}, "
                               f"the message has {len(data)} bytes")
        path = maildir.store(target, data, self.hostname, self.owner)
        after = quota.Usage(before.bytes + len(data), before.messages + 1)
        try:
            quota.add(mailbox, len(data))
            self._warn(box, mailbox, limits, before, after)
        except OSError as exc:  # the message is stored: a wrong count is recalculated later, never a retry
            logs.event("quota_error", mailbox=box.address, error=str(exc))
        return path

    def _warn(self, box: Mailbox, mailbox: str, limits: quota.Limits, before: quota.Usage,
              after: quota.Usage) -> None:
        if not self.warn_percent:
            return
        marker = os.path.join(mailbox, quota.WARNED_MARKER)
        if before.percent(limits) < self.warn_percent:
            try:
                os.unlink(marker)  # below again: the next crossing warns
            except FileNotFoundError:
                pass
        if after.percent(limits) < self.warn_percent:
            return
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return  # warned already for this crossing
        try:
            if self.owner is not None:
                os.fchown(fd, *self.owner)
        finally:
            os.close(fd)
        warning = maildir.prepare(self._warning(box, limits, after), return_path="", delivered_to=box.address)
        maildir.store(mailbox, warning, self.hostname, self.owner)
        quota.add(mailbox, len(warning))
        logs.event("quota_warning", mailbox=box.address, percent=int(after.percent(limits)),
                   bytes=after.bytes, messages=after.messages)

    def _warning(self, box: Mailbox, limits: quota.Limits, usage: quota.Usage) -> bytes:
        percent = int(usage.percent(limits))
        then = "bounced" if self.bounce_when_full else "held back and returned to their senders if no room is made"
        text = (f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>\r\n"
                f"To: <{box.address}>\r\n"
                f"Subject: Your mailbox is {percent}% full\r\n"
                f"Date: {email.utils.formatdate(localtime=True)}\r\n"
                f"Message-ID: <quota.{secrets.token_hex(8)}@{self.hostname}>\r\n"
                "Auto-Submitted: auto-generated\r\n"
                "MIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=us-ascii\r\n"
                "\r\n"
                f"Your mailbox {box.address} holds {_describe(usage, limits)}.\r\n"
                f"When it is full, new messages to it are {then}.\r\n"
                "Delete or archive messages you no longer need to make room.\r\n")
        return text.encode("ascii", "replace")


def _describe(usage: quota.Usage, limits: quota.Limits) -> str:
    parts = []
    if limits.bytes:
        parts.append(f"{usage.bytes} of {limits.bytes} bytes")
    if limits.messages:
        parts.append(f"{usage.messages} of {limits.messages} messages")
    return " and ".join(parts)
