"""The maildrop: where local programs (mta-sendmail) leave mail for the pickup, with no
root, no spool access and no secrets. Its layout, its file form, and writing a file.

Layout under [queue] maildrop (default: <queue path>-maildrop), made by `mta serve`
(`prepare`) and owned by the user mta runs as:

    <maildrop>/     0711  every local user reaches new/ and the socket; only mta lists it
      new/          3733  sticky, set-group-id, -wx for others: anyone creates a file,
                          nobody else lists or removes it; a file takes the folder's
                          group, so a 0640 file is readable by its owner and mta only
      pickup/       0700  files being committed, renamed to the queue id they get
      corrupt/      0700  files the pickup refused, kept for the operator
      pickup.sock         datagram socket: any datagram makes the pickup look at once
      pickup.lock         one pickup at a time (two generations overlap during a reload)

A file is written as new/tmp.<random>, fsynced, renamed to new/<random> (32 hex digits:
unguessable, so a known name is no way in either) and fsynced again (the rename is in
the journal transaction that the second fsync commits on ext4, XFS and btrfs; the folder
is fsynced too where the writer may open it): the pickup never sees half a file, and a
writer that returned has its file on disk. Its form (`encode`, `decode`):

    mta-maildrop 1
    {"sender": "alice@example.com", "recipients": [["bob@example.net", null, null]],
     "ret": null, "envid": null}                       (one line of JSON)
    the message, CRLF line ends

A recipient is [address, NOTIFY words or null, ORCPT "type;address" or null]. Nothing
in a file says who wrote it: the pickup takes the submitting uid from the file's owner.
`decode` checks every field as untrusted input (any local user can write any bytes).

Standard library only (with the pure mta.smtp modules): mta-sendmail imports this, and
it must start fast and run under any python3 >= 3.11 on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
from dataclasses import dataclass

from mta.durable import fsync_folder, write_all
from mta.smtp.address import AddressError, parse_path
from mta.smtp.content import has_bare_newline

MAGIC = b"mta-maildrop 1\n"
NEW, PICKUP, CORRUPT = "new", "pickup", "corrupt"
SOCKET, LOCK = "pickup.sock", "pickup.lock"
TMP_PREFIX = "tmp."
TOP_MODE, NEW_MODE, PRIVATE_MODE, FILE_MODE = 0o711, 0o3733, 0o700, 0o640
MAX_HEADER_BYTES = 4 * 1024 * 1024  # the JSON line: 10,000 recipients of 256 octets fit
MAX_RECIPIENTS = 10_000  # a sanity bound on untrusted input, not a policy
MAX_ENVID = 100  # RFC 3461 4.4
_NOTIFY = frozenset(("SUCCESS", "FAILURE", "DELAY"))


class DropError(ValueError):
    """The bytes are not a maildrop file; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class DropRecipient:
    address: str
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # "rfc822;address"


@dataclass(frozen=True, slots=True)
class Drop:
    """The envelope of a dropped message (its content is kept apart)."""

    sender: str  # "" for the null sender
    recipients: tuple[DropRecipient, ...]
    ret: str | None = None  # FULL | HDRS
    envid: str | None = None

    @property
    def smtputf8(self) -> bool:
        return not (self.sender.isascii() and all(r.address.isascii() for r in self.recipients))


# --- the file form -----------------------------------------------------------------------

def encode(drop: Drop, message: bytes) -> bytes:
    header = {"sender": drop.sender, "ret": drop.ret, "envid": drop.envid,
              "recipients": [[r.address, list(r.notify) if r.notify else None, r.orcpt] for r in drop.recipients]}
    return MAGIC + json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" + message


