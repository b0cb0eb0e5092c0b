"""Delivery limits shared by a cluster of nodes through Redis ([cluster] redis).

Two real `mta serve` nodes, one private redis-server on a free loopback port, one sink
that counts concurrent connections: the destination's concurrency holds for the
cluster, a node killed with -9 gives its session slots back when its lease expires,
and with Redis stopped the configured fallback applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import tomllib
import urllib.request
from collections import Counter

import pytest

from tests.integration.conftest import MtaServer, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import FAST_RETRY, send_all
from tests.redisserver import RedisServer, redis_server  # noqa: F401 (a fixture)
from workers.scheduler.leases import LEASE_SECONDS, TOTAL_KEYS, lease_keys

pytestmark = pytest.mark.integration

DOMAIN = "sink.test"


def node(mta_server, sink: SmtpSink, redis: RedisServer, name: str, *, on_redis_down: str = "local",
         concurrency: int = 2, window: int = 2, rate: float = 0.0) -> MtaServer:  # type: ignore[no-untyped-def]
    return mta_server(
        server={"inbound_workers": 1, "drain_timeout_seconds": 1},
        relay={"relay_domains": [DOMAIN], "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, "concurrency": concurrency, "initial_concurrency": window,
                  "max_messages_per_connection": 2, "connection_idle_seconds": 0.2,
                  "max_messages_per_second": rate, **FAST_RETRY},
        routes={DOMAIN: f"{sink.address}:{sink.port}"},
        cluster={"redis": redis.url, "node": name, "on_redis_down": on_redis_down},
    )


def mails(tag: str, n: int) -> list[tuple[str, list[str], bytes]]:
    return [("a@client.test", [f"u{i}@{DOMAIN}"],
             f"Message-ID: <{tag}{i}@client.test>\r\nSubject: {tag} {i}\r\n\r\nbody\r\n".encode()) for i in range(n)]


def message_ids(sink: SmtpSink) -> Counter[str]:
    return Counter(m.group(1) for s in sink.messages if (m := re.search(rb"Message-ID: <([^>]+)>", s.data)))


def scrape(server: MtaServer) -> str:
    """The node's /metrics; "" while its control process does not answer yet (polled in wait_until)."""
    assert server.config_path is not None
    listen = tomllib.loads(server.config_path.read_text())["control"]["listen"]
    try:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:  # URLError, a refused or reset connection: the control process starts after SMTP
        return ""


