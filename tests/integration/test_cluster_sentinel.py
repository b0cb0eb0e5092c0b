"""[cluster] redis through Redis Sentinel (redis+sentinel://host:port/MASTER/db): a private
master, a replica and a sentinel (the same redis-server binary, --sentinel) on free loopback
ports. The shared limits hold across two nodes that only know the sentinel; when the master
stops, the sentinel promotes the replica and the nodes find it and share their limits there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import wait_until
from tests.integration.test_cluster_inbound import AFTER, SENDER, codes, metrics, sends
from tests.integration.test_metrics import sample
from tests.integration.test_security import pki, secure_server  # noqa: F401 (fixture)
from tests.integration.tlscerts import Pki
from tests.redisserver import RedisSentinel, RedisServer

pytestmark = pytest.mark.integration

RATE = {"window_seconds": 120, "messages_per_window": 2}


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "master", extra=("--repl-diskless-sync-delay", "0")).start()
    try:
        yield server
    finally:
        server.stop()


def sentinel_for(tmp_path: Path, master: RedisServer) -> RedisSentinel:
    return RedisSentinel(tmp_path / "sentinel", master).start()


def test_shared_limits_hold_through_a_sentinel(mta_server, tmp_path: Path, pki: Pki, master: RedisServer) -> None:  # type: ignore[no-untyped-def]
    sentinel = sentinel_for(tmp_path, master)
    try:
        (one, _), (two, _) = [secure_server(mta_server, tmp_path, pki, rate=RATE, cluster={"redis": sentinel.url})
                              for _ in range(2)]
        replies = sends(one.port, SENDER, 1) + sends(two.port, SENDER, 1)
        refused = sends(one.port, SENDER, 1) + sends(two.port, SENDER, 1)
        assert codes(replies) == ["250 2.0.0"] * 2 and codes(refused) == ["450 4.7.1"] * 2, replies + refused
        assert master.cli("GET", f"mta:rate:msg/ip/{SENDER}") == "2"  # in the master the sentinel named
        # The scheduler's leases too (the node delivers to local.test): its first answer from Redis.
        wait_until(lambda: b"event=cluster_redis_up" in one.log_bytes(), 10, "the scheduler's leases answered", one)
    finally:
        sentinel.stop()


def test_a_failover_moves_the_shared_limits_to_the_promoted_replica(mta_server, tmp_path: Path, pki: Pki,  # type: ignore[no-untyped-def]
                                                                    master: RedisServer) -> None:
    replica = RedisServer(tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port))).start()
    wait_until(lambda: "master_link_status:up" in replica.cli("INFO", "replication"), 10, "the replica in sync")
    sentinel = sentinel_for(tmp_path, master)  # it learns of the replica from the master's INFO
    try:
        wait_until(lambda: sentinel.cli("SENTINEL", "replicas", RedisSentinel.MASTER_NAME), 10, "the replica known")
        one, _ = secure_server(mta_server, tmp_path, pki, rate=RATE, cluster={"redis": sentinel.url},
                               server={"inbound_workers": 1})  # one prober: the outage seen means seen by all
        assert codes(sends(one.port, SENDER, 3)) == ["250 2.0.0"] * 2 + ["450 4.7.1"]
        master.stop()
        stopped = time.monotonic()
        wait_until(lambda: sentinel.master_port() == replica.port, 30, "the sentinel promoting the replica")
        promoted = time.monotonic() - stopped
        # The inbound side's prober saw the outage (the sentinel waits DOWN_AFTER_MS, the prober
        # pings every second), then the promoted master: the next decisions are shared again.
        wait_until(lambda: sample(metrics(one), "mta_cluster_redis_outages_total", side="inbound"), 10,
                   "the outage seen", one)
        wait_until(lambda: sample(metrics(one), "mta_cluster_redis_up", side="inbound") == 1, 10,
                   "the node using the new master", one)
        assert codes(sends(one.port, AFTER, 3)) == ["250 2.0.0"] * 2 + ["450 4.7.1"]
        assert replica.cli("GET", f"mta:rate:msg/ip/{AFTER}") == "2", promoted  # counted in the promoted replica
        assert replica.cli("GET", f"mta:rate:msg/ip/{SENDER}") == "2"  # the window replicated before the failover
    finally:
        sentinel.stop()
        replica.stop()
