"""The Received header inbound prepends: its text for a TLS session, and what the comment keeps."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from pathlib import Path

from mta import tls
from mta.config import TlsConfig
from mtaqueue.ids import MessageId
from tests.integration.tlscerts import make_pki
from workers.inbound.received import local_received_header, received_header

MSGID = MessageId("18C2B3A4F5E6D7A8B9C0D1E2F")
DATE = r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000"


def handshake(tmp_path: Path) -> str:
    """A real TLS 1.3 handshake over a socket pair; the server side's description, as inbound logs it."""
    pki = make_pki(tmp_path)
    context = tls.server_context(TlsConfig(cert_file=str(pki.cert), key_file=str(pki.key), min_version="TLSv1.3"))
    assert context is not None
    server_sock, client_sock = socket.socketpair()
    client = threading.Thread(target=lambda: pki.client_context().wrap_socket(
        client_sock, server_hostname="mx.test").close())
    client.start()
    with context.wrap_socket(server_sock, server_side=True) as server:
        described = tls.describe(server)
    client.join(10)
    return described


def test_a_tls_session_s_header_keeps_the_cipher_comment_s_parentheses(tmp_path: Path) -> None:
    described = handshake(tmp_path)
    header = received_header(helo="client.test", client_ip="192.0.2.1", hostname="mx.test", protocol="ESMTPS",
                             msgid=MSGID, recipients=["u@local.test"], tls=described).decode()
    match = re.fullmatch(r"TLSv1\.3 with cipher (\S+) \((\d+)/\d+ bits\)", described)
    assert match, described
    cipher, bits = match.groups()
    expected = (
        "Received: from client.test ([192.0.2.1])\r\n"
        f"\t(using TLSv1.3 with cipher {cipher} ({bits}/{bits} bits))\r\n"
        f"\tby mx.test (mta) with ESMTPS id {MSGID}\r\n"
        "\tfor <u@local.test>;\r\n"
        f"\t{DATE}\r\n"
    )
    assert re.fullmatch(re.escape(expected).replace(re.escape(DATE), DATE), header), header


def comment(text: str) -> str:
    header = received_header(helo="c.test", client_ip="192.0.2.1", hostname="mx.test", protocol="ESMTPS",
                             msgid=MSGID, recipients=[], tls=text).decode()
    return header.split("\r\n")[1].removeprefix("\t")


def test_nested_comments_are_kept_and_what_could_end_one_is_escaped() -> None:
    assert comment("a (b (c) d) e") == "(using a (b (c) d) e)"
    assert comment("a) (b") == "(using a? ?b)"  # unmatched: would close the comment early, or never
    assert comment("x (y") == "(using x ?y)"
    assert comment("x \\) y") == "(using x ?? y)"  # a backslash would quote the parenthesis
    assert comment("x\r\nBcc: y") == "(using x??Bcc: y)"  # no header injected
    assert comment('<a>;"b"') == "(using ?a???b?)"

    header = received_header(helo="evil (x)", client_ip="192.0.2.1", hostname="mx.test", protocol="ESMTP",
                             msgid=MSGID, recipients=[]).decode()
    assert header.startswith("Received: from evil ?x? ([192.0.2.1])\r\n"), header  # the HELO name is no comment


def test_mail_from_the_maildrop_names_the_submitting_uid_and_no_client() -> None:
    one = local_received_header(uid=1000, hostname="mx.test", msgid=MSGID, recipients=["u@local.test"]).decode()
    assert re.fullmatch(r"Received: by mx\.test \(mta, from local uid 1000\)\r\n"
                        rf"\tid {MSGID}\r\n\tfor <u@local\.test>;\r\n\t{DATE}\r\n", one), one
    two = local_received_header(uid=0, hostname="mx.test", msgid=MSGID, recipients=["a@x.test", "b@x.test"]).decode()
    assert "for <" not in two and "from local uid 0)" in two
