"""The spool and the cache are private whatever the umask: folders 0700, files 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.cache_lmdb import LmdbCache

MIB = 1024 * 1024


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    found.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()})
    return found


def test_spool_and_cache_made_under_umask_0_are_private(tmp_path: Path, no_umask: None) -> None:
    LmdbBackend(str(tmp_path / "var" / "spool"), MIB).close()
    LmdbCache(str(tmp_path / "cache"), MIB).close()
    assert modes(tmp_path / "var" / "spool") == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600}
    assert modes(tmp_path / "cache") == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600}


def test_an_open_spool_made_before_the_rule_is_tightened(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    LmdbBackend(str(spool), MIB).close()
    spool.chmod(0o755)
    for name in ("data.mdb", "lock.mdb"):
        (spool / name).chmod(0o644)
    LmdbBackend(str(spool), MIB).close()
    assert modes(spool) == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600}
