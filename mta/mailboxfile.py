"""The virtual mailboxes file ([local] mailboxes): which local mailboxes exist, their quotas, their aliases.

One mailbox per line, `#` comment lines and blank lines allowed:

    alice@example.com quota_bytes=104857600 quota_messages=5000 aliases=a.smith@example.com,alice@example.net
    bob@example.net

Fields after the address are `key=value`: quota_bytes, quota_messages (0 or absent: no
limit), aliases (addresses in any domain, comma-separated). Addresses compare
case-insensitively and name one mailbox each: an address or alias listed twice is an
error naming both lines. A mailbox's directory is `<maildir_root>/<domain>/<user>/`
(mta/mailboxes.py), created at its first delivery.

`MailboxFile` re-reads the file when its mtime, size or inode changes (as the users file
is read: workers/inbound/auth.py); a file that no longer parses is logged and the last
good table kept. `edit_mailboxes` is the one writer: flock on `<file>.lock`, atomic
replace (mta/outfile.py), comments and order kept, mode and owner of an existing file kept;
add_mailbox, delete_mailbox and set_quota are its edits (`mta mailbox`, the web UI).

Invariants: every Mailbox of a table is valid (its address, limits and aliases checked);
`lookup` never raises.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from mta import logs
from mta.mailboxes import UnsafeName, mailbox_path
from mta.outfile import OutFile, editor_lock

KEYS: Final = ("quota_bytes", "quota_messages", "aliases")
MAX_QUOTA: Final = 2**63 - 1  # what maildirsize readers (Dovecot: int64) can hold


class MailboxFileError(ValueError):
    """A bad line or file; the message names file:line and what to fix."""


@dataclass(frozen=True)
class Mailbox:
    address: str  # lower-cased user@domain
    quota_bytes: int = 0  # 0: no limit
    quota_messages: int = 0
    aliases: tuple[str, ...] = ()  # lower-cased addresses

    def __post_init__(self) -> None:
        check_address(self.address)
        for alias in self.aliases:
            check_address(alias)
        if not (0 <= self.quota_bytes <= MAX_QUOTA and 0 <= self.quota_messages <= MAX_QUOTA):
            raise MailboxFileError(f"{self.address}: quotas must be 0 (no limit) to {MAX_QUOTA}")

    @property
    def user(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def has_quota(self) -> bool:
        return self.quota_bytes > 0 or self.quota_messages > 0


def check_address(address: str) -> None:
    user, at, domain = address.rpartition("@")
    if not at or not user or not domain or any(c in ",=#<>" or c.isspace() or not c.isprintable() for c in address):
        raise MailboxFileError(f"{address!r} is not an address like user@example.com")
    try:
        mailbox_path("/", domain, user)
    except UnsafeName as exc:
        raise MailboxFileError(f"{address!r}: {exc}") from None


class MailboxTable:
    """Mailboxes by address, and by alias."""

    def __init__(self, mailboxes: dict[str, Mailbox]) -> None:
        self.mailboxes = mailboxes  # address -> Mailbox, in file order
        self._by_alias = {alias: box for box in mailboxes.values() for alias in box.aliases}

    def lookup(self, address: str) -> Mailbox | None:
        """The mailbox `address` names (its own address or an alias), any case; None when none."""
        key = address.lower().rstrip(".")
        return self.mailboxes.get(key) or self._by_alias.get(key)

    def __len__(self) -> int:
        return len(self.mailboxes)


def parse_mailboxes(text: str, source: str) -> MailboxTable:
    mailboxes: dict[str, Mailbox] = {}
    where: dict[str, int] = {}  # address or alias -> the line that claims it
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            box = parse_line(line)
            for name in (box.address, *box.aliases):
                if name in where:
                    raise MailboxFileError(f"{name} is already listed on line {where[name]}")
                where[name] = lineno
        except MailboxFileError as exc:
            raise MailboxFileError(f"{source}:{lineno}: {exc}") from None
        mailboxes[box.address] = box
    return MailboxTable(mailboxes)


def parse_line(line: str) -> Mailbox:
    address, *fields = line.split()
    values: dict[str, str] = {}
    for field in fields:
        key, eq, value = field.partition("=")
        if not eq or key not in KEYS:
            raise MailboxFileError(f"{field!r}: expected one of {', '.join(k + '=' for k in KEYS)}")
        if key in values:
            raise MailboxFileError(f"{key} given twice")
        values[key] = value
    limits = {}
    for key in ("quota_bytes", "quota_messages"):
        text = values.get(key, "0")
        if not text.isascii() or not text.isdigit():
            raise MailboxFileError(f"{key}={text}: expected a whole number (0: no limit)")
        limits[key] = int(text)
    aliases = tuple(a.strip().lower() for a in values.get("aliases", "").split(",") if a.strip())
    return Mailbox(address.lower(), limits["quota_bytes"], limits["quota_messages"], aliases)


def format_line(box: Mailbox) -> str:
    fields = [box.address]
    if box.quota_bytes:
        fields.append(f"quota_bytes={box.quota_bytes}")
    if box.quota_messages:
        fields.append(f"quota_messages={box.quota_messages}")
    if box.aliases:
        fields.append(f"aliases={','.join(box.aliases)}")
    return " ".join(fields)


def load_mailboxes(path: str) -> MailboxTable:
    """The table of `path`; MailboxFileError naming file:line; OSError as raised."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mailboxes(f.read(), path)


