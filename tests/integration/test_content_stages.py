"""The content stages end to end, through a real `mta serve` and smtplib: attachment types
refused at end of data, TNEF converted, clamd (Debian's, with the test's own signatures)
rejecting or quarantining a virus and its failure policy, footers, and the whole pipeline
in order with its log line and metrics; a footer added before DKIM signing still verifies."""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.dkim.keys import DkimKey
from tests.integration.conftest import free_port, split_received
from tests.integration.dns_server import DnsServer
from tests.integration.libmilter import libmilter_peers
from tests.integration.test_metrics import get, sample
from tests.mta.content.clamdpeer import CUSTOM_MARKER, CUSTOM_SIGNATURE, EICAR, Clamd, running_clamd
from tests.mta.content.tnefwriter import tnef_stream
from tests.mta.dkim.verifiers import dkimpy_verifies, opendkim_results, publish

pytestmark = pytest.mark.integration

TEXT = b"From: joe@example.test\r\nTo: a@local.test\r\nSubject: plain\r\n\r\nHello there.\r\n"


def with_attachment(name_params: str, payload: bytes = b"MZ\x90\x00", ctype: str = "application/octet-stream",
                    sender: str = "joe@example.test") -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (f"From: {sender}\r\nTo: a@local.test\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee attached.\r\n"
            f"--b1\r\nContent-Type: {ctype}\r\nContent-Disposition: attachment; {name_params}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + encoded + b"--b1--\r\n"


def send(port: int, content: bytes, sender: str = "joe@example.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail(sender, ["a@local.test"], content)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def stored(server) -> bytes:
    [message] = server.queue_list()
    return split_received(server.queue_body(message["id"]))[1]


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    with running_clamd(tmp_path_factory.mktemp("clamd")) as running:
        yield running


def test_forbidden_attachments_are_refused_by_every_name_form(mta_server) -> None:
    server = mta_server(content={"reject_attachment_extensions": ["exe", "vbs"]})
    assert send(server.port, with_attachment('filename="setup.EXE"')) == (
        554, b"5.7.1 Error: attachment 'setup.EXE' refused: its file type is not accepted here")
    assert send(server.port, with_attachment("filename*=UTF-8''r%C3%A9sum%C3%A9.exe"))[0] == 554  # RFC 2231
    assert send(server.port, with_attachment('filename="=?utf-8?q?invoice=2Evbs?="'))[0] == 554  # RFC 2047
    forwarded = (b"From: joe@example.test\r\nTo: a@local.test\r\nSubject: Fwd\r\nMIME-Version: 1.0\r\n"
                 b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n--outer\r\n'
                 b"Content-Type: message/rfc822\r\n\r\n" + with_attachment('filename="x.exe"') + b"--outer--\r\n")
    code, text = send(server.port, forwarded)
    assert (code, b"'x.exe'" in text) == (554, True)
    assert server.queue_list() == []
    assert send(server.port, with_attachment('filename="report.pdf"', b"%PDF-1.4", "application/pdf")) == (250, b"")
    assert b"reason=attachment" in server.log_bytes() and b"content=attachments:reject" in server.log_bytes()


def test_tnef_is_converted_to_ordinary_attachments(mta_server) -> None:
    server = mta_server(content={"tnef": "convert"})
    winmail = tnef_stream([("budget.xlsx", None, b"PK\x03\x04 sheet"), ("notes.txt", None, b"some notes\r\n")])
    assert send(server.port, with_attachment('filename="winmail.dat"', winmail, "application/ms-tnef"))[0] == 250
    parsed = email.message_from_bytes(stored(server), policy=email.policy.default)
    files = {part.get_filename(): part.get_payload(decode=True) for part in parsed.iter_attachments()}
    assert files == {"budget.xlsx": b"PK\x03\x04 sheet", "notes.txt": b"some notes\r\n"}
    assert b"content=attachments:converted" in server.log_bytes()


def test_a_virus_is_refused_naming_its_signature(mta_server, clamd: Clamd) -> None:
    server = mta_server(antivirus={"clamd": clamd.tcp})
    code, text = send(server.port, with_attachment('filename="eicar.com"', EICAR))
    assert code == 554 and text.startswith(b"5.7.1 Error: message refused, it contains a virus (Eicar")
    code, text = send(server.port, TEXT.replace(b"Hello there.", CUSTOM_MARKER))
    assert code == 554 and CUSTOM_SIGNATURE.encode() in text
    assert server.queue_list() == []
    assert send(server.port, TEXT)[0] == 250
    status, metrics = get(server, "/metrics")
    assert sample(metrics, "mta_content_decisions_total", stage="antivirus", result="virus") == 2
    assert sample(metrics, "mta_content_decisions_total", stage="antivirus", result="clean") == 1


def test_a_virus_can_be_quarantined_instead(mta_server, clamd: Clamd) -> None:
    server = mta_server(antivirus={"clamd": clamd.unix, "on_virus": "quarantine"})
    assert send(server.port, with_attachment('filename="eicar.com"', EICAR))[0] == 250
    [message] = server.queue_list()
    assert [r["state"] for r in message["recipients"]] == ["held"]
    assert "antivirus: Eicar" in message["recipients"][0]["last_reply"]


@pytest.mark.parametrize("on_error,code", [("tempfail", 451), ("accept", 250)])
def test_clamd_down_gets_the_error_policy(mta_server, on_error: str, code: int) -> None:
    server = mta_server(antivirus={"clamd": f"tcp:127.0.0.1:{free_port()}", "on_error": on_error})
    reply = send(server.port, TEXT)
    assert reply[0] == code
    if code == 451:
        assert reply[1] == b"4.7.1 Error: virus scan unavailable, try again later"
    assert len(server.queue_list()) == (1 if code == 250 else 0)
    assert b"event=antivirus_failed" in server.log_bytes()


def test_footers_go_to_their_sender_domain_only(mta_server) -> None:
    server = mta_server(footer=[{"sender_domain": "example.test", "text": "-- \nExample Corp, confidential"}])
    assert send(server.port, TEXT)[0] == 250
    footed = server.queue_body(server.queue_list()[0]["id"])
    assert footed.startswith(b"X-MTA-Footer: added\r\nReceived: ")  # the marker: never a second footer
    assert footed.endswith(b"Hello there.\r\n-- \r\nExample Corp, confidential\r\n")
    server.queue_delete(server.queue_list()[0]["id"])
    assert send(server.port, TEXT.replace(b"joe@example.test", b"x@other.test"), sender="x@other.test")[0] == 250
    assert b"Example Corp" not in stored(server)


def test_the_whole_pipeline_in_order_and_the_signature_verifies_after_the_footer(
        mta_server, clamd: Clamd, tmp_path: Path) -> None:
    key_path = tmp_path / "k.pem"
    key_path.write_bytes(DkimKey.generate("rsa"))
    key = DkimKey.load("example.test", "all", str(key_path))
    with DnsServer() as dns, libmilter_peers(tmp_path) as (milter, _):
        publish(dns, key)
        server = mta_server(content={"reject_attachment_extensions": ["exe"]}, antivirus={"clamd": clamd.tcp},
                            milter=[{"address": milter}],
                            footer=[{"sender_domain": "example.test", "text": "Sent from example.test",
                                     "html": "<p>Sent from example.test</p>"}],
                            dkim=[{"domain": "example.test", "selector": "all", "key_file": str(key_path)}])
        alternative = (b"From: Joe <joe@example.test>\r\nTo: a@local.test\r\nSubject: both\r\nMIME-Version: 1.0\r\n"
                       b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
                       b"--alt\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                       b"\r\nCaf=E9 cr=E8me\r\n"
                       b"--alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                       + base64.encodebytes("<html><body><p>Café</p></body></html>".encode()).replace(b"\n", b"\r\n")
                       + b"--alt--\r\n")
        assert send(server.port, alternative, sender="headers@example.test")[0] == 250
        [message] = server.queue_list()
        body = server.queue_body(message["id"])
        assert body.startswith(b"DKIM-Signature: ")
        assert dkimpy_verifies(body, dns)
        assert opendkim_results(body, [key], tmp_path / "opendkim") == ["pass"]
    parsed = email.message_from_bytes(body, policy=email.policy.default)
    assert parsed["X-Added"] == "by libmilter"  # the milter ran
    plain, html = [part.get_content() for part in parsed.walk() if part.get_content_maintype() == "text"]
    assert plain.rstrip().endswith("Sent from example.test") and plain.startswith("Café crème")
    assert html.index("<p>Sent from example.test</p>") < html.index("</body>")
    assert (b"content=attachments:pass,antivirus:clean,milter:changed,footer:added,dkim:signed"
            in server.log_bytes())
    status, metrics = get(server, "/metrics")
    for stage in ("attachments", "antivirus", "milter", "footer", "dkim"):
        assert sample(metrics, "mta_content_stage_seconds_count", stage=stage) == 1
