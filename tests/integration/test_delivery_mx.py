"""Delivery by MX lookup against a real DNS server on loopback (never the machine's resolver)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, free_port, wait_until
from tests.integration.dns_fixtures import dns_server  # noqa: F401
from tests.integration.dns_server import DnsServer
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import maildir_messages, mailbox, message, send_all

pytestmark = pytest.mark.integration


def shared_port(addresses: list[str]) -> int:
    """A port free on every one of `addresses` ([delivery] port is one number for all MX)."""
    for _ in range(50):
        port = free_port()  # never one handed to another part of this test
        try:
            for address in addresses:
                with socket.socket() as other:
                    other.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on all addresses")


def mx_relay(mta_server, tmp_path: Path, dns: DnsServer, port: int, relay_domains: list[str],  # type: ignore[no-untyped-def]
             delivery: dict | None = None, **sections: dict) -> MtaServer:
    (tmp_path / "mail" / "local.test").mkdir(parents=True, exist_ok=True)
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": ["local.test"], "relay_domains": relay_domains, "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, "port": port, "min_backoff_seconds": 1, "max_backoff_seconds": 2,
                  **(delivery or {})},
        dns={"nameservers": [dns.nameserver], "timeout_seconds": 2},
        local={"maildir_root": str(tmp_path / "mail")},
        **sections,
    )


def test_five_domains_by_mx_each_once_and_the_dns_cache_is_used(mta_server, tmp_path: Path,
                                                                 dns_server: DnsServer) -> None:
    addresses = [f"127.0.0.{i}" for i in range(2, 7)]
    port = shared_port(addresses)
    sinks = [SmtpSink(a, port).start() for a in addresses]
    try:
        domains = [f"d{i}.test" for i in range(5)]
        for i, domain in enumerate(domains):
            dns_server.mx(domain, (10, f"mx.{domain}"), ttl=2)
            dns_server.host(f"mx.{domain}", addresses[i], ttl=300)
        server = mx_relay(mta_server, tmp_path, dns_server, port, domains)
        asyncio.run(send_all(server.port, [("a@client.test", [f"u{n}@d{n % 5}.test"], message(n))
                                           for n in range(25)], sessions=5))
        for i, sink in enumerate(sinks):
            got = sink.wait_for_messages(5, timeout=20)
            assert {m.recipients[0].split("@")[1] for m in got} == {domains[i]}
            assert all(m.data.startswith(b"Received: from client.test ([127.0.0.1])") for m in got)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        assert sum(len(s.messages) for s in sinks) == 25
        first = dns_server.count("d0.test", "MX")
        assert first == 1  # 5 messages, one MX query: the rest came from the shared cache
        asyncio.run(send_all(server.port, [("a@client.test", ["again@d0.test"], message(100))]))
        sinks[0].wait_for_messages(6, timeout=10)
        assert dns_server.count("d0.test", "MX") == first  # within the TTL: no query
        time.sleep(2.5)  # the MX TTL is 2 s
        asyncio.run(send_all(server.port, [("a@client.test", ["later@d0.test"], message(101))]))
        sinks[0].wait_for_messages(7, timeout=10)
        assert dns_server.count("d0.test", "MX") == first + 1  # expired: asked again
    finally:
        for sink in sinks:
            sink.close()


def test_null_mx_and_nxdomain_bounce_without_connecting(mta_server, tmp_path: Path,
                                                        dns_server: DnsServer) -> None:
    port = shared_port(["127.0.0.2"])
    with SmtpSink("127.0.0.2", port) as sink:
        dns_server.null_mx("nomail.test")
        dns_server.host("nomail.test", "127.0.0.2")  # an A record that must NOT be used
        dns_server.nxdomain("gone.test")
        server = mx_relay(mta_server, tmp_path, dns_server, port, ["nomail.test", "gone.test"])
        box = mailbox(tmp_path, "local.test", "sender")
        asyncio.run(send_all(server.port, [("sender@local.test", ["u@nomail.test"], message(1)),
                                           ("sender@local.test", ["u@gone.test"], message(2))]))
        reports = wait_until(lambda: len(maildir_messages(box)) == 2 and maildir_messages(box), 20,
                             "two bounces in the sender's Maildir", server)
        text = b"\n".join(reports).decode("utf-8", "replace")
        assert "u@nomail.test" in text and "5.1.10" in text
        assert "u@gone.test" in text and "5.1.2" in text
        assert sink.connections == 0  # nothing ever connected
        assert dns_server.count("nomail.test", "A") == 0
        log = server.log_bytes()
        assert len(re.findall(rb"event=bounced msgid=\S+ rcpt=u@(nomail|gone).test", log)) == 2


def test_mx_failover_to_the_next_preference(mta_server, tmp_path: Path, dns_server: DnsServer) -> None:
    port = shared_port(["127.0.0.2", "127.0.0.3"])
    with SmtpSink("127.0.0.2", port, greeting_code=421) as busy, SmtpSink("127.0.0.3", port) as backup:
        dns_server.mx("fail.test", (10, "mx1.fail.test"), (20, "mx2.fail.test"))
        dns_server.host("mx1.fail.test", "127.0.0.2")
        dns_server.host("mx2.fail.test", "127.0.0.3")
        server = mx_relay(mta_server, tmp_path, dns_server, port, ["fail.test"])
        asyncio.run(send_all(server.port, [("a@client.test", ["u@fail.test"], message(1))]))
        [got] = backup.wait_for_messages(1, timeout=20)
        assert got.recipients == ["u@fail.test"]
        assert busy.connections >= 1 and busy.messages == []