def test_concurrency_is_a_cluster_total(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    with SmtpSink(delay_seconds=0.05) as sink:
        one = node(mta_server, sink, redis_server, "n1")
        two = node(mta_server, sink, redis_server, "n2")

        async def load() -> None:
            await asyncio.gather(send_all(one.port, mails("one", 30)), send_all(two.port, mails("two", 30)))

        asyncio.run(load())
        sink.wait_for_messages(60, timeout=60)
        for server in (one, two):
            wait_until(lambda s=server: s.queue_list() == [], 10, "an empty queue", server)
        time.sleep(0.5)
        ids = message_ids(sink)
        assert len(ids) == 60 and set(ids.values()) == {1}  # every message, once
        assert sink.peak_connections == 2, sink.peak_connections  # the cluster total, and it was used
        for server in (one, two):
            assert b"event=cluster_redis_up" in server.log_bytes()
            assert 'mta_cluster_shared_decisions_total{limit="concurrency",result="allowed"}' in scrape(server)
        wait_until(lambda: redis_server.cli("EXISTS", lease_keys(DOMAIN)[0]) == "0", 10,
                   "the leases given back when idle")


def test_message_rate_is_a_cluster_total(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    rate, total = 10.0, 40
    with SmtpSink() as sink:
        # Both nodes deliver at once: each window starts at 2 of a cluster total of 20.
        one = node(mta_server, sink, redis_server, "n1", concurrency=20, rate=rate)
        two = node(mta_server, sink, redis_server, "n2", concurrency=20, rate=rate)

        async def load() -> None:
            await asyncio.gather(send_all(one.port, mails("one", total // 2)), send_all(two.port, mails("two", total // 2)))

        asyncio.run(load())
        sink.wait_for_messages(1, timeout=10)
        first = time.monotonic()
        sink.wait_for_messages(total, timeout=30)
        elapsed = time.monotonic() - first
        # At most a burst of `rate` tokens, then `rate` a second for the cluster; each
        # node's own bucket would let both go at `rate` each (about 1 s here).
        least = (total - 1 - rate) / rate
        assert least * 0.9 <= elapsed < least * 2, elapsed
        ids = message_ids(sink)
        assert len(ids) == total and set(ids.values()) == {1}
        assert 'mta_cluster_shared_decisions_total{limit="rate",result="allowed"}' in scrape(one)


def test_a_killed_node_gives_its_slots_back_at_lease_expiry(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    slow = SmtpSink(delay_seconds=30)  # the first node's sessions hang in DATA: it holds both slots
    with slow, SmtpSink() as fast:
        one = node(mta_server, slow, redis_server, "n1")
        asyncio.run(send_all(one.port, mails("one", 4)))
        held = lease_keys(DOMAIN)[0]
        wait_until(lambda: redis_server.cli("HGET", held, "n1") == "2" and slow.current_connections == 2, 10,
                   "n1 holding both slots", one)
        two = node(mta_server, fast, redis_server, "n2")  # the same destination, a sink that answers
        one.kill9()
        killed = time.monotonic()
        asyncio.run(send_all(two.port, mails("two", 3)))
        fast.wait_for_messages(3, timeout=LEASE_SECONDS + 15)
        waited = time.monotonic() - killed
        assert waited >= LEASE_SECONDS / 2, waited  # n1's slots stayed taken until its lease ran out
        assert redis_server.cli("HGET", held, "n1") == ""


def delivered_then_redis_stopped(one: MtaServer, sink: SmtpSink, redis: RedisServer) -> MtaServer:
    """Two messages delivered through Redis, the lease given back, Redis stopped, three more sent."""
    asyncio.run(send_all(one.port, mails("before", 2)))
    sink.wait_for_messages(2, timeout=10)
    wait_until(lambda: redis.cli("EXISTS", lease_keys(DOMAIN)[0]) == "0", 10, "the lease given back", one)
    redis.stop()
    asyncio.run(send_all(one.port, mails("down", 3)))
    return one


def test_a_stopped_node_gives_its_slots_back_at_once(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    with SmtpSink(delay_seconds=30) as slow:
        one = node(mta_server, slow, redis_server, "n1")
        asyncio.run(send_all(one.port, mails("one", 2)))
        held = lease_keys(DOMAIN)[0]
        wait_until(lambda: redis_server.cli("HGET", held, "n1") == "2", 10, "n1 holding both slots", one)
        stopped = time.monotonic()  # SIGTERM: a drain of 1 s, the sessions hanging in DATA are cut
        one.stop()
        assert redis_server.cli("HGET", held, "n1") == ""
        assert time.monotonic() - stopped < LEASE_SECONDS / 2


def test_redis_down_local_fallback(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    with SmtpSink() as sink:
        one = delivered_then_redis_stopped(node(mta_server, sink, redis_server, "n1", on_redis_down="local"),
                                           sink, redis_server)
        sink.wait_for_messages(5, timeout=20)  # the node's own limits
        wait_until(lambda: b"event=cluster_redis_down" in one.log_bytes(), 10, "the outage logged", one)
        assert 'mta_cluster_redis_up{side="delivery"} 0.0' in scrape(one)
        metrics = scrape(one)
        assert 'mta_cluster_shared_decisions_total{limit="concurrency",result="local"}' in metrics
        assert 'mta_cluster_shared_decisions_total{limit="max_connections",result="local"}' in metrics


def test_redis_down_tempfail_holds_new_sessions_until_redis_is_back(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    with SmtpSink() as sink:
        one = delivered_then_redis_stopped(node(mta_server, sink, redis_server, "n1", on_redis_down="tempfail"),
                                           sink, redis_server)
        with contextlib.suppress(TimeoutError):
            sink.wait_for_messages(3 + 2, timeout=4)
        assert len(sink.messages) == 2, "delivered without a shared decision"
        assert len(one.queue_list()) == 3
        redis_server.start()  # the same port: the node finds it again
        sink.wait_for_messages(5, timeout=20)
        ids = message_ids(sink)
        assert len(ids) == 5 and set(ids.values()) == {1}
        log = one.log_bytes()
        assert b"event=cluster_redis_down" in log and log.rindex(b"event=cluster_redis_up") > log.index(
            b"event=cluster_redis_down")


DOMAINS = ("a.sink.test", "b.sink.test", "c.sink.test")


def test_max_connections_is_a_cluster_total(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    # Three destinations allowed 3 sessions each for the cluster, on two nodes allowed 3
    # sessions in total each: only max_connections as a cluster total keeps it to 3.
    with SmtpSink(delay_seconds=0.2) as sink:
        nodes = [mta_server(
            server={"inbound_workers": 1, "drain_timeout_seconds": 1},
            relay={"relay_domains": list(DOMAINS), "mynetworks": ["127.0.0.1/32"]},
            delivery={"workers": 1, "max_connections": 3, "concurrency": 3, "initial_concurrency": 3,
                      "max_messages_per_connection": 2, "connection_idle_seconds": 0.2, **FAST_RETRY},
            routes={d: f"{sink.address}:{sink.port}" for d in DOMAINS},
            cluster={"redis": redis_server.url, "node": name}) for name in ("n1", "n2")]

        def spread(tag: str) -> list[tuple[str, list[str], bytes]]:  # over the three destinations
            return [(sender, [f"u{i}@{DOMAINS[i % 3]}"], data) for i, (sender, _rcpts, data) in enumerate(mails(tag, 30))]

        async def load() -> None:
            await asyncio.gather(send_all(nodes[0].port, spread("one")), send_all(nodes[1].port, spread("two")))

        asyncio.run(load())
        sink.wait_for_messages(60, timeout=60)
        ids = message_ids(sink)
        assert len(ids) == 60 and set(ids.values()) == {1}
        assert sink.peak_connections == 3, sink.peak_connections  # the cluster total, and it was used
        assert 'mta_cluster_shared_decisions_total{limit="max_connections",result="allowed"}' in scrape(nodes[0])
        wait_until(lambda: redis_server.cli("EXISTS", TOTAL_KEYS[0]) == "0", 10, "the total lease given back")


def test_an_idle_node_reports_redis_up_down_and_back(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """No mail at all: mta_cluster_redis_up{side="delivery"} still says whether Redis answers
    (an alert on min() == 0 must not fire for a healthy idle node, nor stay on after an outage)."""
    with SmtpSink() as sink:
        one = node(mta_server, sink, redis_server, "n1")
        up = 'mta_cluster_redis_up{side="delivery"} 1.0'
        down = 'mta_cluster_redis_up{side="delivery"} 0.0'
        wait_until(lambda: up in scrape(one), 10, "Redis seen up with no mail", one)
        redis_server.stop()
        wait_until(lambda: down in scrape(one), 10, "the outage seen with no mail", one)
        redis_server.start()
        wait_until(lambda: up in scrape(one), 10, "Redis seen back with no mail", one)
        log = one.log_bytes()
        assert log.rindex(b"event=cluster_redis_up") > log.index(b"event=cluster_redis_down")
        assert sink.connections == 0


def test_after_an_outage_on_local_limits_the_cluster_total_holds_again_at_once(mta_server, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """A destination served on each node's own limits during the outage asks for a lease
    before its next session once Redis is back (not at the next renewal, seconds later)."""
    with SmtpSink(delay_seconds=0.05) as sink:
        one = node(mta_server, sink, redis_server, "n1")
        two = node(mta_server, sink, redis_server, "n2")
        redis_server.stop()

        async def load(tag: str) -> None:
            await asyncio.gather(send_all(one.port, mails(f"{tag}one", 10)), send_all(two.port, mails(f"{tag}two", 10)))

        asyncio.run(load("down"))
        sink.wait_for_messages(20, timeout=30)
        redis_server.start()
        for server in (one, two):
            wait_until(lambda s=server: 'mta_cluster_redis_up{side="delivery"} 1.0' in scrape(s), 10,
                       "Redis seen back", server)
        sink.peak_connections = sink.current_connections
        asyncio.run(load("back"))
        sink.wait_for_messages(40, timeout=30)
        assert sink.peak_connections <= 2, sink.peak_connections
        ids = message_ids(sink)
        assert len(ids) == 40 and set(ids.values()) == {1}
