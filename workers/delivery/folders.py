"""A Sieve fileinto's folder name -> the Maildir++ folder directory Dovecot reads.

`maildir_folder("Work/Projects")` and `maildir_folder("Work.Projects")` are
".Work.Projects"; "INBOX" (any case) is "" (the mailbox itself). Maildir++ has one
level separator, "."; Sieve scripts written for IMAP clients use "/" or "." (Dovecot's
separator for Maildir++), so both separate levels here. Each level is stored in IMAP's
modified UTF-7 (RFC 3501 5.1.3), as Dovecot stores folder names on disk, so a folder
"Réunions" made by a fileinto is the IMAP folder "Réunions".

Refused (UnsafeFolder): an empty name or level ("A//B", ".A", "A."), control
characters, a directory name over 255 bytes. Pure: no I/O.
"""

from __future__ import annotations

import base64
import re

MAX_NAME_BYTES = 255  # one directory name (NAME_MAX)
_LEVELS = re.compile(r"[/.]")


class UnsafeFolder(ValueError):
    """A folder name that cannot be a Maildir++ folder (the script's run fails: INBOX)."""


def maildir_folder(name: str) -> str:
    """The ".A.B" directory for the Sieve folder `name`; "" for INBOX; raises UnsafeFolder."""
    if name.upper() == "INBOX":
        return ""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UnsafeFolder(f"folder name {name!r} has control characters")
    levels = _LEVELS.split(name)
    if any(level == "" for level in levels):
        raise UnsafeFolder(f"folder name {name!r} has an empty level")
    folder = "." + ".".join(mutf7(level) for level in levels)
    if len(folder.encode("ascii")) > MAX_NAME_BYTES:
        raise UnsafeFolder(f"folder name {name!r} is longer than {MAX_NAME_BYTES} bytes on disk")
    return folder


def mutf7(text: str) -> str:
    """IMAP modified UTF-7: printable ASCII as itself ("&" as "&-"), other runs as
    "&" + base64 of their UTF-16BE ("," for "/", no padding) + "-"."""
    out: list[str] = []
    run: list[str] = []

    def close_run() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            run.clear()

    for c in text:
        if 0x20 <= ord(c) <= 0x7E:
            close_run()
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    close_run()
    return "".join(out)
