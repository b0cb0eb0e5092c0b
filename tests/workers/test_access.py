"""Access: client allow/deny CIDRs, sender/recipient deny lists, DNSBLs against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mta import logs
from mta.config import Config, ConfigError, PolicyConfig
from mtaqueue.cache_lmdb import LmdbCache
from tests.integration.dns_fixtures import dns_server  # noqa: F401
from tests.integration.dns_server import DnsServer
from tests.mta.test_resolver import cache  # noqa: F401 (fixture: a real LmdbCache)
from mta.resolver import MxResolver
from workers.inbound.access import RECIPIENT_DENIED, SENDER_DENIED, Access, reverse_name

SHORT_TIMEOUT_SECONDS = 0.5
ZONE = "bl.test"
CLIENT = "192.0.2.1"
LISTED_NAME = "1.2.0.192.bl.test"


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The event log lines written during the test."""
    out = io.StringIO()
    monkeypatch.setattr(logs, "_stream", out)
    return out


def make_access(server: DnsServer | None = None, cache: LmdbCache | None = None, *, timeout: float = 2.0,
                client_allow: tuple[str, ...] = (), client_deny: tuple[str, ...] = (),
                **policy: Any) -> Access:
    resolver = MxResolver([server.nameserver], cache, timeout, random.Random(0)) if server else None
    config = Config(policy=PolicyConfig(client_allow=tuple(ipaddress.ip_network(n) for n in client_allow),
                                        client_deny=tuple(ipaddress.ip_network(n) for n in client_deny),
                                        **policy))
    return Access(config, resolver)


def dnsbl(access: Access, ip: str = CLIENT) -> str | None:
    reply = asyncio.run(access.dnsbl(ip))
    return str(reply) if reply is not None else None


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- clients ----------------------------------------------------------------------------------

def test_client_deny_and_allow_cidrs() -> None:
    access = make_access(client_deny=("198.51.100.0/24", "2001:db8:bad::/48"),
                         client_allow=("198.51.100.7/32",))
    denied = access.client("198.51.100.8")
    assert str(denied) == "554 5.7.1 Error: access denied for your address"
    assert access.client("198.51.100.7") is None  # allow wins over deny
    assert access.client("203.0.113.1") is None
    assert access.client("2001:db8:bad::1") == denied
    assert access.client("2001:db8:900d::1") is None
    assert access.client("::ffff:198.51.100.8") == denied  # IPv4-mapped, from a dual-stack socket
    assert access.client("not an address") is None
    assert access.allowed("198.51.100.7") and access.allowed("::ffff:198.51.100.7")
    assert not access.allowed("198.51.100.8") and not access.allowed("unknown")


# --- senders and recipients -------------------------------------------------------------------

def test_sender_deny_forms_and_case() -> None:
    access = make_access(sender_deny=("spammer@example.com", "Junk.Example"))
    for address in ("spammer@example.com", "SPAMMER@Example.COM", "anyone@junk.example", "x@JUNK.EXAMPLE."):
        assert access.sender(address) == SENDER_DENIED, address
    for address in ("other@example.com", "spammer@sub.example.com", "x@sub.junk.example", "junk.example",
                    "x@junk.example.org", ""):
        assert access.sender(address) is None, address
    assert str(SENDER_DENIED) == "553 5.7.1 Error: sender address rejected: access denied"


def test_recipient_deny_forms_and_case() -> None:
    access = make_access(recipient_deny=("abuse-me@example.com", "closed.example"))
    for address in ("Abuse-Me@example.com", "a@Closed.Example"):
        assert access.recipient(address) == RECIPIENT_DENIED, address
    for address in ("abuse@example.com", "a@open.closed.example", "postmaster"):
        assert access.recipient(address) is None, address
    assert str(RECIPIENT_DENIED) == "550 5.7.1 Error: recipient address rejected: access denied"
    assert make_access().sender("a@b.example") is None


# --- DNSBL ------------------------------------------------------------------------------------

def test_reverse_names() -> None:
    assert reverse_name(ipaddress.ip_address("192.0.2.1")) == "1.2.0.192"
    name = reverse_name(ipaddress.ip_address("2001:db8::1"))
    assert name == "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert len(name.split(".")) == 32


