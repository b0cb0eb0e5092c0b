"""DNS through the shared cache, for both roles: MX then A/AAAA for delivery, A for DNSBL.

Shared by the delivery workers (`resolve`) and the inbound workers (`lookup_addresses`
for DNSBL zones), so both read and fill one cache and count in one set of metrics.

`MxResolver.resolve(domain)` returns the addresses to try, in order; walking them
(failover) is the caller's job. Rules (RFC 5321 section 5.1, RFC 7505):
  - MX records by preference, equal preferences shuffled on every call; each MX host
    gives its IPv4 addresses, then its IPv6 ones; an address already listed is skipped.
  - Implicit MX: only when the domain has no MX records (NOERROR/NODATA) do the domain's
    own A/AAAA records serve, with preference 0.
  - Null MX (a single "0 ." record) and NXDOMAIN are permanent: bounce, never connect.
  - An MX host without an address is skipped; none left, or SERVFAIL/timeout on the MX
    query, is temporary.
  - Domain literals ("[192.0.2.1]", "[IPv6:2001:db8::1]") need no DNS.

Cache: every answer (MX, A, AAAA) is kept in the LmdbCache under namespace "dns", key
"name/TYPE", for its TTL (the least along a CNAME chain); NXDOMAIN and NODATA for the
negative TTL of the SOA in the authority section (min(SOA TTL, SOA minimum); 300 s
without one). SERVFAIL and timeouts are never cached. Concurrent lookups of one
name/type in a process share one query.

`timeout_seconds` bounds each DNS query (retries included); resolve() makes at most two
rounds of queries (MX, then all addresses at once), so it returns within about twice that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from prometheus_client import Counter

from mta.config import split_hostport
from mtaqueue.cache_lmdb import LmdbCache

CACHE_NAMESPACE: Final = "dns"
DEFAULT_NEGATIVE_TTL_SECONDS: Final = 300  # no SOA in a negative answer
MAX_TTL_SECONDS: Final = 86_400  # a cache entry lives at most this long, whatever the zone says
MAX_NEGATIVE_TTL_SECONDS: Final = 10_800  # RFC 2308 section 5: 1-3 hours
ATTEMPT_SECONDS: Final = 2.0  # one try at one nameserver; retries fill the rest of timeout_seconds
EDNS_PAYLOAD_BYTES: Final = 1232  # DNS flag day 2020: no IP fragmentation

STATUS_NULL_MX: Final = "5.1.10"
STATUS_NXDOMAIN: Final = "5.1.2"
STATUS_TEMPORARY: Final = "4.4.3"

DNS_CACHE_HITS = Counter(
    "mta_dns_cache_hits_total",
    "DNS lookups (one name and record type) answered from the shared LMDB cache, without a query. "
    "A low hit ratio with many deliveries points at short TTLs or a cache too small ([cache] max_entries).")
DNS_CACHE_MISSES = Counter(
    "mta_dns_cache_misses_total",
    "DNS lookups (one name and record type) not in the shared cache, or expired there: each sends a "
    "query (or joins one already in flight in the same worker).")
DNS_QUERIES = Counter(
    "mta_dns_queries_total",
    "DNS queries sent by the delivery workers (MX, A, AAAA) and the inbound workers (DNSBL), by outcome. result: ok (records returned), nxdomain (the "
    "name does not exist), nodata (the name exists without records of the type), servfail (every "
    "nameserver failed or refused; not cached), timeout (no answer within [dns] timeout_seconds; not "
    "cached). Rising servfail or timeout means the resolvers in [dns] nameservers are in trouble.",
    ["result"])
for _result in ("ok", "nxdomain", "nodata", "servfail", "timeout"):
    DNS_QUERIES.labels(result=_result)  # export every series from the start, at 0


@dataclass(frozen=True)
class Target:
    host: str  # the MX host (or the domain, for an implicit MX or a literal)
    address: str  # one IP address to try
    preference: int


@dataclass(frozen=True)
class Resolution:
    targets: tuple[Target, ...]  # in the order to try
    error: str | None = None  # resolution failed: the reason, for the reply text
    permanent: bool = False  # True: bounce without connecting; False: defer
    status: str | None = None  # enhanced status code for the error: 5.1.10, 5.1.2 or 4.4.3


@dataclass(frozen=True)
class _Answer:
    result: str  # ok | nxdomain | nodata | servfail | timeout
    records: tuple[Any, ...] = ()  # MX: (preference, host) pairs, host "." for the root; A/AAAA: addresses


class MxResolver:
    def __init__(self, nameservers: list[str] | None, cache: LmdbCache | None, timeout_seconds: float = 10.0,
                 rng: random.Random | None = None, *, clock: Callable[[], float] = time.time) -> None:
        """nameservers like ["127.0.0.1:5353"]; None or empty: those of /etc/resolv.conf."""
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*split_hostport(ns)) for ns in nameservers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                # No usable /etc/resolv.conf: do what the C library does, ask the local host.
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1", "::1"]
        resolver.cache = None  # ours is shared between processes; dnspython's is not
        resolver.lifetime = timeout_seconds
        resolver.timeout = min(ATTEMPT_SECONDS, timeout_seconds)
        resolver.retry_servfail = False
        resolver.use_edns(0, 0, EDNS_PAYLOAD_BYTES)
        self._resolver = resolver
        self._cache = cache
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._inflight: dict[str, asyncio.Task[_Answer]] = {}

    async def resolve(self, domain: str) -> Resolution:
        domain = domain.strip().lower()
        if domain.startswith("["):
            return _resolve_literal(domain)
        try:
            name = dns.name.from_text(domain)
        except (dns.exception.DNSException, UnicodeError):
            name = dns.name.root
        if name == dns.name.root:
            return _permanent(f"{domain!r} is not a valid domain name", STATUS_NXDOMAIN)
        domain = domain.rstrip(".")

        mx = await self._lookup(name, dns.rdatatype.MX)
        if mx.result == "nxdomain":
            return _permanent(f"{domain}: domain not found (NXDOMAIN)", STATUS_NXDOMAIN)
        if mx.result in ("servfail", "timeout"):
            return _temporary(f"{domain}: MX lookup failed ({mx.result})")
        if mx.result == "nodata":
            return await self._resolve_implicit(domain, name)
        if len(mx.records) == 1 and mx.records[0] == (0, "."):
            return _permanent(f"{domain} does not accept mail (null MX)", STATUS_NULL_MX)

        hosts = self._order([(pref, host) for pref, host in mx.records if host != "."])
        answers = await asyncio.gather(*(self._addresses(host) for _, host in hosts))
        targets = _targets((host, pref, addresses) for (pref, host), (addresses, _) in zip(hosts, answers))
        if not targets:
            failures = ", ".join(f"{host} ({why})" for (_, host), (_, why) in zip(hosts, answers)) or "none"
            return _temporary(f"{domain}: no MX host has a usable address: {failures}")
        return Resolution(targets)

    async def _resolve_implicit(self, domain: str, name: dns.name.Name) -> Resolution:
        v4, v6 = await asyncio.gather(self._lookup(name, dns.rdatatype.A), self._lookup(name, dns.rdatatype.AAAA))
        if v4.result == v6.result == "nxdomain":  # gone since the MX answer
            return _permanent(f"{domain}: domain not found (NXDOMAIN)", STATUS_NXDOMAIN)
        targets = _targets([(domain, 0, v4.records + v6.records)])
        if not targets:
            return _temporary(f"{domain}: no MX records and no usable address (A {v4.result}, AAAA {v6.result})")
        return Resolution(targets)

    def _order(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference, equal preferences shuffled; a host listed twice keeps its best preference."""
        seen: set[str] = set()
        out: list[tuple[int, str]] = []
        for _, group in itertools.groupby(sorted(records), key=lambda r: r[0]):
            tier: list[tuple[int, str]] = []
            for record in group:
                if record[1] not in seen:
                    seen.add(record[1])
                    tier.append(record)
            self._rng.shuffle(tier)
            out.extend(tier)
        return out

    async def _addresses(self, host: str) -> tuple[tuple[str, ...], str]:
        """(IPv4 then IPv6 addresses, why none when empty)."""
        try:
            name = dns.name.from_text(host)
        except (dns.exception.DNSException, UnicodeError):
            return (), "invalid name"
        v4, v6 = await asyncio.gather(self._lookup(name, dns.rdatatype.A), self._lookup(name, dns.rdatatype.AAAA))
        return v4.records + v6.records, f"A {v4.result}, AAAA {v6.result}"

    async def lookup_addresses(self, name: str) -> tuple[str, tuple[str, ...]]:
        """The A records of `name` through the shared cache (DNSBL queries): (result, addresses).

        result is that of mta_dns_queries_total (ok, nxdomain, nodata, servfail, timeout);
        addresses is empty unless ok. Raises dns.exception.DNSException for an invalid name.
        """
        answer = await self._lookup(dns.name.from_text(name), dns.rdatatype.A)
        return answer.result, answer.records

    # --- one DNS lookup, through the cache ------------------------------------------------

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Answer:
        key = f"{name.to_text(omit_final_dot=True).lower()}/{dns.rdatatype.to_text(rdtype)}"
        if self._cache is not None:
            cached = _decode(self._cache.get(CACHE_NAMESPACE, key, self._clock()))
            if cached is not None:
                DNS_CACHE_HITS.inc()
                return cached
        DNS_CACHE_MISSES.inc()
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name, rdtype, key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._inflight.pop(key) if self._inflight.get(key) is t else None)
        # One caller giving up (cancelled) must not cancel the query the others wait for.
        return await asyncio.shield(task)

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, key: str) -> _Answer:
        try:
            answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            return self._store(key, _Answer("nxdomain"), _negative_ttl(responses.get(name)))
        except dns.exception.Timeout:
            DNS_QUERIES.labels(result="timeout").inc()
            return _Answer("timeout")
        except (dns.resolver.NoNameservers, dns.resolver.YXDOMAIN):
            DNS_QUERIES.labels(result="servfail").inc()
            return _Answer("servfail")
        if answer.rrset is None:
            return self._store(key, _Answer("nodata"), _negative_ttl(answer.response))
        records: tuple[Any, ...]
        if rdtype == dns.rdatatype.MX:
            records = tuple((int(r.preference), _host(r.exchange)) for r in answer.rrset)
        else:
            records = tuple(str(r.address) for r in answer.rrset)
        ttl = min(int(answer.chaining_result.minimum_ttl), MAX_TTL_SECONDS)
        return self._store(key, _Answer("ok", records), ttl)

    def _store(self, key: str, answer: _Answer, ttl_seconds: int) -> _Answer:
        DNS_QUERIES.labels(result=answer.result).inc()
        if self._cache is not None and ttl_seconds > 0:
            value = {"r": answer.result, "d": [list(r) if isinstance(r, tuple) else r for r in answer.records]}
            self._cache.put(CACHE_NAMESPACE, key, value, ttl_seconds, self._clock())
        return answer


