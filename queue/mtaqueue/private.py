"""Private storage: the spool and the shared cache are readable by their owner only.

The spool holds every queued message and the cache the AUTH cache's secrets, so their
folders are 0700 and the files in them 0600, whatever the umask of whoever started
mta (a systemd unit's UMask, a shell's 022, a careless 000). A spool or cache made
before this rule is tightened the next time it is opened. Secrets kept beside them
(the admin API token, the AUTH cache's key) are created once with `create_once`.
"""

from __future__ import annotations

import os
import tempfile

DIR_MODE = 0o700
FILE_MODE = 0o600  # LMDB's data.mdb and lock.mdb are created with this (less the umask)


def private_dir(path: str) -> None:
    """Create `path` (and missing parents) or tighten it: 0700, and its files 0600.

    Raises PermissionError naming the fix when the folder belongs to another user.
    """
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    try:
        os.chmod(path, DIR_MODE)
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o077:
                        os.chmod(entry.path, FILE_MODE)
                except FileNotFoundError:
                    continue  # another process removed it meanwhile (e.g. create_once's temporary file)
    except PermissionError as exc:
        raise PermissionError(f"cannot make {path} private (0700, files 0600): {exc.strerror}; "
                              "give it to the user mta runs as (chown -R)") from exc


def create_once(path: str, data: bytes) -> None:
    """Create `path` holding `data`, mode 0600 whatever the umask, whole or not at all;
    when it exists already (another process was first), it is left as it is."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp's 0600 is still narrowed by the umask; this is exact
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if it exists (as O_EXCL would): never a partial file
        except FileExistsError:
            pass  # another process linked its file first: that one counts
    finally:
        os.unlink(tmp)
