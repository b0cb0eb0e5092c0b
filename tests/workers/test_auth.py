"""Authenticator: real users files, real scrypt, a real LmdbCache shared with other processes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mta import logs
from mta.config import AuthConfig
from mta.users import User, hash_password, save_users
from mtaqueue.cache_lmdb import LmdbCache
from workers.inbound.auth import AUTH_ATTEMPTS, AuthResult, Authenticator, load_secret

ROOT = Path(__file__).resolve().parents[2]
NAME = "alice@example.com"
PASSWORD = "s3cret-Passw0rd"
HASH = hash_password(PASSWORD)  # once: scrypt is deliberately slow
NEW_PASSWORD = "another-passw0rd"
NEW_HASH = hash_password(NEW_PASSWORD)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """A users file, the cache dir, and Authenticators over them (closed at the end)."""

    def __init__(self, tmp_path: Path) -> None:
        self.users_file = tmp_path / "users"
        self.cache_dir = tmp_path / "cache"
        self.clock = Clock()
        save_users(str(self.users_file), {NAME: User(NAME, HASH, ("@example.com",))})
        self.cache = LmdbCache(str(self.cache_dir))
        self._open: list[Authenticator] = []

    def authenticator(self, ttl_seconds: float = 3600.0) -> Authenticator:
        config = AuthConfig(users_file=str(self.users_file), cache_ttl_seconds=ttl_seconds)
        auth = Authenticator(config, self.cache, str(self.cache_dir), clock=self.clock)
        self._open.append(auth)
        return auth

    def close(self) -> None:
        for auth in self._open:
            auth.close()
        self.cache.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def verify(auth: Authenticator, name: str, password: str) -> AuthResult:
    return asyncio.run(auth.verify(name, password))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counts() -> tuple[float, float]:
    return metric("mta_auth_cache_hits_total"), metric("mta_auth_cache_misses_total")


def verify_in_another_process(rig: Rig, name: str, password: str) -> dict[str, object]:
    """Another inbound worker: its own process, LmdbCache and Authenticator over the same files."""
    script = (
        "import asyncio, json, sys\n"
        "from mta.config import AuthConfig\n"
        "from mtaqueue.cache_lmdb import LmdbCache\n"
        "from workers.inbound.auth import Authenticator\n"
        "users, cache_dir, now, name, password = sys.argv[1:]\n"
        "cache = LmdbCache(cache_dir)\n"
        "auth = Authenticator(AuthConfig(users_file=users), cache, cache_dir, clock=lambda: float(now))\n"
        "r = asyncio.run(auth.verify(name, password))\n"
        "auth.close()\n"
        "print(json.dumps({'ok': r.ok, 'cached': r.cached}))\n")
    done = subprocess.run(
        [sys.executable, "-c", script, str(rig.users_file), str(rig.cache_dir), str(rig.clock.now), name, password],
        capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "queue")])}


# --- verification --------------------------------------------------------------------------

def test_right_password_wrong_password_unknown_user(rig: Rig) -> None:
    auth = rig.authenticator()
    ok = verify(auth, NAME, PASSWORD)
    assert ok == AuthResult(True, User(NAME, HASH, ("@example.com",)), cached=False)
    assert verify(auth, NAME, "wrong") == AuthResult(False, None, cached=False)
    assert verify(auth, "ALICE@example.com", PASSWORD) == AuthResult(False, None, cached=False)  # names match exactly
    assert verify(auth, "nobody@example.com", PASSWORD) == AuthResult(False, None, cached=False)


def test_an_unknown_user_costs_a_scrypt_too(rig: Rig) -> None:
    auth = rig.authenticator(ttl_seconds=0)
    verify(auth, NAME, "warm-up")

    def seconds(name: str) -> float:
        start = time.perf_counter()
        verify(auth, name, "wrong")
        return time.perf_counter() - start

    known = min(seconds(NAME) for _ in range(3))
    unknown = min(seconds("nobody@example.com") for _ in range(3))
    assert unknown > known / 3, (known, unknown)


def test_verify_does_not_count_attempts(rig: Rig) -> None:
    before = {r: metric("mta_auth_attempts_total", result=r)
              for r in ("success", "failure", "malformed", "locked_out", "no_tls")}
    assert None not in before.values()  # every series exported from the start
    auth = rig.authenticator()
    verify(auth, NAME, PASSWORD)
    verify(auth, NAME, "wrong")
    assert before == {r: metric("mta_auth_attempts_total", result=r) for r in before}
    AUTH_ATTEMPTS.labels(result="malformed").inc()  # what the SMTP layer does
    assert metric("mta_auth_attempts_total", result="malformed") == before["malformed"] + 1


# --- the cache -----------------------------------------------------------------------------

def test_second_verify_is_a_cache_hit(rig: Rig) -> None:
    auth = rig.authenticator()
    hits, misses = counts()
    assert verify(auth, NAME, PASSWORD).cached is False
    assert counts() == (hits, misses + 1)
    result = verify(auth, NAME, PASSWORD)
    assert result.ok and result.cached and result.user is not None and result.user.name == NAME
    assert counts() == (hits + 1, misses + 1)


def test_another_worker_process_hits_the_same_cache(rig: Rig) -> None:
    assert verify(rig.authenticator(), NAME, PASSWORD).ok
    assert verify_in_another_process(rig, NAME, PASSWORD) == {"ok": True, "cached": True}
    assert verify_in_another_process(rig, NAME, "wrong") == {"ok": False, "cached": False}


def test_another_instance_in_this_process_hits_too(rig: Rig) -> None:
    assert verify(rig.authenticator(), NAME, PASSWORD).cached is False
    assert verify(rig.authenticator(), NAME, PASSWORD).cached is True


def test_password_change_invalidates_the_cache(rig: Rig) -> None:
    auth = rig.authenticator()
    verify(auth, NAME, PASSWORD)
    assert verify(auth, NAME, PASSWORD).cached
    save_users(str(rig.users_file), {NAME: User(NAME, NEW_HASH)})
    hits, misses = counts()
    assert verify(auth, NAME, PASSWORD) == AuthResult(False, None, cached=False)
    assert counts() == (hits, misses + 1)
    assert rig.cache.entries() == 0  # the stale entry went at once
    assert verify(auth, NAME, NEW_PASSWORD) == AuthResult(True, User(NAME, NEW_HASH), cached=False)
    assert verify(auth, NAME, NEW_PASSWORD).cached
    assert not verify(auth, NAME, PASSWORD).ok


def test_a_deleted_user_is_not_served_from_the_cache(rig: Rig) -> None:
    auth = rig.authenticator()
    verify(auth, NAME, PASSWORD)
    save_users(str(rig.users_file), {})
    assert verify(auth, NAME, PASSWORD) == AuthResult(False, None, cached=False)


def test_a_hit_returns_the_user_as_the_file_has_it_now(rig: Rig) -> None:
    auth = rig.authenticator()
    verify(auth, NAME, PASSWORD)
    save_users(str(rig.users_file), {NAME: User(NAME, HASH, ("news@example.com",))})  # same password
    result = verify(auth, NAME, PASSWORD)
    assert result.cached and result.user == User(NAME, HASH, ("news@example.com",))


def test_failures_are_never_cached(rig: Rig) -> None:
    auth = rig.authenticator()
    hits, misses = counts()
    for _ in range(2):
        assert not verify(auth, NAME, "wrong").ok
        assert not verify(auth, "nobody@example.com", "wrong").ok
    assert counts() == (hits, misses + 4)
    assert rig.cache.entries() == 0


def test_entries_expire_after_the_ttl(rig: Rig) -> None:
    auth = rig.authenticator(ttl_seconds=60)
    verify(auth, NAME, PASSWORD)
    rig.clock.now += 59
    assert verify(auth, NAME, PASSWORD).cached
    rig.clock.now += 2
    assert verify(auth, NAME, PASSWORD).cached is False


def test_ttl_zero_disables_the_cache(rig: Rig) -> None:
    auth = rig.authenticator(ttl_seconds=0)
    assert verify(auth, NAME, PASSWORD).ok
    assert verify(auth, NAME, PASSWORD) == AuthResult(True, User(NAME, HASH, ("@example.com",)), cached=False)
    assert rig.cache.entries() == 0
    assert not (rig.cache_dir / "auth.key").exists()


def test_the_cache_key_is_an_hmac_and_holds_no_password(rig: Rig) -> None:
    verify(rig.authenticator(), NAME, PASSWORD)
    secret = (rig.cache_dir / "auth.key").read_bytes()
    key = hmac.new(secret, f"{NAME}\0{PASSWORD}".encode(), hashlib.sha256).hexdigest()
    raw = (rig.cache_dir / "data.mdb").read_bytes()
    assert key.encode() in raw
    assert rig.cache.get("auth", key, rig.clock()) == hashlib.blake2b(HASH.encode(), digest_size=16).hexdigest()
    for leak in (PASSWORD.encode(), hashlib.sha256(PASSWORD.encode()).hexdigest().encode(),
                 hashlib.sha256(f"{NAME}\0{PASSWORD}".encode()).hexdigest().encode(), HASH.encode()):
        assert leak not in raw


# --- the secret ----------------------------------------------------------------------------

def test_the_secret_is_shared_and_0600(rig: Rig) -> None:
    rig.authenticator()
    path = rig.cache_dir / "auth.key"
    first = path.read_bytes()
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    rig.authenticator()
    assert path.read_bytes() == first
    assert load_secret(str(rig.cache_dir)) == first
    assert sorted(p.name for p in rig.cache_dir.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_processes_racing_to_create_the_secret_agree(tmp_path: Path) -> None:
    cache_dir = tmp_path / "fresh"
    script = "import sys\nfrom workers.inbound.auth import load_secret\nprint(load_secret(sys.argv[1]).hex())\n"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache_dir)], stdout=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(6)]
    secrets = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert secrets == {(cache_dir / "auth.key").read_bytes().hex()}


def test_a_damaged_secret_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "auth.key").write_bytes(b"short")
    with pytest.raises(RuntimeError, match="expected 32"):
        load_secret(str(tmp_path))


# --- the users file ------------------------------------------------------------------------

def test_a_malformed_file_is_logged_and_the_last_good_copy_kept(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs, "_stream", log)
    auth = rig.authenticator(ttl_seconds=0)
    assert verify(auth, NAME, PASSWORD).ok
    rig.users_file.write_text(f"{NAME}:{NEW_HASH}\nbroken line\n")
    assert verify(auth, NAME, PASSWORD).ok  # the last good copy
    assert verify(auth, NAME, PASSWORD).ok
    invalid = [line for line in log.getvalue().splitlines() if "event=auth_users_invalid" in line]
    assert len(invalid) == 1 and f"{rig.users_file}:2:" in invalid[0]  # once per state of the file
    rig.users_file.write_text(f"{NAME}:{NEW_HASH}\n")
    assert verify(auth, NAME, NEW_PASSWORD).ok
    assert "event=auth_users_loaded" in log.getvalue().splitlines()[-1]


def test_a_missing_file_means_no_users(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_stream", io.StringIO())
    auth = rig.authenticator()
    assert verify(auth, NAME, PASSWORD).ok
    rig.users_file.unlink()
    assert not verify(auth, NAME, PASSWORD).ok
    save_users(str(rig.users_file), {NAME: User(NAME, HASH)})
    assert verify(auth, NAME, PASSWORD).ok


def test_scrypt_runs_off_the_event_loop(rig: Rig) -> None:
    auth = rig.authenticator(ttl_seconds=0)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(auth.verify(NAME, PASSWORD) for _ in range(4)))
        task.cancel()
        assert all(r.ok for r in results)
        return ticks

    assert asyncio.run(main()) >= 10  # four scrypts take far more than 10 ms; the loop kept ticking