def _decode(value: Any) -> _Answer | None:
    """A cached value back into an _Answer; None for anything not written by _store."""
    if not isinstance(value, dict) or value.get("r") not in ("ok", "nxdomain", "nodata"):
        return None
    records = value.get("d")
    if not isinstance(records, list):
        return None
    return _Answer(value["r"], tuple(tuple(r) if isinstance(r, list) else r for r in records))


def _negative_ttl(response: dns.message.Message | None) -> int:
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                return min(int(rrset.ttl), int(rrset[0].minimum), MAX_NEGATIVE_TTL_SECONDS)
    return DEFAULT_NEGATIVE_TTL_SECONDS


def _host(name: dns.name.Name) -> str:
    return "." if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _targets(hosts: Any) -> tuple[Target, ...]:
    """Targets from (host, preference, addresses) in order (addresses: IPv4 first); no address twice."""
    seen: set[str] = set()
    out: list[Target] = []
    for host, pref, addresses in hosts:
        for address in addresses:
            if address not in seen:
                seen.add(address)
                out.append(Target(host, address, pref))
    return tuple(out)


def _resolve_literal(domain: str) -> Resolution:
    inner = domain.removeprefix("[").removesuffix("]")
    if not domain.endswith("]"):
        return _permanent(f"{domain!r} is not a valid address literal", STATUS_NXDOMAIN)
    try:
        if inner.startswith("ipv6:"):
            address = str(ipaddress.IPv6Address(inner[len("ipv6:"):]))
        else:
            address = str(ipaddress.IPv4Address(inner))
    except ValueError:
        return _permanent(f"{domain!r} is not a valid address literal", STATUS_NXDOMAIN)
    return Resolution((Target(address, address, 0),))


def _permanent(error: str, status: str) -> Resolution:
    return Resolution((), error, permanent=True, status=status)


def _temporary(error: str) -> Resolution:
    return Resolution((), error, permanent=False, status=STATUS_TEMPORARY)
