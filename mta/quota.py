"""Maildir++ quota: a mailbox's `maildirsize` file, kept as Dovecot's maildir quota backend keeps it.

The file (Maildir++ spec; Dovecot src/plugins/quota/quota-maildir.c):

    104857600S,5000C          the limits: bytes "S", messages "C" ("0S" when neither)
    23488 12                  usage when last recalculated: bytes, messages
    1402 1                    one line appended per delivery (negative when mail goes)

Usage is the sum of the lines. It is recalculated (every new/ and cur/ of INBOX and of
the `.Folder`s scanned; a file's size read from `,S=<size>` in its name, else stat) and
the file replaced atomically when: it is missing, 5120 bytes or more, unreadable, its
limits differ from the mailbox's, or the mailbox is full by it and it has more than one
usage line or is older than 15 minutes (Dovecot's rules), or when a folder changed after
it (mail deleted by something that did not update the file: our own addition, also only
when full). Deliveries append one line (O_APPEND), never rewriting the file.

Invariants: the file is never written partly (recalculation writes a temporary and
renames it); `read` never raises for bad content (None: recalculate).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Final

from mta.mailboxes import Owner

MAILDIRSIZE: Final = "maildirsize"
MAX_FILE_BYTES: Final = 5120
STALE_SECONDS: Final = 15 * 60
WARNED_MARKER: Final = "mta-quota-warned"  # present while a warning stands (Dovecot ignores non-folder names)


@dataclass(frozen=True)
class Limits:
    bytes: int = 0  # 0: no limit
    messages: int = 0

    def header(self) -> str:
        """The first line, as Dovecot writes it ("0S" when there is no limit at all)."""
        parts = [f"{self.bytes}S"] if self.bytes or not self.messages else []
        if self.messages:
            parts.append(f"{self.messages}C")
        return ",".join(parts)


@dataclass(frozen=True)
class Usage:
    bytes: int
    messages: int

    def full(self, limits: Limits) -> bool:
        """No room for any message: a limit reached."""
        return bool((limits.bytes and self.bytes >= limits.bytes)
                    or (limits.messages and self.messages >= limits.messages))

    def fits(self, limits: Limits, size: int) -> bool:
        """Room for one more message of `size` bytes."""
        return not ((limits.bytes and self.bytes + size > limits.bytes)
                    or (limits.messages and self.messages + 1 > limits.messages))

    def percent(self, limits: Limits) -> float:
        """The fuller of the two, in percent of its limit (0 with no limits)."""
        shares = [100.0 * self.bytes / limits.bytes if limits.bytes else 0.0,
                  100.0 * self.messages / limits.messages if limits.messages else 0.0]
        return max(shares)


def parse_limits(line: str) -> Limits | None:
    size = count = 0
    for part in line.split(","):
        value, unit = part[:-1], part[-1:]
        if not value.isascii() or not value.isdigit() or unit not in ("S", "C"):
            return None
        if unit == "S":
            size = int(value)
        else:
            count = int(value)
    return Limits(size, count)


def read(mailbox: str, limits: Limits, *, now: float | None = None) -> Usage | None:
    """The usage the file states, or None when it must be recalculated (the rules above)."""
    path = os.path.join(mailbox, MAILDIRSIZE)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES)
            mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(data) >= MAX_FILE_BYTES or b"\0" in data:
        return None
    lines = data[:data.rfind(b"\n") + 1].decode("ascii", "replace").split("\n")[:-1]  # a last line without LF: not yet
    if len(lines) < 2 or parse_limits(lines[0]) != limits:
        return None
    total_bytes = total_count = 0
    for line in lines[1:]:
        fields = line.split()
        try:
            total_bytes += int(fields[0])
            total_count += int(fields[1])
        except (IndexError, ValueError):
            return None
    if total_bytes < 0 or total_count < 0:
        return None
    usage = Usage(total_bytes, total_count)
    if usage.full(limits):
        now = time.time() if now is None else now
        if (len(lines) > 2 or mtime_ns < (now - STALE_SECONDS) * 1e9
                or any(_mtime_ns(d) > mtime_ns for d in _counted_dirs(mailbox))):
            return None
    return usage


def usage(mailbox: str, limits: Limits, *, owner: Owner | None = None, write: bool = True) -> Usage:
    """The mailbox's usage: the file's when it can be trusted, else recalculated (and, with
    `write`, the file replaced)."""
    found = read(mailbox, limits)
    if found is not None:
        return found
    return recalculate(mailbox, limits, owner=owner) if write else scan(mailbox)[0]


def scan(mailbox: str) -> tuple[Usage, int]:
    """Every message counted: the usage, and the newest folder mtime (ns) seen."""
    total_bytes = total_count = newest = 0
    for folder in _counted_dirs(mailbox):
        try:
            newest = max(newest, os.stat(folder).st_mtime_ns)
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            size = size_from_name(name)
            if size is None:
                try:
                    size = os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue  # moved or expunged while we looked
            total_bytes += size
            total_count += 1
    return Usage(total_bytes, total_count), newest


def recalculate(mailbox: str, limits: Limits, *, owner: Owner | None = None) -> Usage:
    """Count the mailbox and replace its file with the limits and that one usage line;
    the file is left alone when a folder changed during the count (the next reader counts again)."""
    counted, newest = scan(mailbox)
    if any(_mtime_ns(d) > newest for d in _counted_dirs(mailbox)):
        return counted
    text = f"{limits.header()}\n{counted.bytes} {counted.messages}\n".encode("ascii")
    tmp = os.path.join(mailbox, f"{MAILDIRSIZE}.{os.getpid()}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.write(fd, text)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(mailbox, MAILDIRSIZE))
    except BaseException:
        _unlink(tmp)
        raise
    return counted


def add(mailbox: str, size: int, count: int = 1) -> None:
    """Append one usage line (a delivery); a missing file stays missing (the next reader recalculates)."""
    try:
        fd = os.open(os.path.join(mailbox, MAILDIRSIZE), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.write(fd, f"{size} {count}\n".encode("ascii"))  # one write: O_APPEND keeps concurrent lines whole
    finally:
        os.close(fd)


def size_from_name(name: str) -> int | None:
    """The size in a Maildir++ file name (`...,S=1234,W=1260:2,S`), or None when it has none."""
    at = name.find(",S=")
    if at < 0:
        return None
    digits = name[at + 3:]
    end = 0
    while end < len(digits) and digits[end].isdigit():
        end += 1
    if end < len(digits) and digits[end] not in ":,":
        return None
    return int(digits[:end] or "0")


def _counted_dirs(mailbox: str) -> list[str]:
    """new/ and cur/ of INBOX and of every Maildir++ folder (`.Name/`)."""
    folders = [mailbox]
    try:
        with os.scandir(mailbox) as entries:
            folders += sorted(e.path for e in entries
                              if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir())
    except FileNotFoundError:
        return []
    return [os.path.join(f, sub) for f in folders for sub in ("new", "cur")]


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
