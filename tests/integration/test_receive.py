"""Receiving end to end: smtplib in, `mta queue` out; the default config; `mta config check`."""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, run_mta, split_received, spool_snapshot

pytestmark = pytest.mark.integration

MESSAGE = (
    b"From: Alice <alice@client.test>\r\n"
    b"To: bob@local.test\r\n"
    b"Subject: integration\r\n"
    b"Message-ID: <receive.1@client.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot (stuffed on the wire, not in the spool)\r\n"
    b"\r\n"
    b"  indented, trailing space \r\n"
)


def _entry(listing: list[dict], msgid: str) -> dict:
    found = [e for e in listing if e["id"] == msgid]
    assert len(found) == 1, f"{msgid} listed {len(found)} times in {listing}"
    return found[0]


def test_smtplib_message_is_listed_and_stored_verbatim(mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server()
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.mail("alice@client.test")[0] == 250
        assert smtp.rcpt("bob@local.test")[0] == 250
        code, text = smtp.data(MESSAGE)
        assert code == 250, text
        assert text.startswith(b"2.0.0 Ok: queued as ")
        one = text.split()[-1].decode()
        refused = smtp.sendmail("carol@client.test", ["dan@local.test", "erin@local.test"], MESSAGE)
        assert refused == {}

    listing = server.queue_list()
    assert len(listing) == 2
    first = _entry(listing, one)
    assert len(one) == 21 and one == one.upper()
    assert first["sender"] == "alice@client.test"
    assert [(r["address"], r["state"]) for r in first["recipients"]] == [("bob@local.test", "ready")]
    body = server.queue_body(one)
    assert first["size"] == len(body)
    header, rest = split_received(body)
    assert rest == MESSAGE
    assert header.count(b"Received:") == 1
    assert b"from client.test ([127.0.0.1])" in header
    assert f"by mx.test (mta) with ESMTP id {one}".encode() in header
    assert b"for <bob@local.test>" in header

    (second,) = [e for e in listing if e["id"] != one]
    assert second["sender"] == "carol@client.test"
    assert [r["address"] for r in second["recipients"]] == ["dan@local.test", "erin@local.test"]
    header, rest = split_received(server.queue_body(second["id"]))
    assert rest == MESSAGE
    assert f"id {second['id']};".encode() in header  # several recipients: no "for" clause
    assert b" for <" not in header


def test_queue_show_of_unknown_id_fails(mta_server: Callable[..., MtaServer]) -> None:
    server = mta_server()
    done = server.mta("queue", "show", "0" * 21, check=False)
    assert done.returncode == 1
    assert b"no message" in done.stderr


def _port_busy(port: int) -> bool:
    """Whether another process listens there (TIME_WAIT leftovers do not count, as for the server)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_default_config_serves_on_2525_with_spool_under_var(tmp_path: Path) -> None:
    if _port_busy(2525):
        pytest.skip("127.0.0.1:2525 is in use: cannot test the embedded defaults")
    spool = tmp_path / "var" / "spool"
    server = MtaServer(None, 2525, spool, tmp_path / "mta.log", cwd=tmp_path)
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as smtp:
            # The defaults relay for loopback clients (mynetworks), to any domain.
            assert smtp.ehlo()[0] == 250
            assert smtp.mail("a@client.test")[0] == 250
            assert smtp.rcpt("b@elsewhere.test")[0] == 250
            code, text = smtp.data(MESSAGE)
            assert code == 250, text
        msgid = text.decode().rsplit(" ", 1)[-1]
        assert f"event=received msgid={msgid}".encode() in server.log_bytes()
        assert (spool / "data.mdb").is_file()
    finally:
        server.stop()  # no exit code check: the defaults deliver, and a slow resolver may outlast the drain
    # The defaults also deliver, so the message may be gone (delivered or bounced); either
    # way `mta queue list` with no -c, in the same directory, reads this same spool.
    listed = {e["id"] for e in server.queue_list()}
    assert listed == set(spool_snapshot(spool).envelopes)
    events = set(re.findall(rb"event=(\w+) msgid=" + msgid.encode(), server.log_bytes()))
    assert b"received" in events
    assert msgid in listed or events - {b"received"}, events


GOOD = '[server]\nhostname = "mx.test"\n[limits]\nmax_recipients = 200\n'


@pytest.mark.parametrize(("text", "names"), [
    ('[limits]\nmax_recipients = "ten"\n', "[limits] max_recipients"),
    ("[limits]\nmax_recipient = 100\n", "max_recipient: unknown key"),
    ("[queue]\nmax_size_bytes = 1024\n", "[queue] max_size_bytes"),
    ('[[listener]]\naddress = "127.0.0.1"\n', "[[listener]] #1 address"),
    ("[limit]\nmax_recipients = 100\n", "unknown section [limit]"),
    ("[server\n", "not valid TOML"),
])
def test_config_check_names_the_bad_key(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = run_mta("config", "check", "-c", str(path), check=False)
    assert done.returncode == 2, done
    assert names in done.stderr.decode()
    assert str(path) in done.stderr.decode()


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    done = run_mta("config", "check", "-c", str(path), check=False)
    assert done.returncode == 0, done
    assert b"configuration OK" in done.stdout


def test_config_check_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    done = run_mta("config", "check", "-c", str(tmp_path / "nope.toml"), check=False)
    assert done.returncode == 2
    assert b"no such file" in done.stderr


def test_serve_refuses_a_bad_config_without_listening(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[limits]\nmax_recipients = "ten"\n')
    done = run_mta("serve", "-c", str(path), check=False)
    assert done.returncode == 2
    assert b"[limits] max_recipients" in done.stderr
