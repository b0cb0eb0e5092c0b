"""Inbound access lists and DNSBL checks ([policy]): from a client, sender or recipient to a Reply.

  client_allow    CIDRs: never refused by client_deny or a DNSBL (never looked up); grants no relay
  client_deny     CIDRs: 554 5.7.1 at connect
  sender_deny     "user@example.com" or "example.com": 553 5.7.1 at MAIL (never the null sender)
  recipient_deny  the same forms: 550 5.7.1 at RCPT
  dnsbl           zones: a listed client gets 554 5.7.1 (at MAIL)

Address entries match case-insensitively, the local part too (as Postfix access maps
do: a deny list must not be dodged by "SPAMMER@example.com"). A domain entry matches that
domain only, not its subdomains.

DNSBL: the A record of the reversed client address under each zone (IPv4 "4.3.2.1.zone",
IPv6 32 reversed nibbles), all zones at once, through the shared DNS cache of
MxResolver. Listed = an address in 127.0.0.0/8 outside 127.255.255.0/24 (Spamhaus's
codes for a refused or bad query: logged, not listed). A timeout or SERVFAIL is logged
and not listed: the check fails open. An IPv4-mapped IPv6 client is its IPv4 address.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Final

import dns.exception
import dns.name
from prometheus_client import Counter

from mta import logs
from mta.config import Config, ConfigError, Network
from mta.smtp.replies import Reply
from mta.resolver import MxResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CLIENT_DENIED = Reply(554, "5.7.1", "Error: access denied for your address")
SENDER_DENIED = Reply(553, "5.7.1", "Error: sender address rejected: access denied")
RECIPIENT_DENIED = Reply(550, "5.7.1", "Error: recipient address rejected: access denied")

LISTED_NETWORK: Final = ipaddress.ip_network("127.0.0.0/8")
ERROR_NETWORK: Final = ipaddress.ip_network("127.255.255.0/24")  # Spamhaus: query refused or malformed

DNSBL_LOOKUPS = Counter(
    "mta_dnsbl_lookups_total",
    "DNSBL lookups of inbound clients, by zone ([policy] dnsbl) and result. result: listed (refused "
    "with 554 5.7.1), clean (not listed), error (timeout, SERVFAIL, or an answer that is not a listing, "
    "such as Spamhaus's 127.255.255.x for refused queries: the client passes). Rising errors mean the "
    "zone or the resolvers in [dns] nameservers are in trouble, or the zone refuses our queries. "
    "Clients in [policy] client_allow are never looked up.",
    ["zone", "result"])


def dnsbl_blocked(ip: str, zone: str) -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {zone}")


class Access:
    def __init__(self, config: Config, resolver: MxResolver | None) -> None:
        """resolver: for DNSBL lookups (None: no DNSBL checks)."""
        policy = config.policy
        self._allow = policy.client_allow
        self._deny = policy.client_deny
        self._sender_deny = _AddressList(policy.sender_deny)
        self._recipient_deny = _AddressList(policy.recipient_deny)
        self._resolver = resolver
        self._zones = tuple(zone.lower().rstrip(".") for zone in policy.dnsbl)
        for zone in self._zones:
            try:
                dns.name.from_text(zone)
            except dns.exception.DNSException as exc:
                raise ConfigError(f"[policy] dnsbl: {zone!r} is not a DNS zone ({exc})") from None
            for result in ("listed", "clean", "error"):
                DNSBL_LOOKUPS.labels(zone=zone, result=result)  # export every series from the start

    def allowed(self, ip: str) -> bool:
        """Whether `ip` is in [policy] client_allow."""
        address = _address(ip)
        return address is not None and _within(address, self._allow)

    def client(self, ip: str) -> Reply | None:
        """At connect: None, or 554 5.7.1 for a client in client_deny (and not in client_allow)."""
        if not self._deny:
            return None  # the usual case: no deny list, nothing to parse per connection
        address = _address(ip)
        if address is None or _within(address, self._allow) or not _within(address, self._deny):
            return None
        return CLIENT_DENIED

    def sender(self, address: str) -> Reply | None:
        """At MAIL: None, or 553 5.7.1 for a sender in sender_deny. The null sender "" passes."""
        return SENDER_DENIED if address and self._sender_deny.matches(address) else None

    def recipient(self, address: str) -> Reply | None:
        """At RCPT: None, or 550 5.7.1 for a recipient in recipient_deny."""
        return RECIPIENT_DENIED if self._recipient_deny.matches(address) else None

    async def dnsbl(self, ip: str) -> Reply | None:
        """None, or 554 5.7.1 naming the first zone (in config order) that lists `ip`."""
        address = _address(ip)
        if self._resolver is None or not self._zones or address is None or _within(address, self._allow):
            return None
        reversed_name = reverse_name(address)
        listed = await asyncio.gather(*(self._listed(ip, reversed_name, zone) for zone in self._zones))
        for zone, is_listed in zip(self._zones, listed):
            if is_listed:
                return dnsbl_blocked(str(address), zone)
        return None

    async def _listed(self, ip: str, reversed_name: str, zone: str) -> bool:
        assert self._resolver is not None
        result, records = await self._resolver.lookup_addresses(f"{reversed_name}.{zone}")
        if result in ("nxdomain", "nodata"):
            DNSBL_LOOKUPS.labels(zone=zone, result="clean").inc()
            return False
        if result != "ok":
            DNSBL_LOOKUPS.labels(zone=zone, result="error").inc()
            logs.event("dnsbl_error", client=ip, zone=zone, result=result)
            return False
        codes = [ipaddress.ip_address(r) for r in records]
        if any(c in LISTED_NETWORK and c not in ERROR_NETWORK for c in codes):
            DNSBL_LOOKUPS.labels(zone=zone, result="listed").inc()
            return True
        # 127.255.255.x: the zone refuses our queries (e.g. through a public resolver);
        # anything else outside 127/8 is no listing either (a resolver that rewrites NXDOMAIN).
        DNSBL_LOOKUPS.labels(zone=zone, result="error").inc()
        logs.event("dnsbl_error", client=ip, zone=zone, result="unexpected answer",
                   answer=",".join(str(c) for c in codes))
        return False


def reverse_name(address: IPAddress) -> str:
    """The DNSBL label of an address: "4.3.2.1" for 1.2.3.4; 32 nibbles in reverse for IPv6."""
    return address.reverse_pointer.rsplit(".", 2)[0]  # without "in-addr.arpa" / "ip6.arpa"


class _AddressList:
    """Deny entries: whole addresses ("user@example.com") and domains ("example.com")."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        normal = [e.strip().lower().rstrip(".") for e in entries]
        self.addresses = frozenset(e for e in normal if "@" in e)
        self.domains = frozenset(e for e in normal if "@" not in e)

    def matches(self, address: str) -> bool:
        normal = address.strip().lower().rstrip(".")
        domain = normal.rpartition("@")[2] if "@" in normal else ""
        return normal in self.addresses or (domain != "" and domain in self.domains)


def _address(ip: str) -> IPAddress | None:
    """The client address; None when not an IP address (then no list matches it)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)
