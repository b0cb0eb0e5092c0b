"""Where a local mailbox lives, whether it exists, who owns it: shared by inbound (RCPT) and delivery.

Layout: `root/<domain>/<user>/`, a Maildir (tmp/, new/, cur/ inside). A mailbox exists
when that directory does; operators provision it. `domain` and `user` are lower-cased
and must be plain names (no `/`, no `..`, no leading dot, no NUL or controls):
anything else is an UnsafeName, so no address can name a path outside `root`.

[local] owner ("user[:group]") is resolved here (`resolve_owner`: the uid and gid the
folders and files mta creates in a mailbox are given); [local] is checked here too.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable

from mta.sections import LocalConfig

Owner = tuple[int, int]  # uid, gid
QUOTA_FULL_MODES = ("defer", "bounce")


class UnsafeName(ValueError):
    """A domain or user that cannot be a mailbox directory name (delivery answers 5.1.3)."""


def mailbox_path(root: str, domain: str, user: str) -> str:
    """The mailbox directory of user@domain under `root`; raises UnsafeName."""
    domain, user = domain.lower().rstrip("."), user.lower()
    for label, name in (("domain", domain), ("user", user)):
        if (not name or name.startswith(".") or "/" in name or ".." in name
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)):
            raise UnsafeName(f"unsafe {label} name {name!r} for a mailbox")
    return os.path.join(root, domain, user)


def mailbox_exists(root: str, domain: str, user: str) -> bool:
    """True when the provisioned mailbox directory exists; False for unsafe names."""
    try:
        return os.path.isdir(mailbox_path(root, domain, user))
    except UnsafeName:
        return False


def resolve_owner(spec: str) -> Owner | None:
    """The uid and gid of "user[:group]" (group: the user's own when absent); None for ""; ValueError naming what is unknown."""
    if not spec:
        return None
    name, _, group = spec.partition(":")
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"no user {name!r} on this system (create it, e.g. `useradd -r vmail`)") from None
    if not group:
        return user.pw_uid, user.pw_gid
    try:
        return user.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group {group!r} on this system") from None


def check_local(local: LocalConfig, fail: Callable[[str, str], None]) -> None:
    try:
        resolve_owner(local.owner)
    except ValueError as exc:
        fail("[local] owner", str(exc))
    if local.quota_full not in QUOTA_FULL_MODES:
        fail("[local] quota_full", f"must be one of {', '.join(QUOTA_FULL_MODES)}, got {local.quota_full!r}")
    if not 0 <= local.quota_warn_percent <= 100:
        fail("[local] quota_warn_percent", "must be 0 (no warning) to 100")
