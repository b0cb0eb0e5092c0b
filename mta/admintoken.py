"""The admin API's bearer token: [control] token, else the one in a file beside the spool.

There is always a token. With [control] token empty, the control process calls `ensure`
at its start: it reads [control] token_file (default <[queue] path>/control.token) and,
when the file does not exist, first creates it with a new random token. The file is
mode 0600 whatever the umask, owned by the user mta runs as, so only that user and root
can use the API (and so read queued mail through it). It is written to a temporary
file and linked into place: a reader sees the whole token or no file, and processes
starting at once agree on the first one linked. It is kept across restarts; delete it
and restart to get a new one. The CLI calls `read`, which never creates.
"""

from __future__ import annotations

import os
import secrets

from mta import logs
from mta.config import Config
from mtaqueue.private import create_once

FILE_NAME = "control.token"
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits
MAX_TOKEN_CHARS = 1024


class TokenError(Exception):
    """The token file exists but holds no usable token; the message says what to do."""


def path(config: Config) -> str:
    return config.control.token_file or os.path.join(config.queue.path, FILE_NAME)


def ensure(config: Config) -> str:
    """The token the API requires, creating the token file first when needed (OSError, TokenError)."""
    if config.control.token:
        return config.control.token
    where = path(config)
    if not os.path.exists(where):
        create_once(where, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode("ascii"))
    token = _read(where)
    mode = os.stat(where).st_mode & 0o777
    if mode & 0o077:  # someone widened it: every user it names can now use the API
        logs.event("api_token_exposed", file=where, mode=f"{mode:04o}")
    return token


def read(config: Config) -> str | None:
    """The token to send: [control] token, else the file's; None when the file does not
    exist (no server has started on this spool). OSError (PermissionError: not the mta
    user or root) or TokenError when it exists but cannot be used."""
    if config.control.token:
        return config.control.token
    try:
        return _read(path(config))
    except FileNotFoundError:
        return None


def _read(where: str) -> str:
    with open(where, "rb") as f:
        token = f.read(MAX_TOKEN_CHARS + 1).strip()
    if not token or len(token) > MAX_TOKEN_CHARS or not all(0x21 <= c <= 0x7E for c in token):
        raise TokenError(f"{where}: no usable token in it (empty, over {MAX_TOKEN_CHARS} characters, or not "
                         "printable ASCII): delete the file and restart mta for a new one")
    return token.decode("ascii")