def decode(raw: bytes, max_message_bytes: int) -> tuple[Drop, bytes]:
    """The envelope and the message of a file's bytes; DropError says why they are not one."""
    if not raw.startswith(MAGIC):
        raise DropError("not a maildrop file (no 'mta-maildrop 1' first line)")
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES + 1)
    if end < 0:
        raise DropError(f"no envelope line within {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(raw[len(MAGIC):end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DropError(f"the envelope line is not JSON in UTF-8: {exc}") from None
    message = raw[end + 1:]
    if len(message) > max_message_bytes:
        raise DropError(f"the message has {len(message)} bytes, over [limits] max_message_bytes {max_message_bytes}")
    if has_bare_newline(message):
        raise DropError("the message has a bare CR or LF (every line must end with CRLF)")
    return _envelope(header), message


def _envelope(header: object) -> Drop:
    if not isinstance(header, dict) or set(header) != {"sender", "recipients", "ret", "envid"}:
        raise DropError("the envelope must be an object with sender, recipients, ret and envid")
    sender, rcpts, ret, envid = header["sender"], header["recipients"], header["ret"], header["envid"]
    if not isinstance(sender, str):
        raise DropError("sender: not a string")
    if sender:
        check_address(sender, "sender")
    if not isinstance(rcpts, list) or not 1 <= len(rcpts) <= MAX_RECIPIENTS:
        raise DropError(f"recipients: must be a list of 1 to {MAX_RECIPIENTS}")
    if ret not in (None, "FULL", "HDRS"):
        raise DropError("ret: must be null, FULL or HDRS")
    if envid is not None and not (isinstance(envid, str) and 0 < len(envid) <= MAX_ENVID
                                  and envid.isascii() and envid.isprintable()):
        raise DropError(f"envid: must be null or printable ASCII of at most {MAX_ENVID} characters")
    return Drop(sender, tuple(_recipient(r) for r in rcpts), ret, envid)


def _recipient(item: object) -> DropRecipient:
    if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
        raise DropError("recipients: each must be [address, notify, orcpt]")
    address, notify, orcpt = item
    check_address(address, "recipient")
    if notify is not None:
        words = tuple(notify) if isinstance(notify, list) and all(isinstance(w, str) for w in notify) else ()
        if words != ("NEVER",) and not (words and set(words) <= _NOTIFY and len(set(words)) == len(words)):
            raise DropError(f"recipient {address}: notify must be null, [NEVER] or words of SUCCESS, FAILURE, DELAY")
        notify = words
    if orcpt is not None and not (isinstance(orcpt, str) and ";" in orcpt and orcpt.isprintable()
                                  and len(orcpt) <= 500):
        raise DropError(f"recipient {address}: orcpt must be null or 'type;address'")
    return DropRecipient(address, notify, orcpt)


def check_address(address: str, what: str) -> None:
    """A mailbox with a domain, as RFC 5321 allows it in a path (UTF-8 allowed); else DropError."""
    try:
        parsed = parse_path(f"<{address}>", utf8=True)
    except AddressError as exc:
        raise DropError(f"{what} {address!r}: {exc}") from None
    if parsed.is_null or not parsed.domain:
        raise DropError(f"{what} {address!r}: not a mailbox with a domain")


# --- writing a file (mta-sendmail) ------------------------------------------------------------

def write(maildrop: str, drop: Drop, message: bytes) -> str:
    """Drop `message` for delivery to `drop`'s recipients; its file name once it is on disk.
    OSError when it cannot be (the maildrop missing, no room): nothing is left behind."""
    folder = os.path.join(maildrop, NEW)
    name = secrets.token_hex(16)
    temp, final = os.path.join(folder, TMP_PREFIX + name), os.path.join(folder, name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask: mta (the folder's group) reads it
        write_all(fd, encode(drop, message))
        os.fsync(fd)
        os.rename(temp, final)
        os.fsync(fd)  # commits the rename's journal transaction too
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
    with contextlib.suppress(PermissionError):  # only its owner (and root) may open it: others rely on the file's fsync
        fsync_folder(folder)
    return name


def poke(maildrop: str) -> bool:
    """Tell a running pickup to look now (best effort: with no server the file waits for it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"new", os.path.join(maildrop, SOCKET))
        except OSError:  # no server, or its socket's queue is full: it looks every few seconds anyway
            return False
    return True


# --- the folders (mta serve) ---------------------------------------------------------------

def prepare(maildrop: str) -> None:
    """Create the maildrop or put its modes right, before anything forks; PermissionError
    naming the fix when a folder is not ours (or not a folder)."""
    os.makedirs(maildrop, mode=TOP_MODE, exist_ok=True)
    _own_folder(maildrop, TOP_MODE)
    for name, mode in ((NEW, NEW_MODE), (PICKUP, PRIVATE_MODE), (CORRUPT, PRIVATE_MODE)):
        path = os.path.join(maildrop, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, PRIVATE_MODE)
        _own_folder(path, mode)


def _own_folder(path: str, mode: int) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        what = "not a folder" if not stat.S_ISDIR(st.st_mode) else f"owned by uid {st.st_uid}"
        raise PermissionError(f"the maildrop folder {path} is {what}, not a folder of the user mta runs as "
                              f"(uid {os.geteuid()}): remove it, or chown -R the maildrop to that user")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
