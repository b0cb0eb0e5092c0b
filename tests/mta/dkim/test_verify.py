"""Signatures from sign() verified by two independent verifiers, RSA and Ed25519: dkimpy
with the key published in the test's DNS server on loopback, and OpenDKIM's own code
(`opendkim -t`). A changed body, a changed signed header and an added From fail."""

from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from mta.dkim.keys import DkimKey
from mta.dkim.signer import sign
from tests.integration.dns_server import DnsServer
from tests.mta.dkim.verifiers import dkimpy_verifies, dnspython_txt, opendkim_results, publish

pytestmark = pytest.mark.integration

NOW = 1_765_000_000
PLAIN = (b"From: Joe <joe@example.test>\r\nTo: Suzie <suzie@shopping.test>\r\n"
         b"Subject: Is dinner ready?\r\nDate: Mon, 7 Dec 2026 04:00:00 +0000\r\n"
         b"Message-ID: <1@example.test>\r\n\r\nHi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n")
MULTIPART = (
    b"Received: from relay2.test by mx.example.test; Mon, 7 Dec 2026 04:00:02 +0000\r\n"
    b"Received: from client.test\r\n\tby relay2.test;\r\n\tMon, 7 Dec 2026 04:00:01 +0000\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.test>\r\n"
    b"To: a@shopping.test,\r\n  b@shopping.test\r\n"
    b"Cc: c@shopping.test\r\nCc: d@shopping.test\r\n"
    b"Subject: a subject folded\r\n\tover   three\r\n lines  \r\n"
    b"Date: Mon, 7 Dec 2026 04:00:00 +0000\r\nMessage-ID: <2@example.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n\tboundary=\"=-b1\"\r\n"
    b"X-Mailer: not signed\r\n"
    b"\r\n"
    b"preamble\r\n--=-b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \t \r\nline with trailing space   \r\n\r\n"
    b"--=-b1\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"caf\xe9 cr\xe8me\r\n"
    b"--=-b1\r\nContent-Type: application/octet-stream; name=\"a.bin\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n"
    b"--=-b1--\r\n\r\n\r\n  \r\n\r\n"
)
EMPTY_BODY = b"From: joe@example.test\r\nSubject: nothing\r\n\r\n"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def key(request: pytest.FixtureRequest, dns_server: DnsServer) -> DkimKey:
    key = DkimKey.from_pem("example.test", f"sel-{request.param}", DkimKey.generate(request.param))
    publish(dns_server, key)
    return key


def _signed(content: bytes, key: DkimKey) -> bytes:
    return sign(content, key, now=NOW) + content


@pytest.mark.parametrize("content", [PLAIN, MULTIPART, EMPTY_BODY], ids=["plain", "multipart-8bit", "empty-body"])
def test_both_verifiers_pass(content: bytes, key: DkimKey, dns_server: DnsServer, tmp_path: Path) -> None:
    signed = _signed(content, key)
    assert dkimpy_verifies(signed, dns_server)
    assert opendkim_results(signed, [key], tmp_path) == ["pass"]
    assert dns_server.count(key.record_name, "TXT") >= 1  # the key really came from DNS


def test_the_header(key: DkimKey) -> None:
    header = sign(MULTIPART, key, now=NOW)
    assert header.startswith(b"DKIM-Signature: v=1; a=" + key.algorithm.encode() + b"; c=relaxed/relaxed; ")
    assert header.endswith(b"\r\n") and b"\n" not in header.replace(b"\r\n", b"")
    lines = header.removesuffix(b"\r\n").split(b"\r\n")
    assert all(len(line) < 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    unfolded = header.replace(b"\r\n ", b"")  # folds sit between tags, after h='s colons, inside base64
    for tag in (b"d=example.test;", b"s=" + key.selector.encode() + b";", b"t=1765000000;",
                b"h=from:from:subject:date:to:cc:cc:message-id:content-type:mime-version;"):
        assert tag in unfolded


def test_long_names_fold_and_verify(dns_server: DnsServer, tmp_path: Path) -> None:
    domain = "a-rather-long-subdomain-of-the-signing-domain.example.test"
    key = DkimKey.from_pem(domain, "selector-" + "x" * 50, DkimKey.generate("ed25519"))
    publish(dns_server, key)
    content = PLAIN.replace(b"joe@example.test", b"joe@" + domain.encode())
    header = sign(content, key, headers=("From", "Subject", "X-" + "y" * 60))
    assert all(len(line) < 78 for line in header.split(b"\r\n"))
    assert dkimpy_verifies(header + content, dns_server)
    assert opendkim_results(header + content, [key], tmp_path) == ["pass"]


def test_operator_headers(key: DkimKey, dns_server: DnsServer, tmp_path: Path) -> None:
    """A list of the operator's own: those signed (From added and oversigned), the rest free to change."""
    signed = sign(MULTIPART, key, headers=("Subject", "X-Mailer"), now=NOW) + MULTIPART
    assert b"h=from:from:subject:x-mailer;" in signed.replace(b"\r\n ", b"")
    assert dkimpy_verifies(signed.replace(b"To: a@", b"To: z@"), dns_server)
    assert not dkimpy_verifies(signed.replace(b"X-Mailer: not", b"X-Mailer: now"), dns_server)
    with pytest.raises(ValueError, match="'X;bh=x' is not a header field name"):
        sign(MULTIPART, key, headers=("Subject", "X;bh=x"))


@pytest.mark.parametrize(("change", "what"), [
    ((b"game.", b"game!"), "body"),
    ((b"Is dinner ready?", b"Is dinner burnt?"), "signed header"),
    ((b"Subject: Is", b"From: Mallory <m@example.test>\r\nSubject: Is"), "a second From"),
])
def test_tampering_fails_both_verifiers(change: tuple[bytes, bytes], what: str, key: DkimKey,
                                        dns_server: DnsServer, tmp_path: Path) -> None:
    tampered = _signed(PLAIN, key).replace(*change)
    assert not dkimpy_verifies(tampered, dns_server), what
    assert opendkim_results(tampered, [key], tmp_path) == ["fail"], what


def test_rsa_and_ed25519_signatures_on_one_message(dns_server: DnsServer, tmp_path: Path) -> None:
    """RFC 8463's advice: both; each verifies, neither covers the other's header."""
    keys = [DkimKey.from_pem("example.test", f"dual-{alg}", DkimKey.generate(alg)) for alg in ("rsa", "ed25519")]
    for key in keys:
        publish(dns_server, key)
    signed = MULTIPART
    for key in keys:
        signed = sign(signed, key, now=NOW) + signed
    txt = dnspython_txt(dns_server)
    assert all(dkim.DKIM(signed).verify(idx=i, dnsfunc=txt) for i in (0, 1))
    assert opendkim_results(signed, keys, tmp_path) == ["pass", "pass"]


def test_what_relaxed_tolerates(key: DkimKey, dns_server: DnsServer, tmp_path: Path) -> None:
    """What relays do on the way: refold a header, add trace headers, pad whitespace, add blank lines."""
    changed = (_signed(PLAIN, key).replace(b"Subject: Is dinner", b"Subject:  Is\r\n\tdinner")
               .replace(b"hungry yet?", b"hungry  \tyet?   ") + b"\r\n\r\n")
    changed = b"Received: from mx.example.test by mx.shopping.test\r\nX-Spam: 0\r\n" + changed
    assert dkimpy_verifies(changed, dns_server)
    assert opendkim_results(changed, [key], tmp_path) == ["pass"]
