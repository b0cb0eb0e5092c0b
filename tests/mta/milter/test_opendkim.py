"""The milter client against OpenDKIM (Debian's opendkim 2.11) as a signing milter, on loopback.

OpenDKIM signs mail it considers originating: from a client in its InternalHosts, or
from a session that authenticated (it reads the {auth_type} macro, as Postfix sends it;
{auth_authen} alone does not count). Its signature must verify with dkimpy's verifier
against the public key the test's DNS server publishes, and fail once the message is
tampered with.
"""

import asyncio
import logging

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from mta.milter.changes import Message, apply_modifications
from mta.milter.client import Envelope, MilterAddress, MilterResult, run_milter
from mta.milter.codes import Action, Proto
from mta.milter.protocol import InsertHeader
from tests.integration.dns_server import DnsServer
from tests.integration.milterpeers import make_dkim_key, rspamd_milter, start_opendkim  # noqa: F401

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)
DOMAIN, SELECTOR = "example.test", "mail2026"
OFFICE = ("127.0.0.1", "::1", "198.51.100.0/24")  # OpenDKIM's InternalHosts: mail from these is signed
MACROS = {"j": "mx.test", "_": "client.test [192.0.2.7]", "{client_addr}": "192.0.2.7"}
AUTHENTICATED = Envelope("client.test", "192.0.2.7", 40123, "helo.client.test",
                         MACROS | {"{auth_type}": "PLAIN", "{auth_authen}": "alice"}, queue_id="4F2A9C01B7")
CONTENT = (
    "From: Alice <alice@example.test>\r\nTo: Bob <bob@r.test>\r\nSubject: quarterly figures\r\n"
    "Date: Mon, 07 Dec 2026 04:00:00 +0000\r\nMessage-ID: <q4@example.test>\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    "\r\nThe figures are attached.  Grüße,\r\n  Alice\r\n\r\n"
).encode()


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def signer(request, tmp_path_factory):
    """OpenDKIM signing for DOMAIN with a fresh key published in its DNS server: (address, server).

    One per key type for the module: OpenDKIM (libmilter) takes about 5 s to stop."""
    tmp_path = tmp_path_factory.mktemp(f"opendkim-{request.param}")
    key_file = tmp_path / f"{request.param}.key"
    with DnsServer() as server:
        server.set(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT", make_dkim_key(key_file, request.param))
        with start_opendkim(tmp_path, DOMAIN, SELECTOR, key_file, OFFICE) as address:
            yield address, server


def sign(address: str, envelope: Envelope = AUTHENTICATED) -> tuple[Message, MilterResult]:
    message = Message.parse(CONTENT, "alice@example.test", ("bob@r.test",), ("BODY=8BITMIME",))
    return message, asyncio.run(run_milter(MilterAddress.parse(address), envelope, message, 30))


def verifies(content: bytes, server: DnsServer) -> bool:
    """dkimpy's verdict, its keys looked up in the test's DNS server."""
    host, port = server.nameserver.split(":")

    def txt(name: bytes, timeout: int = 5) -> bytes:
        query = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        answer = dns.query.udp(query, host, timeout=timeout, port=int(port))
        return b"".join(s for rrset in answer.answer for rdata in rrset for s in rdata.strings)

    return dkim.verify(content, dnsfunc=txt)


def test_opendkim_signs_an_authenticated_message_and_it_verifies(signer):
    address, dns_server = signer
    message, result = sign(address)
    assert result.verdict == "accept"
    [signature] = [m for m in result.modifications if m.name == "DKIM-Signature"]
    assert isinstance(signature, InsertHeader) and signature.index == 0  # on top, before every header
    assert f"d={DOMAIN};" in signature.value and f"s={SELECTOR};" in signature.value
    assert "c=relaxed/relaxed;" in signature.value
    signed = apply_modifications(message, result.modifications).content()
    assert signed.startswith(b"DKIM-Signature: ")
    dns_server.reset_counts()
    assert verifies(signed, dns_server)
    assert dns_server.count(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT") == 1  # the key came from the test's DNS


def test_a_tampered_signed_message_fails_verification(signer):
    address, dns_server = signer
    message, result = sign(address)
    signed = apply_modifications(message, result.modifications).content()
    assert verifies(signed, dns_server)
    assert not verifies(signed.replace(b"figures are attached", b"figures are wrong"), dns_server)
    assert not verifies(signed.replace(b"Subject: quarterly", b"Subject: yearly"), dns_server)


def test_opendkim_negotiates_skipped_steps(signer):
    address, dns_server = signer
    message, result = sign(address)
    log.info("opendkim negotiated actions %r, protocol %r", result.negotiated.actions, result.negotiated.protocol)
    # OpenDKIM wants no HELO, DATA or unknown-command steps: the client leaves them out
    assert Proto.NOHELO | Proto.NODATA | Proto.NOUNKNOWN in result.negotiated.protocol
    assert Proto.HDR_LEADSPC in result.negotiated.protocol  # header values as sent, leading space kept
    assert Action.ADDHDRS in result.negotiated.actions
    assert verifies(apply_modifications(message, result.modifications).content(), dns_server)


def test_mail_from_an_internal_host_is_signed_without_authentication(signer):
    address, dns_server = signer
    internal = Envelope("localhost", "127.0.0.1", 40123, "helo.client.test", MACROS, queue_id="4F2A9C01B7")
    message, result = sign(address, internal)
    assert [m.name for m in result.modifications] == ["DKIM-Signature"]
    assert verifies(apply_modifications(message, result.modifications).content(), dns_server)


@pytest.mark.parametrize("macros", [MACROS, MACROS | {"{auth_authen}": "alice"}], ids=["anonymous", "authen-only"])
def test_mail_from_an_outside_client_is_not_signed(signer, macros):
    outside = Envelope("client.test", "192.0.2.7", 40123, "helo.client.test", macros, queue_id="4F2A9C01B7")
    _, result = sign(signer[0], outside)
    assert (result.verdict, result.modifications) == ("accept", ())


def test_mail_of_another_domain_is_not_signed(signer):
    other = Message.parse(CONTENT.replace(b"alice@example.test>", b"alice@elsewhere.test>"),
                          "alice@elsewhere.test", ("bob@r.test",), ())
    result = asyncio.run(run_milter(MilterAddress.parse(signer[0]), AUTHENTICATED, other, 30))
    assert (result.verdict, result.modifications) == ("accept", ())


def test_rspamd_then_opendkim_the_signature_covers_rspamds_headers(signer, rspamd_milter):
    """Both milters in order, as an operator runs them for mail relayed from the office network."""
    address, dns_server = signer
    office = Envelope("pc7.office.test", "198.51.100.7", 40123, "pc7.office.test",
                      MACROS | {"{client_addr}": "198.51.100.7"}, queue_id="4F2A9C01B7")
    message = Message.parse(CONTENT, "alice@example.test", ("bob@r.test",), ("BODY=8BITMIME",))
    scanned = asyncio.run(run_milter(MilterAddress.parse(rspamd_milter), office, message, 30))
    checked = apply_modifications(message, scanned.modifications)
    assert "X-Spamd-Result" in dict(checked.headers)
    signing = asyncio.run(run_milter(MilterAddress.parse(address), office, checked, 30))
    signed = apply_modifications(checked, signing.modifications).content()
    assert signed.startswith(b"DKIM-Signature: ")
    assert b"\r\nX-Spamd-Result: default: False" in signed and verifies(signed, dns_server)