class MailboxFile:
    """The file as the server reads it: re-read when it changes, the last good table kept."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._table = MailboxTable({})
        self._stamp: tuple[int, int, int] | None = None
        self._failed: tuple[int, int, int] | None = None  # the stamp of a copy that did not parse (logged once)
        self.current()

    def current(self) -> MailboxTable:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                logs.event("mailboxes_missing", path=self.path)
            self._stamp, self._table = None, MailboxTable({})
            return self._table
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp in (self._stamp, self._failed):
            return self._table
        try:
            table = load_mailboxes(self.path)
        except (MailboxFileError, OSError) as exc:
            self._failed = stamp
            logs.event("mailboxes_error", path=self.path, error=str(exc), kept=len(self._table))
            return self._table
        self._stamp, self._table = stamp, table
        return table

    def lookup(self, address: str) -> Mailbox | None:
        return self.current().lookup(address)


@contextlib.contextmanager
def edit_mailboxes(path: str) -> Iterator[dict[str, Mailbox]]:
    """Lock, load (a missing file is empty), yield the mailboxes to change, save them unless the block raised."""
    with editor_lock(path):
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
                st: os.stat_result | None = os.fstat(f.fileno())
        except FileNotFoundError:
            text, st = "", None
        mailboxes = dict(parse_mailboxes(text, path).mailboxes)
        yield mailboxes
        parse_mailboxes("\n".join(format_line(b) for b in mailboxes.values()), path)  # no address claimed twice
        _save(path, text, mailboxes, st)


def add_mailbox(path: str, box: Mailbox) -> None:
    """`mta mailbox add` and POST /api/mailboxes/add: MailboxFileError when its address or
    an alias is already a mailbox or an alias."""
    with edit_mailboxes(path) as table:
        existing = MailboxTable(table)
        for name in (box.address, *box.aliases):
            if (owner := existing.lookup(name)) is not None:
                raise MailboxFileError(f"{name} is already {'a mailbox' if owner.address == name else 'an alias of ' + owner.address} in {path}")
        table[box.address] = box


def delete_mailbox(path: str, address: str) -> None:
    """The line goes; the mailbox's folder and mail stay."""
    with edit_mailboxes(path) as table:
        if address not in table:
            raise MailboxFileError(f"no mailbox {address} in {path}")
        del table[address]


def set_quota(path: str, address: str, quota_bytes: int | None, quota_messages: int | None) -> Mailbox:
    """New limits (None: as it was; 0: no limit) for the mailbox `address`."""
    with edit_mailboxes(path) as table:
        box = table.get(address)
        if box is None:
            raise MailboxFileError(f"no mailbox {address} in {path}")
        box = Mailbox(address, box.quota_bytes if quota_bytes is None else quota_bytes,
                      box.quota_messages if quota_messages is None else quota_messages, box.aliases)
        table[address] = box
    return box


def _save(path: str, old_text: str, mailboxes: dict[str, Mailbox], st: os.stat_result | None) -> None:
    lines: list[str] = []
    written: set[str] = set()
    old_lines = old_text.split("\n")
    if old_lines[-1] == "":
        old_lines.pop()
    for line in old_lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            lines.append(line)
            continue
        address = stripped.split()[0].lower()
        if address in mailboxes and address not in written:  # a mailbox since deleted is dropped
            lines.append(format_line(mailboxes[address]))
            written.add(address)
    lines.extend(format_line(b) for a, b in mailboxes.items() if a not in written)
    with OutFile(path, force=True) as f:
        if st is not None:
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)  # root editing mta's file: the server must still read it
            os.fchmod(f.fileno(), st.st_mode & 0o7777)
        f.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
