"""[cluster] redis over TLS (rediss://): a private redis-server listening with TLS only and
requiring a client certificate, a CA and certificates made by the test (tlscerts.py).
The shared limits hold across two nodes over TLS; a CA that did not sign Redis's
certificate stops `mta serve` at start, saying what to fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cluster_inbound import SENDER, codes, sends
from tests.integration.test_security import pki, secure_server  # noqa: F401 (fixture)
from tests.integration.tlscerts import Pki, make_pki
from tests.redisserver import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", pki=make_pki(tmp_path / "redis-pki", hostname="redis.test")).start()
    try:
        yield server
    finally:
        server.stop()


def cluster(redis: RedisServer, ca: Path) -> dict[str, str]:
    assert redis.pki is not None
    return {"redis": redis.url, "redis_ca_file": str(ca), "redis_cert_file": str(redis.pki.cert),
            "redis_key_file": str(redis.pki.key)}


def test_shared_limits_hold_over_tls(mta_server, tmp_path: Path, pki: Pki, tls_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    assert tls_redis.url.startswith("rediss://") and tls_redis.pki is not None
    (one, _), (two, _) = [secure_server(mta_server, tmp_path, pki, rate={"window_seconds": 120, "messages_per_window": 2},
                                        cluster=cluster(tls_redis, tls_redis.pki.ca)) for _ in range(2)]
    replies = sends(one.port, SENDER, 1) + sends(two.port, SENDER, 1)
    refused = sends(one.port, SENDER, 1) + sends(two.port, SENDER, 1)
    assert codes(replies) == ["250 2.0.0"] * 2 and codes(refused) == ["450 4.7.1"] * 2, replies + refused
    assert tls_redis.cli("GET", f"mta:rate:msg/ip/{SENDER}") == "2"  # counted in the TLS Redis
    assert b"event=cluster_redis_down" not in one.log_bytes() + two.log_bytes()


def test_a_wrong_ca_stops_serve_at_start_saying_what_to_fix(mta_server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            tls_redis: RedisServer) -> None:
    other = make_pki(tmp_path / "other-pki")  # a CA that did not sign the Redis server's certificate
    server = mta_server(start=False, cluster=cluster(tls_redis, other.ca))
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        server.start()
    log = server.log_bytes().decode()
    assert "[cluster] redis" in log and "certificate verify failed" in log, log
    assert f"set [cluster] redis_ca_file to the CA that signed it (now: {other.ca})" in log, log


def test_a_tls_redis_that_is_down_at_start_is_an_outage_not_a_refusal(mta_server, tls_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    assert tls_redis.pki is not None
    tls_redis.stop()
    server = mta_server(cluster=cluster(tls_redis, tls_redis.pki.ca))  # starts: on_redis_down applies
    assert b"redis_ca_file" not in server.log_bytes()