def test_listed_client_is_refused(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.set(LISTED_NAME, "A", "127.0.0.2")
    before = metric("mta_dnsbl_lookups_total", zone=ZONE, result="listed")
    access = make_access(dns_server, cache, dnsbl=(ZONE,))
    assert dnsbl(access) == "554 5.7.1 Service unavailable; client [192.0.2.1] blocked using bl.test"
    assert dns_server.count(LISTED_NAME, "A") == 1
    assert metric("mta_dnsbl_lookups_total", zone=ZONE, result="listed") - before == 1


def test_clean_client_passes(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.exists(ZONE)
    before = metric("mta_dnsbl_lookups_total", zone=ZONE, result="clean")
    assert dnsbl(make_access(dns_server, cache, dnsbl=(ZONE,))) is None  # NXDOMAIN
    assert dns_server.count(LISTED_NAME, "A") == 1
    assert metric("mta_dnsbl_lookups_total", zone=ZONE, result="clean") - before == 1


def test_error_codes_and_other_answers_are_not_listings(dns_server: DnsServer, cache: LmdbCache,
                                                         log: io.StringIO) -> None:
    dns_server.set(LISTED_NAME, "A", "127.255.255.254")  # Spamhaus: query via a public resolver refused
    dns_server.set("2.2.0.192.bl.test", "A", "192.0.2.200")  # a resolver rewriting NXDOMAIN
    before = metric("mta_dnsbl_lookups_total", zone=ZONE, result="error")
    access = make_access(dns_server, cache, dnsbl=(ZONE,))
    assert dnsbl(access) is None
    assert dnsbl(access, "192.0.2.2") is None
    assert metric("mta_dnsbl_lookups_total", zone=ZONE, result="error") - before == 2
    assert "event=dnsbl_error client=192.0.2.1 zone=bl.test" in log.getvalue()
    assert "answer=127.255.255.254" in log.getvalue()


@pytest.mark.parametrize("failure", ["servfail", "drop"])
def test_servfail_and_timeout_fail_open(dns_server: DnsServer, cache: LmdbCache, failure: str,
                                        log: io.StringIO) -> None:
    getattr(dns_server, failure)(LISTED_NAME)
    before = metric("mta_dnsbl_lookups_total", zone=ZONE, result="error")
    access = make_access(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS, dnsbl=(ZONE,))
    assert dnsbl(access) is None
    assert metric("mta_dnsbl_lookups_total", zone=ZONE, result="error") - before == 1
    result = "servfail" if failure == "servfail" else "timeout"
    assert f"event=dnsbl_error client=192.0.2.1 zone=bl.test result={result}" in log.getvalue()


def test_second_lookup_is_served_from_the_shared_cache(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.set(LISTED_NAME, "A", "127.0.0.4", ttl=300)
    hits = metric("mta_dns_cache_hits_total")
    assert dnsbl(make_access(dns_server, cache, dnsbl=(ZONE,))) is not None
    assert dnsbl(make_access(dns_server, cache, dnsbl=(ZONE,))) is not None  # another worker, same cache
    assert dns_server.count(LISTED_NAME, "A") == 1
    assert metric("mta_dns_cache_hits_total") - hits == 1


def test_ipv6_clients_are_looked_up_by_nibbles(dns_server: DnsServer, cache: LmdbCache) -> None:
    name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"
    dns_server.set(name, "A", "127.0.0.2")
    reply = dnsbl(make_access(dns_server, cache, dnsbl=(ZONE,)), "2001:db8::1")
    assert reply == "554 5.7.1 Service unavailable; client [2001:db8::1] blocked using bl.test"
    assert dns_server.count(name, "A") == 1


def test_zones_are_queried_at_once_and_any_listing_refuses(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.exists("one.test")
    dns_server.set("1.2.0.192.two.test", "A", "127.0.0.10")
    dns_server.drop("1.2.0.192.one.test")  # a zone timing out does not hold up the verdict of the others
    access = make_access(dns_server, cache, timeout=SHORT_TIMEOUT_SECONDS, dnsbl=("one.test", "two.test"))
    assert dnsbl(access) == "554 5.7.1 Service unavailable; client [192.0.2.1] blocked using two.test"
    assert dns_server.count("1.2.0.192.one.test", "A") >= 1 and dns_server.count("1.2.0.192.two.test", "A") == 1


def test_allowed_clients_are_never_looked_up(dns_server: DnsServer, cache: LmdbCache) -> None:
    dns_server.set(LISTED_NAME, "A", "127.0.0.2")
    access = make_access(dns_server, cache, dnsbl=(ZONE,), client_allow=("192.0.2.0/24",))
    assert dnsbl(access) is None
    assert dnsbl(make_access(dns_server, cache)) is None  # no zones
    assert dns_server.total() == 0


def test_a_zone_that_is_no_dns_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[policy\] dnsbl"):
        make_access(dnsbl=("bad..zone",))
