"""The users file of SMTP AUTH: names, scrypt password hashes, the senders each may use.

One user per line, `#` comments and blank lines allowed:

    name:hash[:senders]
    alice@example.com:scrypt$16384$8$1$<salt b64>$<key b64>
    relay-app:scrypt$16384$8$1$...$...:news@example.com,@lists.example.com

name: 1-256 characters without ':', white space or control characters, matched exactly
(case-sensitive, also in the domain part). hash: `scrypt$N$r$p$salt$key` (base64).
senders: addresses (`a@example.com`) and domains (`@example.com`) the user may put in
MAIL FROM; without any, a user named like an address owns that one address.

`mta users` and the web UI (workers/control/accounts.py) edit the file through
add_user, set_password and delete_user (`edit_users`): one editor at a time (flock on
`<file>.lock`), atomic replace (readers see the old file or the new one, never half),
comments and line order kept, mode and owner of an existing file kept (0600 for a new one).

Invariants: every User in a loaded table is valid (its name, hash format and senders
checked); verify_password never raises, whatever the stored text.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from mta.outfile import editor_lock

SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_MAXMEM_BYTES: Final = 64 * 1024**2  # N=2**14, r=8 needs 16 MiB; a stored cost beyond this fails
SALT_BYTES: Final = 16
KEY_BYTES: Final = 32
MAX_NAME_CHARS: Final = 256
NEW_FILE_MODE: Final = 0o600


class UsersError(ValueError):
    """A user entry or the users file is unusable; the message says where and why."""


@dataclass(frozen=True)
class User:
    name: str
    hash: str
    senders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name)
        if _parse_hash(self.hash) is None:
            raise UsersError(f"user {self.name!r}: the password hash is not scrypt$N$r$p$salt$key")
        for entry in self.senders:
            check_sender(entry)

    @property
    def may_send_as(self) -> tuple[str, ...]:
        """The senders, else the name when it is an address, else nothing."""
        local, _, domain = self.name.rpartition("@")
        return self.senders or ((self.name,) if local and domain else ())

    def owns(self, sender_address: str) -> bool:
        """May this user send as `sender_address`? Domains compare case-insensitively, local parts exactly."""
        local, at, domain = sender_address.rpartition("@")
        if not at or not local or not domain:
            return False  # the null sender and bare local parts belong to nobody
        for entry in self.may_send_as:
            own_local, _, own_domain = entry.rpartition("@")
            if own_domain.lower() == domain.lower() and own_local in ("", local):
                return True
        return False


def check_name(name: str) -> None:
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise UsersError(f"user name must have 1-{MAX_NAME_CHARS} characters, got {len(name)}")
    if any(c == ":" or c.isspace() or not c.isprintable() for c in name):
        raise UsersError(f"user name {name!r} contains ':', white space or a control character")


def check_sender(entry: str) -> None:
    local, at, domain = entry.rpartition("@")
    if not at or not domain or "@" in local or any(c in ",:<>" or c.isspace() or not c.isprintable()
                                                   for c in entry):
        raise UsersError(f'sender {entry!r}: use "user@example.com" or "@example.com"')


# --- passwords -------------------------------------------------------------------------

def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Does `password` match the `stored` hash? Malformed or unaffordable hashes are False."""
    parsed = _parse_hash(stored)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    try:
        key = _scrypt(password, salt, n, r, p, len(expected))
    except (ValueError, MemoryError):  # a stored cost beyond maxmem
        return False
    return hmac.compare_digest(key, expected)


def credential_bytes(text: str) -> bytes:
    """A name or password as hashed: UTF-8, input bytes that were not UTF-8 (surrogateescape) as they came."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate of no escape: any fixed bytes do, never an exception
        return text.encode("utf-8", "surrogatepass")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(credential_bytes(password), salt=salt, n=n, r=r, p=p,
                          maxmem=SCRYPT_MAXMEM_BYTES, dklen=length)


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isascii() and x.isdigit() for x in parts[1:4]):
        return None
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        return None
    try:
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except binascii.Error:
        return None
    if not salt or len(key) < 16:
        return None
    return n, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- the file --------------------------------------------------------------------------

def parse_users(text: str, source: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for lineno, line in enumerate(_lines(text), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        try:
            if len(fields) not in (2, 3):
                raise UsersError("expected name:hash or name:hash:senders")
            senders = tuple(s.strip() for s in fields[2].split(",") if s.strip()) if len(fields) == 3 else ()
            user = User(fields[0], fields[1], senders)
            if user.name in users:
                raise UsersError(f"user {user.name!r} is listed twice")
        except UsersError as exc:
            raise UsersError(f"{source}:{lineno}: {exc}") from None
        users[user.name] = user
    return users


def _lines(text: str) -> list[str]:
    """Split on newlines only (str.splitlines also splits on form feeds and U+2028: line numbers would lie)."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def load_users(path: str) -> dict[str, User]:
    """The users of `path` by name; UsersError naming file:line, OSError (FileNotFoundError) as raised."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_users(f.read(), path)


def format_user(user: User) -> str:
    line = f"{user.name}:{user.hash}"
    return f"{line}:{','.join(user.senders)}" if user.senders else line


def save_users(path: str, users: Mapping[str, User]) -> None:
    """Replace `path` atomically with `users`, keeping its comments, order, mode and owner.

    Takes no lock: edits go through `edit_users`, which holds it.
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            old_lines = _lines(f.read())
            st: os.stat_result | None = os.fstat(f.fileno())
    except FileNotFoundError:
        old_lines, st = [], None
    lines: list[str] = []
    written: set[str] = set()
    for line in old_lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            lines.append(line)
            continue
        name = stripped.split(":", 1)[0]
        if name in users and name not in written:  # a user since deleted is dropped
            lines.append(format_user(users[name]))
            written.add(name)
    lines.extend(format_user(u) for name, u in users.items() if name not in written)
    _replace(path, "".join(line + "\n" for line in lines), st)


@contextlib.contextmanager
def edit_users(path: str) -> Iterator[dict[str, User]]:
    """Lock, load (a missing file is empty), yield the table to change, save it unless the block raised."""
    with editor_lock(path):
        try:
            users = load_users(path)
        except FileNotFoundError:
            users = {}
        yield users
        save_users(path, users)


def add_user(path: str, user: User) -> None:
    """`mta users add` and POST /api/users/add: UsersError when the name is taken."""
    with edit_users(path) as table:
        require(path, table, user.name, exists=False)
        table[user.name] = user


def set_password(path: str, name: str, new_hash: str) -> None:
    """`mta users passwd` and POST /api/users/password: the senders stay."""
    with edit_users(path) as table:
        require(path, table, name, exists=True)
        table[name] = User(name, new_hash, table[name].senders)


def delete_user(path: str, name: str) -> None:
    with edit_users(path) as table:
        require(path, table, name, exists=True)
        del table[name]


def require(path: str, table: Mapping[str, User], name: str, *, exists: bool) -> None:
    """UsersError unless `name` is in `table` (exists) or is not."""
    if exists and name not in table:
        raise UsersError(f"no user {name} in {path}")
    if not exists and name in table:
        raise UsersError(f"user {name} exists, use `mta users passwd {name}` to change its password")


def _replace(path: str, text: str, st: os.stat_result | None) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            new = os.fstat(f.fileno())
            if st is not None and (st.st_uid, st.st_gid) != (new.st_uid, new.st_gid):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)  # root editing mta's file: the server must still read it
            os.fchmod(f.fileno(), st.st_mode & 0o7777 if st is not None else NEW_FILE_MODE)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
