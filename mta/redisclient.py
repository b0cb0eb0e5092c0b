"""The Redis client of [cluster]: its URL forms, its TLS files, and what a failure means.

One place builds the client that the inbound workers (sharedlimits.py) and the
scheduler (leases.py) use, from [cluster]:
  redis://host:port/db      plain TCP
  rediss://host:port/db     TLS: the server's certificate is verified against
                            redis_ca_file (empty: the system's CAs) and its host name;
                            redis_cert_file + redis_key_file: a client certificate, for
                            a Redis with tls-auth-clients
  unix:///path?db=N         a local socket
  redis+sentinel://h1:p1,h2:p2/MASTER/db
                            Sentinel: the sentinels are asked where the master named
                            MASTER is, and asked again when it stops answering (a failover)
`problems` checks the settings without I/O (config.py); `check_at_start` connects once
before the master forks, so a certificate that does not verify stops `mta serve` with
what to fix, while a Redis that is only down lets it start (the on_redis_down fallback).
`action` turns an error into the operator's next step for the cluster_redis_down log.
`Scripts` runs one Lua script per call on connections of its own, for the inbound
workers' per-command windows: redis-py's command path (pool, retry, events, a timeout
task per send) cost more CPU than the round trip.

redis is imported inside the functions: the CLI's other commands do not pay for it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any

from mta.sections import ClusterConfig

START_TIMEOUT_SECONDS = 3.0
SENTINEL = "redis+sentinel://"
SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL)


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """redis+sentinel://h1:p1,h2:p2/MASTER/db -> the sentinels, the master's name, the db.
    ValueError saying what is wrong."""
    hosts, _, path = url.removeprefix(SENTINEL).partition("/")
    name, _, db = path.partition("/")
    sentinels = []
    for host in hosts.split(","):
        address, _, port = host.rpartition(":")
        if not address or not port.isdigit():
            raise ValueError(f"{host!r} is not host:port")
        sentinels.append((address.strip("[]"), int(port)))
    if not name:
        raise ValueError("no master name (redis+sentinel://h1:p1,h2:p2/MASTER/db)")
    if db and not db.isdigit():
        raise ValueError(f"db {db!r} is not a number")
    return sentinels, name, int(db or 0)


def problems(cluster: ClusterConfig) -> list[tuple[str, str]]:
    """(key, what to fix) for every wrong [cluster] setting; no I/O beyond file existence."""
    found: list[tuple[str, str]] = []
    if cluster.redis and not cluster.redis.startswith(SCHEMES):
        why = (f'{cluster.redis!r}: use "redis://host:port/db", "rediss://host:port/db" (TLS) '
               'or "redis+sentinel://host:port,host:port/MASTER/db"')
        found.append(("[cluster] redis", why))
    if cluster.redis.startswith(SENTINEL):
        try:
            sentinel_parts(cluster.redis)
        except ValueError as exc:
            found.append(("[cluster] redis", f"{cluster.redis!r}: {exc}"))
    tls_files = {"redis_ca_file": cluster.redis_ca_file, "redis_cert_file": cluster.redis_cert_file,
                 "redis_key_file": cluster.redis_key_file}
    if any(tls_files.values()) and not cluster.redis.startswith("rediss://"):
        why = 'redis_ca_file, redis_cert_file and redis_key_file apply to TLS only: use a "rediss://" URL, or remove them'
        found.append(("[cluster] redis", why))
    if bool(cluster.redis_cert_file) != bool(cluster.redis_key_file):
        found.append(("[cluster] redis_cert_file", "a client certificate needs both redis_cert_file and redis_key_file"))
    for name, path in tls_files.items():
        if path and not os.path.isfile(path):
            found.append((f"[cluster] {name}", f"{path}: no such file"))
    return found


def _tls_options(cluster: ClusterConfig) -> dict[str, Any]:
    if not cluster.redis.startswith("rediss://"):
        return {}
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
            "ssl_ca_certs": cluster.redis_ca_file or None,
            "ssl_certfile": cluster.redis_cert_file or None, "ssl_keyfile": cluster.redis_key_file or None}


def client(cluster: ClusterConfig, timeout_seconds: float, no_retry: bool = False) -> Any:
    """The asyncio client (redis.asyncio.Redis) for [cluster] redis; `no_retry`: a failed
    command fails at once (the caller falls back) instead of being tried again."""
    import redis.asyncio as aioredis
    options: dict[str, Any] = {"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds,
                               **_tls_options(cluster)}
    if no_retry:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        options["retry"] = Retry(NoBackoff(), 0)
    if cluster.redis.startswith(SENTINEL):
        from redis.asyncio.sentinel import Sentinel
        sentinels, name, db = sentinel_parts(cluster.redis)
        timeouts = {"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds}
        return Sentinel(sentinels, sentinel_kwargs=timeouts).master_for(name, db=db, **options)
    return aioredis.Redis.from_url(cluster.redis, **options)


def is_certificate_error(error: BaseException | str) -> bool:
    text = str(error)
    return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or isinstance(
        error, ssl.SSLCertVerificationError)


def action(cluster: ClusterConfig, error: BaseException | str) -> str:
    """What the operator should do about a Redis error."""
    if is_certificate_error(error):
        return (f"the Redis server's TLS certificate does not verify: set [cluster] redis_ca_file to the CA that "
                f"signed it (now: {cluster.redis_ca_file or 'the system CAs'}), and check that it names the host "
                "in [cluster] redis")
    if "ssl" in str(error).lower() or "tls" in str(error).lower():
        return ("the TLS handshake with Redis failed: check that [cluster] redis uses rediss:// only for a TLS port, "
                "and redis_cert_file/redis_key_file if Redis requires a client certificate (tls-auth-clients)")
    if "No master found" in str(error):
        return ("no sentinel in [cluster] redis answers for that master name: check the name "
                "(redis+sentinel://host:port/MASTER/db, as in the sentinels' `sentinel monitor`) and the sentinels")
    return "check [cluster] redis and that the Redis server runs and is reachable"


def check_at_start(cluster: ClusterConfig) -> str | None:
    """Connect once (PING): a TLS setting that cannot work, as the reason to refuse to start;
    None when Redis answered, or is only unreachable (the nodes start and fall back)."""
    if not cluster.redis:
        return None
    from redis.exceptions import RedisError

    async def ping() -> None:
        redis = client(cluster, START_TIMEOUT_SECONDS, no_retry=True)
        try:
            await redis.ping()
        finally:
            await redis.aclose()

    try:
        asyncio.run(ping())
    except (RedisError, OSError, ssl.SSLError) as exc:
        if is_certificate_error(exc) or (cluster.redis.startswith("rediss://") and "SSL" in str(exc)):
            return f"[cluster] redis {cluster.redis}: {exc}; {action(cluster, exc)}"
        return None
    return None


class Scripts:
    """EVALSHA on connections made by `redis`'s pool but kept here, one per command in flight.

    Per call: pack (hiredis), send, read the reply, under one asyncio.timeout; the connection
    goes back to the idle list only after a whole reply (an error, a timeout or a cancel
    drops it: never a connection with a reply still owed). An idle connection found closed
    (Redis restarted or failed over since) drops them all and the call is made once more on
    a new one, as the pool's check before each command did. NOSCRIPT (a restarted Redis, a
    SCRIPT FLUSH) sends the script itself once. Errors are redis-py's (RedisError, OSError)
    or TimeoutError."""

    def __init__(self, redis: Any, timeout_seconds: float) -> None:
        import hashlib

        import hiredis
        self._pack = hiredis.pack_command
        pool = redis.connection_pool
        # No socket_timeout on these: one asyncio.timeout covers the send and the read.
        self._new = lambda: pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._timeout = timeout_seconds
        self._idle: list[Any] = []
        self._sha = lambda body: hashlib.sha1(body.encode()).hexdigest()

    def script(self, body: str) -> Any:
        """An awaitable callable(keys, args) -> the script's answer."""
        sha = self._sha(body)

        async def call(keys: list[str], args: list[Any]) -> Any:
            from redis.exceptions import NoScriptError
            try:
                return await self._command(("EVALSHA", sha, len(keys), *keys, *args))
            except NoScriptError:
                return await self._command(("EVAL", body, len(keys), *keys, *args))
        return call

    async def _command(self, args: tuple[Any, ...]) -> Any:
        from redis.exceptions import ConnectionError as Closed
        if not self._idle:
            return await self._on(self._new(), args)
        try:
            return await self._on(self._idle.pop(), args)
        except Closed:  # an idle connection Redis closed meanwhile (a restart, a failover): so are the others
            while self._idle:
                await self._idle.pop().disconnect()
            return await self._on(self._new(), args)

    async def _on(self, connection: Any, args: tuple[Any, ...]) -> Any:
        from redis.exceptions import ResponseError
        try:
            async with asyncio.timeout(self._timeout):
                if not connection.is_connected:
                    await connection.connect()  # as the pool does (a Sentinel's connection asks where the master is)
                await connection.send_packed_command(self._pack(args), check_health=False)
                answer = await connection.read_response()
        except ResponseError:  # a whole reply (NOSCRIPT, a script error): the connection is fine
            self._idle.append(connection)
            raise
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        self._idle.append(connection)
        return answer

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().disconnect()
