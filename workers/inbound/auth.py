"""SMTP AUTH credential checks for one inbound worker: the users file, scrypt off the loop, the shared cache.

`Authenticator.verify(name, password)` answers whether the pair is valid, and for whom.
  - The users file ([auth] users_file) is re-read when its mtime, size or inode
    changes; a malformed one is logged and the last good copy kept; a missing one
    means no users.
  - scrypt runs in a dedicated pool of SCRYPT_THREADS threads, never on the event loop.
    An unknown user costs one scrypt too (against DUMMY_HASH): timing tells no names.
  - Cache: a successful scrypt check is kept for [auth] cache_ttl_seconds in the
    LmdbCache namespace "auth", shared by every inbound worker. Key: HMAC-SHA256 of
    name NUL password under the secret in <cache dir>/auth.key (never the password, nor
    a plain hash of it); value: a digest of the user's stored hash. A hit counts only
    while that digest matches the user's current hash, so a changed password or a
    deleted user invalidates it at once. Failures are never cached.

Invariants: every inbound worker sharing a cache dir holds the same secret (whichever
creates auth.key first wins, atomically: a link, never a partial file). verify never
counts mta_auth_attempts_total: the SMTP layer does, it also sees malformed exchanges.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from prometheus_client import Counter

from mta import logs
from mta.config import AuthConfig
from mta.users import (KEY_BYTES, SALT_BYTES, SCRYPT_N, SCRYPT_P, SCRYPT_R, User, UsersError, parse_users,
                       credential_bytes, verify_password)
from mtaqueue.cache_lmdb import LmdbCache
from mtaqueue.private import create_once, private_dir

CACHE_NAMESPACE: Final = "auth"
SECRET_FILE: Final = "auth.key"
SECRET_BYTES: Final = 32
SCRYPT_THREADS: Final = 2
# For unknown users: the cost of hash_password's hashes; no password hashes to 32 zero bytes.
DUMMY_HASH: Final = (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
                     f"{base64.b64encode(bytes(SALT_BYTES)).decode()}${base64.b64encode(bytes(KEY_BYTES)).decode()}")
_UNREAD: Final = (-1, -1, -1)

AUTH_CACHE_HITS = Counter(
    "mta_auth_cache_hits_total",
    "SMTP AUTH credentials accepted from the shared auth cache, without scrypt: the same name and password "
    "passed scrypt within [auth] cache_ttl_seconds (in any inbound worker) and the password has not changed since.")
AUTH_CACHE_MISSES = Counter(
    "mta_auth_cache_misses_total",
    "SMTP AUTH credential checks that needed scrypt (about 30 ms of CPU each): not in the cache, expired, the "
    "password changed since, wrong credentials, or the cache is off ([auth] cache_ttl_seconds = 0). Many misses "
    "with few failures mean a TTL too short for how often clients log in.")
AUTH_ATTEMPTS = Counter(
    "mta_auth_attempts_total",
    "SMTP AUTH exchanges by result. result: success (authenticated), failure (wrong name or password), "
    "malformed (a broken AUTH exchange: bad base64, unknown mechanism, cancelled), locked_out (refused without "
    "checking: the client IP passed [auth] max_failures), busy (454 4.7.0: checks in progress from the client IP used the "
    "rest of its failure budget for 10 s), no_tls (AUTH before STARTTLS where TLS is required). "
    "Rising failure or locked_out is password guessing; see the log for the client addresses.",
    ["result"])
for _result in ("success", "failure", "malformed", "locked_out", "busy", "no_tls"):
    AUTH_ATTEMPTS.labels(result=_result)  # export every series from the start, at 0


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    user: User | None  # the user as the file has it now, when ok
    cached: bool  # answered from the cache, without scrypt


class Authenticator:
    def __init__(self, config: AuthConfig, cache: LmdbCache | None, cache_dir: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = config.users_file
        self._ttl_seconds = config.cache_ttl_seconds
        self._cache = cache if config.cache_ttl_seconds > 0 else None
        self._secret = load_secret(cache_dir) if self._cache is not None else b""
        self._clock = clock
        self._executor = ThreadPoolExecutor(SCRYPT_THREADS, thread_name_prefix="scrypt")
        self._users: dict[str, User] = {}
        self._stamp: tuple[int, int, int] | None = _UNREAD  # of the file self._users came from; None: no file
        self._errno: int | None = None  # of the last read error logged

    async def verify(self, name: str, password: str) -> AuthResult:
        user = self._current_users().get(name)
        key = self._cache_key(name, password) if self._cache is not None else ""
        if self._cache is not None:
            cached = self._cache.get(CACHE_NAMESPACE, key, self._clock())
            if cached is not None:
                if user is not None and cached == _hash_digest(user.hash):  # no secret: plain == will do
                    AUTH_CACHE_HITS.inc()
                    return AuthResult(True, user, cached=True)
                self._cache.delete(CACHE_NAMESPACE, key)  # the password changed, or the user is gone
        AUTH_CACHE_MISSES.inc()
        stored = user.hash if user is not None else DUMMY_HASH
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, verify_password, password, stored)
        if not ok or user is None:
            return AuthResult(False, None, cached=False)
        if self._cache is not None:
            self._cache.put(CACHE_NAMESPACE, key, _hash_digest(user.hash), self._ttl_seconds, self._clock())
        return AuthResult(True, user, cached=False)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _cache_key(self, name: str, password: str) -> str:
        message = credential_bytes(name) + b"\0" + credential_bytes(password)
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _current_users(self) -> dict[str, User]:
        """The users, re-read when the file changed (one stat per call)."""
        if not self._path:
            return {}
        try:
            stamp: tuple[int, int, int] | None = _stamp(os.stat(self._path))
        except FileNotFoundError:
            stamp = None  # no file, no users
        except OSError as exc:
            return self._keep_on_error(exc)
        if stamp == self._stamp:
            return self._users
        users: dict[str, User] = {}
        try:
            if stamp is not None:
                with open(self._path, encoding="utf-8", errors="surrogateescape") as f:
                    stamp = _stamp(os.fstat(f.fileno()))  # of what is read, should it be replaced meanwhile
                    users = parse_users(f.read(), self._path)
        except UsersError as exc:
            self._stamp = stamp  # parse this state of the file once; a fix changes the stamp
            logs.event("auth_users_invalid", file=self._path, error=str(exc), kept_users=len(self._users))
            return self._users
        except OSError as exc:  # FileNotFoundError too: removed since the stat, the next call sees it
            return self._keep_on_error(exc)
        self._users, self._stamp, self._errno = users, stamp, None
        logs.event("auth_users_loaded" if stamp is not None else "auth_users_missing", file=self._path,
                   users=len(users))
        return users

    def _keep_on_error(self, exc: OSError) -> dict[str, User]:
        """Unreadable (permissions?): keep the last good users, retry on every call, log once per errno."""
        if exc.errno != self._errno:
            logs.event("auth_users_invalid", file=self._path, error=str(exc), kept_users=len(self._users))
            self._errno = exc.errno
        return self._users


def load_secret(cache_dir: str) -> bytes:
    """The HMAC secret of the auth cache, shared by every process using `cache_dir`; created on first use."""
    path = os.path.join(cache_dir, SECRET_FILE)
    if not os.path.exists(path):
        private_dir(cache_dir)
        create_once(path, secrets.token_bytes(SECRET_BYTES))  # the first process's secret wins
    with open(path, "rb") as f:
        secret = f.read()
    if len(secret) != SECRET_BYTES:
        raise RuntimeError(f"{path}: {len(secret)} bytes, expected {SECRET_BYTES}: the file was damaged; "
                           "delete it (cached logins are then forgotten) and restart")
    return secret


def _hash_digest(stored_hash: str) -> str:
    return hashlib.blake2b(stored_hash.encode(), digest_size=16).hexdigest()  # ASCII: User checks the format


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino
