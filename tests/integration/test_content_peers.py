"""rspamd and OpenDKIM as [[milter]]s of a running `mta serve`: the session's macros reach
them (OpenDKIM signs for a client in its InternalHosts, rspamd's verdict and headers come
back), and what they return is what the spool holds and the client is told."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.dns_server import DnsServer
from tests.integration.milterpeers import GTUBE, make_dkim_key, rspamd_milter, start_opendkim  # noqa: F401
from tests.mta.dkim.verifiers import dnspython_txt

pytestmark = pytest.mark.integration

MESSAGE = (b"From: Joe <joe@example.test>\r\nTo: a@local.test\r\nSubject: quarterly figures\r\n"
           b"Date: Mon, 7 Dec 2026 04:00:00 +0000\r\nMessage-ID: <q1@example.test>\r\n\r\n"
           b"The figures are attached in spirit.\r\n")


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def send(port: int, content: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        try:
            client.sendmail("joe@example.test", ["a@local.test"], content)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def test_opendkim_signs_through_mta_and_the_signature_verifies(mta_server, dns: DnsServer, tmp_path: Path) -> None:
    import dkim

    key_file = tmp_path / "opendkim.pem"
    dns.set("od._domainkey.example.test", "TXT", make_dkim_key(key_file, "rsa"))
    with start_opendkim(tmp_path, "example.test", "od", key_file) as milter:
        server = mta_server(milter=[{"address": milter}])
        assert send(server.port, MESSAGE)[0] == 250
    [message] = server.queue_list()
    stored = server.queue_body(message["id"])
    assert stored.startswith(b"DKIM-Signature: ")
    assert dkim.verify(stored, dnsfunc=dnspython_txt(dns))
    assert not dkim.verify(stored.replace(b"in spirit", b"in person"), dnsfunc=dnspython_txt(dns))


def test_rspamd_headers_and_its_reject_reach_the_client(mta_server, rspamd_milter: str) -> None:  # noqa: F811
    server = mta_server(milter=[{"address": rspamd_milter, "timeout_seconds": 60}])
    assert send(server.port, MESSAGE)[0] == 250
    [message] = server.queue_list()
    stored = server.queue_body(message["id"])
    assert b"\r\nX-Spamd-Result: " in stored and b"\r\nX-Rspamd-Server: " in stored
    code, text = send(server.port, MESSAGE.replace(b"in spirit.", GTUBE.encode()))
    assert (code, text) == (554, b"5.7.1 Gtube pattern")
    assert len(server.queue_list()) == 1
