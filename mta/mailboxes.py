"""Where a local mailbox lives, and whether it exists: shared by inbound (RCPT) and delivery.

Layout: `root/<domain>/<user>/`, a Maildir (tmp/, new/, cur/ inside). A mailbox exists
when that directory does; operators provision it. `domain` and `user` are lower-cased
and must be plain names (no `/`, no `..`, no leading dot, no NUL or controls):
anything else is an UnsafeName, so no address can name a path outside `root`.
"""

from __future__ import annotations

import os


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
