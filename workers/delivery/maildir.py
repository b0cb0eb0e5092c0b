"""Local delivery into Maildir (https://cr.yp.to/proc/maildir.html).

Layout: `root/<domain>/<user>/{tmp,new,cur}` (mta/mailboxes.py: where a mailbox is, and
whether it exists). Operators provision the mailbox, or with [local] mailboxes the file
lists it and `open_mailbox(create=True)` makes its directories at its first delivery;
otherwise only a missing tmp/, new/ or cur/ is added. A domain or user that cannot be a
directory name is 5.1.3. With [local] owner, every folder and file created here is
given to that user (folders 0700, files 0600), so a Dovecot running as it reads them.
File names carry Maildir++ sizes (`,S=<bytes>,W=<bytes with CRLF>`): Dovecot and the
quota count (mta/quota.py) read them instead of stat().
`folder` (a Sieve fileinto, named by workers/delivery/folders.py) is a Maildir++ folder
`<mailbox>/.Name/`, created when missing with its own tmp/new/cur and the empty
`maildirfolder` file Maildir++ readers (Dovecot) expect.

Invariant: when `deliver` returns, the message is in new/ and both the file and the
new/ directory entry have been fsynced; when it raises, nothing is left behind in
tmp/ or new/. Files are written in the local Unix form: LF line ends (as qmail,
Postfix local and Dovecot store them), the CRLF of the wire converted.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import time

from mta.durable import fsync_folder, write_all
from mta.mailboxes import Owner, UnsafeName, mailbox_path

_counter = itertools.count(1)
_TEMPORARY_STORAGE = {errno.ENOSPC: "4.3.0", errno.EIO: "4.3.0", errno.EDQUOT: "4.2.2", errno.EROFS: "4.3.0"}
_PERMISSION = {errno.EACCES, errno.EPERM}
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
_MAX_NAME_ATTEMPTS = 5


class MaildirError(Exception):
    """Delivery refused or failed: `status` is the enhanced status code (RFC 3463)."""

    def __init__(self, temporary: bool, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.temporary = temporary
        self.status = status
        self.text = text


def deliver(root: str, domain: str, user: str, body: bytes, *, return_path: str,
            delivered_to: str, hostname: str, owner: Owner | None = None, folder: str = "") -> str:
    """Store one message durably in the mailbox's new/ (or its Maildir++ `folder`'s, a
    ".Name" directory made by folders.maildir_folder); return the file's path."""
    mailbox = open_mailbox(root, domain, user, owner=owner)
    if folder:
        mailbox = open_folder(mailbox, folder, owner)
    return store(mailbox, prepare(body, return_path=return_path, delivered_to=delivered_to), hostname, owner)


def open_mailbox(root: str, domain: str, user: str, *, create: bool = False, owner: Owner | None = None) -> str:
    """The mailbox directory, its tmp/ new/ cur/ made if missing (and, with `create`, the
    directory itself); MaildirError when it cannot be used."""
    try:
        mailbox = mailbox_path(root, domain, user)
    except UnsafeName as exc:
        raise MaildirError(False, "5.1.3", str(exc)) from None
    if not os.path.isdir(root):
        # The whole store is missing: our configuration, not the recipient.
        raise MaildirError(True, "4.3.5", f"maildir root {root} does not exist")
    try:
        if create:
            _ensure_dir(os.path.dirname(mailbox), owner)
            _ensure_dir(mailbox, owner)
        elif not os.path.isdir(mailbox):
            raise MaildirError(False, "5.1.1", f"no mailbox for {user.lower()}@{domain.lower()}")
        for sub in ("tmp", "new", "cur"):
            _ensure_dir(os.path.join(mailbox, sub), owner)
    except OSError as exc:
        raise as_maildir_error(exc) from exc
    return mailbox


def prepare(body: bytes, *, return_path: str, delivered_to: str) -> bytes:
    """The message as stored: Return-Path and Delivered-To first, LF line ends."""
    return (f"Return-Path: <{_one_line(return_path)}>\n"
            f"Delivered-To: {_one_line(delivered_to)}\n").encode() + body.replace(b"\r\n", b"\n")


def store(mailbox: str, data: bytes, hostname: str, owner: Owner | None = None) -> str:
    """`data` durably in `mailbox`/new/ (the invariant above); its path."""
    try:
        return _store(mailbox, data, hostname, owner)
    except OSError as exc:
        raise as_maildir_error(exc) from exc


def _store(mailbox: str, data: bytes, hostname: str, owner: Owner | None) -> str:
    lines = data.count(b"\n")
    sizes = f",S={len(data)},W={len(data) + lines}"  # W: the size with CRLF line ends (Dovecot's virtual size)
    for _ in range(_MAX_NAME_ATTEMPTS):
        name = _unique_name(hostname) + sizes
        tmp_path = os.path.join(mailbox, "tmp", name)
        new_path = os.path.join(mailbox, "new", name)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            try:
                if owner is not None:
                    os.fchown(fd, *owner)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if not _publish(tmp_path, new_path):
                continue
            try:
                fsync_folder(os.path.join(mailbox, "new"))
            except OSError:
                # Visible but maybe not durable: take it back, the sender retries.
                _unlink_quietly(new_path)
                raise
            return new_path
        finally:
            _unlink_quietly(tmp_path)
    raise MaildirError(True, "4.3.0", f"no unique file name in {mailbox} after {_MAX_NAME_ATTEMPTS} attempts")


def _publish(tmp_path: str, new_path: str) -> bool:
    """tmp/ -> new/ without ever replacing a file; False if the name is taken."""
    try:
        os.link(tmp_path, new_path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS or os.path.lexists(new_path):
            raise
    os.rename(tmp_path, new_path)  # a file system without hard links
    return True


def _unique_name(hostname: str) -> str:
    # time.MusecPpidQcounterRrandom.host: unique across processes, restarts and hosts.
    now = time.time()
    host = hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    return (f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(_counter)}"
            f"R{secrets.token_hex(8)}.{host}")


def _ensure_dir(path: str, owner: Owner | None) -> None:
    try:
        os.mkdir(path, 0o700)
        if owner is not None:
            os.chown(path, *owner)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None


def open_folder(mailbox: str, folder: str, owner: Owner | None = None) -> str:
    """The Maildir++ folder's path, made (durably) with tmp/new/cur and `maildirfolder` when
    missing (given to `owner` like the rest); MaildirError when it cannot be."""
    assert folder.startswith(".") and "/" not in folder and folder not in (".", ".."), folder
    path = os.path.join(mailbox, folder)
    if os.path.isdir(os.path.join(path, "new")):
        return path
    try:
        _ensure_dir(path, owner)
        for sub in ("tmp", "new", "cur"):
            _ensure_dir(os.path.join(path, sub), owner)
        marker = os.open(os.path.join(path, "maildirfolder"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if owner is not None:
                os.fchown(marker, *owner)
        finally:
            os.close(marker)
        fsync_folder(path)
        fsync_folder(mailbox)
    except OSError as exc:
        raise as_maildir_error(exc) from exc
    return path


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def as_maildir_error(exc: OSError) -> MaildirError:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in _PERMISSION:
        return MaildirError(True, "4.2.0", f"mailbox not writable: {exc.strerror}{where}")
    status = _TEMPORARY_STORAGE.get(exc.errno or 0, "4.3.0")
    return MaildirError(True, status, f"mailbox write failed: {exc.strerror}{where}")


def _one_line(text: str) -> str:
    return "".join("?" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
