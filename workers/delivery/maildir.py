"""Local delivery into Maildir (https://cr.yp.to/proc/maildir.html).

Layout: `root/<domain>/<user>/{tmp,new,cur}` (mta/mailboxes.py: where a mailbox is, and
whether it exists). Operators provision the mailbox; `deliver` only adds a missing
tmp/, new/ or cur/ inside it. A domain or user that cannot be a directory name is 5.1.3.
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
from mta.mailboxes import UnsafeName, mailbox_path

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
            delivered_to: str, hostname: str, folder: str = "") -> str:
    """Store one message durably in the mailbox's new/ (or its Maildir++ `folder`'s, a
    ".Name" directory made by folders.maildir_folder); return the file's path."""
    try:
        mailbox = mailbox_path(root, domain, user)
    except UnsafeName as exc:
        raise MaildirError(False, "5.1.3", str(exc)) from None
    if not os.path.isdir(mailbox):
        if not os.path.isdir(root):
            # The whole store is missing: our configuration, not the recipient.
            raise MaildirError(True, "4.3.5", f"maildir root {root} does not exist")
        raise MaildirError(False, "5.1.1", f"no mailbox for {user.lower()}@{domain.lower()}")
    data = (f"Return-Path: <{_one_line(return_path)}>\n"
            f"Delivered-To: {_one_line(delivered_to)}\n").encode("utf-8") + body.replace(b"\r\n", b"\n")
    try:
        for sub in ("tmp", "new", "cur"):
            _ensure_dir(os.path.join(mailbox, sub))
        if folder:
            return _store(_ensure_folder(mailbox, folder), data, hostname)
        return _store(mailbox, data, hostname)
    except OSError as exc:
        raise _as_maildir_error(exc) from exc


def _store(mailbox: str, data: bytes, hostname: str) -> str:
    for _ in range(_MAX_NAME_ATTEMPTS):
        name = _unique_name(hostname)
        tmp_path = os.path.join(mailbox, "tmp", name)
        new_path = os.path.join(mailbox, "new", name)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            try:
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
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return (f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(_counter)}"
            f"R{secrets.token_hex(8)}.{host}")


def _ensure_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None


def _ensure_folder(mailbox: str, folder: str) -> str:
    """The Maildir++ folder's path, made (durably) with tmp/new/cur and `maildirfolder`."""
    assert folder.startswith(".") and "/" not in folder and folder not in (".", ".."), folder
    path = os.path.join(mailbox, folder)
    if os.path.isdir(os.path.join(path, "new")):
        return path
    _ensure_dir(path)
    for sub in ("tmp", "new", "cur"):
        _ensure_dir(os.path.join(path, sub))
    os.close(os.open(os.path.join(path, "maildirfolder"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    fsync_folder(path)
    fsync_folder(mailbox)
    return path


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _as_maildir_error(exc: OSError) -> MaildirError:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in _PERMISSION:
        return MaildirError(True, "4.2.0", f"mailbox not writable: {exc.strerror}{where}")
    status = _TEMPORARY_STORAGE.get(exc.errno or 0, "4.3.0")
    return MaildirError(True, status, f"mailbox write failed: {exc.strerror}{where}")


def _one_line(text: str) -> str:
    return "".join("?" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
