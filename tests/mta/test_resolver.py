"""MxResolver against a real DNS server on loopback, through dnspython and a real LmdbCache."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from mtaqueue.cache_lmdb import LmdbCache
from tests.integration.dns_fixtures import dns_server  # noqa: F401
from tests.integration.dns_server import DnsServer
from mta.resolver import MxResolver, Resolution, Target

SHORT_TIMEOUT_SECONDS = 0.5


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[LmdbCache]:
    c = LmdbCache(str(tmp_path / "cache"))
    yield c
    c.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_resolver(server: DnsServer, cache: LmdbCache | None, clock: Clock | None = None, *,
                  timeout: float = 2.0, seed: int = 0) -> MxResolver:
    return MxResolver([server.nameserver], cache, timeout, random.Random(seed), clock=clock or time.time)


def resolve(resolver: MxResolver, domain: str) -> Resolution:
    return asyncio.run(resolver.resolve(domain))


def hosts(resolution: Resolution) -> list[str]:
    return [t.host for t in resolution.targets]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- order ----------------------------------------------------------------------------------

def test_mx_preference_order_ipv4_before_ipv6(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (30, "c.example.test"), (10, "a.example.test"), (20, "b.example.test"))
    dns_server.host("a.example.test", "2001:db8::a", "192.0.2.1")
    dns_server.host("b.example.test", "192.0.2.2")
    dns_server.host("c.example.test", "2001:db8::c")
    result = resolve(make_resolver(dns_server, cache), "example.test")
    assert result == Resolution((
        Target("a.example.test", "192.0.2.1", 10),
        Target("a.example.test", "2001:db8::a", 10),
        Target("b.example.test", "192.0.2.2", 20),
        Target("c.example.test", "2001:db8::c", 30),
    ))
    assert dns_server.count("example.test", "A") == 0  # MX present: no implicit MX lookup


def test_equal_preferences_are_shuffled_on_every_call(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "a.example.test"), (10, "b.example.test"), (20, "z.example.test"))
    for name, address in (("a", "192.0.2.1"), ("b", "192.0.2.2"), ("z", "192.0.2.26")):
        dns_server.host(f"{name}.example.test", address)
    resolver = make_resolver(dns_server, cache, seed=7)
    orders = {tuple(hosts(resolve(resolver, "example.test"))) for _ in range(30)}
    assert orders == {("a.example.test", "b.example.test", "z.example.test"),
                      ("b.example.test", "a.example.test", "z.example.test")}
    assert dns_server.count("example.test", "MX") == 1  # shuffled from the cache, not re-queried


def test_the_same_seed_gives_the_same_orders(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", *((10, f"m{i}.example.test") for i in range(5)))
    for i in range(5):
        dns_server.host(f"m{i}.example.test", f"192.0.2.{i + 1}")
    runs = []
    for _ in range(2):
        resolver = make_resolver(dns_server, cache, seed=3)
        runs.append([hosts(resolve(resolver, "example.test")) for _ in range(5)])
    assert runs[0] == runs[1]
    assert len({tuple(order) for order in runs[0]}) > 1


def test_an_mx_host_listed_twice_is_tried_once_at_its_best_preference(dns_server: DnsServer,
                                                                      cache: LmdbCache) -> None:
    dns_server.mx("example.test", (20, "a.example.test"), (10, "a.example.test"), (15, "b.example.test"))
    dns_server.host("a.example.test", "192.0.2.1")
    dns_server.host("b.example.test", "192.0.2.1", "192.0.2.2")  # shares an address with a
    result = resolve(make_resolver(dns_server, cache), "example.test")
    assert result.targets == (Target("a.example.test", "192.0.2.1", 10), Target("b.example.test", "192.0.2.2", 15))


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from("abcdef")), max_size=12), st.integers(0, 99))
def test_order_is_by_preference_and_keeps_every_host_once(records: list[tuple[int, str]], seed: int) -> None:
    resolver = MxResolver(["127.0.0.1:9"], None, rng=random.Random(seed))  # never queries
    ordered = resolver._order(records)
    assert [p for p, _ in ordered] == sorted(p for p, _ in ordered)
    assert sorted(h for _, h in ordered) == sorted({h for _, h in records})
    best = {h: min(p for p, x in records if x == h) for _, h in records}
    assert all(p == best[h] for p, h in ordered)


# --- implicit MX, null MX, failures ---------------------------------------------------------

def test_implicit_mx_from_a_and_aaaa_when_there_is_no_mx(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.host("plain.test", "2001:db8::9", "192.0.2.9")
    result = resolve(make_resolver(dns_server, cache), "plain.test")
    assert result == Resolution((Target("plain.test", "192.0.2.9", 0), Target("plain.test", "2001:db8::9", 0)))
    assert dns_server.count("plain.test", "MX") == 1


def test_no_mx_and_no_address_is_temporary(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.exists("bare.test")
    result = resolve(make_resolver(dns_server, cache), "bare.test")
    assert (result.targets, result.permanent, result.status) == ((), False, "4.4.3")


def test_null_mx_is_permanent_without_address_queries(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.null_mx("nomail.test")
    dns_server.host("nomail.test", "192.0.2.1")  # must not be used as an implicit MX
    result = resolve(make_resolver(dns_server, cache), "nomail.test")
    assert (result.targets, result.permanent, result.status) == ((), True, "5.1.10")
    assert result.error is not None and "null MX" in result.error  # workers/delivery/main.py relies on it
    assert dns_server.count("nomail.test", "A") == dns_server.count("nomail.test", "AAAA") == 0
    assert dns_server.total() == 1


def test_a_root_mx_among_others_is_ignored(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.set("odd.test", "MX", "0 .", "10 mx.odd.test.")
    dns_server.host("mx.odd.test", "192.0.2.1")
    assert resolve(make_resolver(dns_server, cache), "odd.test").targets == (Target("mx.odd.test", "192.0.2.1", 10),)


def test_nxdomain_is_permanent(dns_server: DnsServer, cache: LmdbCache) -> None:
    result = resolve(make_resolver(dns_server, cache), "nowhere.test")
    assert (result.targets, result.permanent, result.status) == ((), True, "5.1.2")
    assert dns_server.total() == 1


def test_servfail_is_temporary_and_not_cached(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("broken.test", (10, "mx.broken.test"))
    dns_server.host("mx.broken.test", "192.0.2.1")
    dns_server.servfail("broken.test")
    resolver = make_resolver(dns_server, cache)
    for _ in range(2):
        result = resolve(resolver, "broken.test")
        assert (result.targets, result.permanent, result.status) == ((), False, "4.4.3")
    assert dns_server.count("broken.test", "MX") == 2
    dns_server.heal("broken.test")
    assert hosts(resolve(resolver, "broken.test")) == ["mx.broken.test"]


def test_timeout_is_temporary_and_not_cached(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.drop("silent.test")
    resolver = make_resolver(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS)
    started = time.monotonic()
    result = resolve(resolver, "silent.test")
    assert time.monotonic() - started < 2 * SHORT_TIMEOUT_SECONDS + 1.0
    assert (result.targets, result.permanent, result.status) == ((), False, "4.4.3")
    assert "timeout" in (result.error or "")
    queries = dns_server.count("silent.test", "MX")
    resolve(resolver, "silent.test")
    assert dns_server.count("silent.test", "MX") > queries


def test_an_mx_host_without_address_is_skipped(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "gone.example.test"), (20, "slow.example.test"), (30, "ok.example.test"))
    dns_server.host("slow.example.test", "192.0.2.2")
    dns_server.drop("slow.example.test", "A")  # its AAAA is NODATA, its A never answers
    dns_server.host("ok.example.test", "192.0.2.3")
    result = resolve(make_resolver(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS), "example.test")
    assert result == Resolution((Target("ok.example.test", "192.0.2.3", 30),))


def test_no_mx_host_with_an_address_is_temporary(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "gone.example.test"), (20, "bad.example.test"))
    dns_server.servfail("bad.example.test")
    result = resolve(make_resolver(dns_server, cache), "example.test")
    assert (result.targets, result.permanent, result.status) == ((), False, "4.4.3")
    assert "gone.example.test" in (result.error or "") and "bad.example.test" in (result.error or "")


def test_mx_host_behind_a_cname(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "alias.example.test"))
    dns_server.set("alias.example.test", "CNAME", "real.example.test.")
    dns_server.host("real.example.test", "192.0.2.7")
    assert resolve(make_resolver(dns_server, cache), "example.test").targets == (
        Target("alias.example.test", "192.0.2.7", 10),)


def test_a_large_mx_set_comes_over_tcp(dns_server: DnsServer, cache: LmdbCache) -> None:
    names = [f"mx{i:02d}-{'x' * 50}.example.test" for i in range(30)]
    dns_server.mx("example.test", *((i, name) for i, name in enumerate(names)))
    dns_server.host(names[0], "192.0.2.1")
    result = resolve(make_resolver(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS), "example.test")
    assert result.targets == (Target(names[0], "192.0.2.1", 0),)
    assert ("example.test.", "MX", "tcp") in dns_server.log


def test_without_nameservers_the_system_configuration_is_read() -> None:
    MxResolver(None, None)  # reads /etc/resolv.conf (or falls back to 127.0.0.1); sends nothing


def test_domain_literals_and_bad_names_need_no_dns(dns_server: DnsServer, cache: LmdbCache) -> None:
    resolver = make_resolver(dns_server, cache)
    assert resolve(resolver, "[192.0.2.1]").targets == (Target("192.0.2.1", "192.0.2.1", 0),)
    assert resolve(resolver, "[IPv6:2001:DB8::1]").targets == (Target("2001:db8::1", "2001:db8::1", 0),)
    for bad in ("[300.1.1.1]", "[2001:db8::1]", "[192.0.2.1", "bad..test", "", "."):
        result = resolve(resolver, bad)
        assert (result.targets, result.permanent) == ((), True), bad
    assert dns_server.total() == 0


def test_names_are_case_insensitive_and_may_end_in_a_dot(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"))
    dns_server.host("mx.example.test", "192.0.2.1")
    resolver = make_resolver(dns_server, cache)
    assert hosts(resolve(resolver, "Example.TEST.")) == ["mx.example.test"]
    assert hosts(resolve(resolver, "example.test")) == ["mx.example.test"]
    assert dns_server.count("example.test", "MX") == 1


# --- the cache --------------------------------------------------------------------------------

def test_second_resolve_makes_no_query(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"))
    dns_server.host("mx.example.test", "192.0.2.1", "2001:db8::1")
    resolver = make_resolver(dns_server, cache)
    first = resolve(resolver, "example.test")
    assert dns_server.total() == 3  # MX, A, AAAA
    assert resolve(resolver, "example.test") == first
    assert resolve(make_resolver(dns_server, cache), "example.test") == first  # another resolver, same cache
    assert dns_server.total() == 3


def test_records_are_queried_again_after_their_ttl(dns_server: DnsServer, cache: LmdbCache, clock: Clock) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"), ttl=60)
    dns_server.host("mx.example.test", "192.0.2.1", ttl=30)
    resolver = make_resolver(dns_server, cache, clock)
    resolve(resolver, "example.test")
    clock.now += 29
    resolve(resolver, "example.test")
    assert (dns_server.count("example.test", "MX"), dns_server.count("mx.example.test", "A")) == (1, 1)
    dns_server.host("mx.example.test", "192.0.2.99", ttl=30)  # changed while running
    clock.now += 2  # A and AAAA expired, MX not
    assert resolve(resolver, "example.test").targets == (Target("mx.example.test", "192.0.2.99", 10),)
    assert (dns_server.count("example.test", "MX"), dns_server.count("mx.example.test", "A")) == (1, 2)
    clock.now += 30
    resolve(resolver, "example.test")
    assert dns_server.count("example.test", "MX") == 2


def test_a_one_second_ttl_on_the_real_clock(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"), ttl=1)
    dns_server.host("mx.example.test", "192.0.2.1", ttl=1)
    resolver = make_resolver(dns_server, cache)
    resolve(resolver, "example.test")
    resolve(resolver, "example.test")
    assert dns_server.count("example.test", "MX") == 1
    time.sleep(1.1)
    resolve(resolver, "example.test")
    assert dns_server.count("example.test", "MX") == 2


def test_zero_ttl_is_not_cached(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"), ttl=0)
    dns_server.host("mx.example.test", "192.0.2.1")
    resolver = make_resolver(dns_server, cache)
    resolve(resolver, "example.test")
    resolve(resolver, "example.test")
    assert dns_server.count("example.test", "MX") == 2


def test_nxdomain_is_cached_for_the_soa_negative_ttl(dns_server: DnsServer, cache: LmdbCache,
                                                     clock: Clock) -> None:
    dns_server.set_soa(ttl=3600, minimum=5)  # negative TTL = min(3600, 5)
    resolver = make_resolver(dns_server, cache, clock)
    resolve(resolver, "nowhere.test")
    clock.now += 4.9
    assert resolve(resolver, "nowhere.test").status == "5.1.2"
    assert dns_server.count("nowhere.test", "MX") == 1
    clock.now += 0.2
    resolve(resolver, "nowhere.test")
    assert dns_server.count("nowhere.test", "MX") == 2


def test_nodata_is_cached_for_the_soa_negative_ttl(dns_server: DnsServer, cache: LmdbCache, clock: Clock) -> None:
    dns_server.set_soa(ttl=7, minimum=600)  # negative TTL = min(7, 600)
    dns_server.host("plain.test", "192.0.2.9", ttl=3600)  # no MX, no AAAA: two NODATA answers
    resolver = make_resolver(dns_server, cache, clock)
    resolve(resolver, "plain.test")
    clock.now += 6
    resolve(resolver, "plain.test")
    def counts() -> list[int]:
        return [dns_server.count("plain.test", t) for t in ("MX", "A", "AAAA")]

    assert counts() == [1, 1, 1]
    clock.now += 2
    resolve(resolver, "plain.test")
    assert counts() == [2, 1, 2]


def test_negative_ttl_defaults_to_300_seconds_without_soa(dns_server: DnsServer, cache: LmdbCache,
                                                          clock: Clock) -> None:
    dns_server.set_soa(None)
    resolver = make_resolver(dns_server, cache, clock)
    resolve(resolver, "nowhere.test")
    clock.now += 299
    resolve(resolver, "nowhere.test")
    assert dns_server.count("nowhere.test", "MX") == 1
    clock.now += 2
    resolve(resolver, "nowhere.test")
    assert dns_server.count("nowhere.test", "MX") == 2


def test_concurrent_lookups_share_one_query(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"))
    dns_server.host("mx.example.test", "192.0.2.1")
    resolver = make_resolver(dns_server, cache)

    async def many() -> list[Resolution]:
        return await asyncio.gather(*(resolver.resolve("example.test") for _ in range(10)))

    results = asyncio.run(many())
    assert len(set(results)) == 1 and results[0].targets
    assert dns_server.total() == 3


def test_without_a_cache_every_resolve_queries(dns_server: DnsServer) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"))
    dns_server.host("mx.example.test", "192.0.2.1")
    resolver = make_resolver(dns_server, None)
    resolve(resolver, "example.test")
    resolve(resolver, "example.test")
    assert dns_server.count("example.test", "MX") == 2


def test_counters_move(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"))
    dns_server.host("mx.example.test", "192.0.2.1")
    dns_server.servfail("broken.test")
    dns_server.drop("silent.test")
    names: list[tuple[str, dict[str, str]]] = [
        ("mta_dns_cache_hits_total", {}), ("mta_dns_cache_misses_total", {})] + [
        ("mta_dns_queries_total", {"result": r}) for r in ("ok", "nxdomain", "nodata", "servfail", "timeout")]
    before = [metric(n, **labels) for n, labels in names]
    resolver = make_resolver(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS)
    for domain in ("example.test", "example.test", "nowhere.test", "broken.test", "silent.test"):
        resolve(resolver, domain)
    after = [metric(n, **labels) for n, labels in names]
    deltas = dict(zip([n + str(sorted(labels.values())) for n, labels in names],
                      [a - b for a, b in zip(after, before)]))
    assert deltas == {
        "mta_dns_cache_hits_total[]": 3,  # the second example.test: MX, A, AAAA
        "mta_dns_cache_misses_total[]": 6,  # MX, A, AAAA, then one MX each for the others
        "mta_dns_queries_total['ok']": 2,  # MX, A
        "mta_dns_queries_total['nxdomain']": 1,
        "mta_dns_queries_total['nodata']": 1,  # AAAA of mx.example.test
        "mta_dns_queries_total['servfail']": 1,
        "mta_dns_queries_total['timeout']": 1,
    }


def test_works_under_uvloop(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.mx("example.test", (10, "mx.example.test"))
    dns_server.host("mx.example.test", "192.0.2.1")
    dns_server.drop("silent.test")
    resolver = make_resolver(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS)

    async def both() -> tuple[Resolution, Resolution]:
        return await resolver.resolve("example.test"), await resolver.resolve("silent.test")

    ok, slow = uvloop.run(both())
    assert hosts(ok) == ["mx.example.test"]
    assert (slow.permanent, slow.status) == (False, "4.4.3")
