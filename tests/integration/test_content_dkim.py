"""[[dkim]] end to end: mail relayed by a real `mta serve` to a sink arrives signed, and the
signature verifies at the destination (dkimpy with the key in the test's DNS server, and
OpenDKIM's own verifier), for SMTP mail, mail from mta-sendmail, RSA and Ed25519."""

from __future__ import annotations

import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.dkim.keys import DkimKey
from tests.integration.dns_server import DnsServer
from tests.integration.sink import SmtpSink
from tests.integration.test_sendmail import call, make_bindir
from tests.mta.dkim.test_verify import MULTIPART
from tests.mta.dkim.verifiers import dkimpy_verifies, opendkim_results, publish

pytestmark = pytest.mark.integration

PLAIN = (b"From: Joe <joe@example.test>\r\nTo: a@sink.test\r\nSubject: signed\r\n"
         b"Date: Mon, 7 Dec 2026 04:00:00 +0000\r\nMessage-ID: <p1@example.test>\r\n\r\nHello.\r\n")


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def make_key(tmp_path: Path, dns_server: DnsServer, algorithm: str, selector: str) -> tuple[DkimKey, Path]:
    path = tmp_path / f"{selector}.pem"
    path.write_bytes(DkimKey.generate(algorithm))
    key = DkimKey.load("example.test", selector, str(path))
    publish(dns_server, key)
    return key, path


def relay(mta_server, sink: SmtpSink, **sections: object):
    return mta_server(server={"inbound_workers": 1},
                      relay={"mynetworks": ["127.0.0.0/8"], "relay_domains": []},
                      delivery={"workers": 1}, routes={"sink.test": f"{sink.address}:{sink.port}"}, **sections)


def send(port: int, sender: str, content: bytes, recipients: tuple[str, ...] = ("a@sink.test",)) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, list(recipients), content)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_relayed_mail_arrives_signed_and_verifies(mta_server, dns_server, tmp_path: Path, algorithm: str) -> None:
    key, path = make_key(tmp_path, dns_server, algorithm, f"e2e-{algorithm}")
    with SmtpSink("127.0.0.2") as sink:
        server = relay(mta_server, sink, dkim=[{"domain": "example.test", "selector": key.selector,
                                                "key_file": str(path)}])
        send(server.port, "joe@example.test", PLAIN)
        send(server.port, "joerg@example.test", MULTIPART)  # folded, repeated, 8-bit parts
        send(server.port, "x@other.test", PLAIN.replace(b"joe@example.test", b"x@other.test"))
        arrived = {m.sender: m.data for m in sink.wait_for_messages(3, timeout=30)}
    for sender in ("joe@example.test", "joerg@example.test"):
        data = arrived[sender]
        assert data.startswith(b"DKIM-Signature: v=1; a=" + key.algorithm.encode())
        assert dkimpy_verifies(data, dns_server), sender
        assert opendkim_results(data, [key], tmp_path / f"opendkim-{sender}") == ["pass"]
        assert not dkimpy_verifies(data.replace(b"Hello.", b"Hullo.").replace(b"caf\xe9", b"cafe"), dns_server)
    assert b"DKIM-Signature" not in arrived["x@other.test"]  # From: another domain: not ours to sign
    assert b"content=dkim:signed" in server.log_bytes() and b"content=dkim:skipped" in server.log_bytes()


def test_mail_from_sendmail_is_signed_too(mta_server, dns_server, tmp_path: Path) -> None:
    key, path = make_key(tmp_path, dns_server, "ed25519", "local")
    bindir = make_bindir(tmp_path / "bin", sys.executable)
    with SmtpSink("127.0.0.2") as sink:
        server = relay(mta_server, sink, dkim=[{"domain": "example.test", "selector": "local",
                                                "key_file": str(path)}])
        php = b"To: a@sink.test\nSubject: Your order\nFrom: Shop <shop@example.test>\n\nThanks!\n"
        done = call(bindir, "sendmail", server, "-t", "-i", "-fbounces@example.test", stdin=php)
        assert done.returncode == 0, done.stderr
        [got] = sink.wait_for_messages(1, timeout=30)
    assert got.data.startswith(b"DKIM-Signature: ")
    assert dkimpy_verifies(got.data, dns_server)


def test_a_listener_without_signing_sends_unsigned(mta_server, dns_server, tmp_path: Path) -> None:
    key, path = make_key(tmp_path, dns_server, "rsa", "elsewhere")
    with SmtpSink("127.0.0.2") as sink:
        server = relay(mta_server, sink, dkim=[{"domain": "example.test", "selector": "elsewhere",
                                                "key_file": str(path), "listeners": ["maildrop"]}])
        send(server.port, "joe@example.test", PLAIN)
        [got] = sink.wait_for_messages(1, timeout=30)
    assert b"DKIM-Signature" not in got.data
