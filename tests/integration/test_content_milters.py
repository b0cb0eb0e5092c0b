"""[[milter]] end to end: a real `mta serve`, a real libmilter milter, smtplib as the client.

The milter's verdict is the reply to end of data (never accept-then-bounce); what it
changes is what the spool holds; a quarantined message is stored held with its reason;
a milter that is down or hangs gets the configured default_action; `listeners` picks
the listeners a milter runs for; each decision is counted in mta_content_decisions_total.
"""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, split_received
from tests.integration.libmilter import libmilter_peers
from tests.integration.test_metrics import get, sample

pytestmark = pytest.mark.integration

CONTENT = b"From: s@s.test\r\nSubject: hello\r\nX-Remove: first\r\nX-Remove: second\r\n\r\nbody line\r\n"


@pytest.fixture(scope="module")
def milters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with libmilter_peers(tmp_path_factory.mktemp("milters")) as addresses:
        yield addresses


def send(port: int, sender: str, recipients: tuple[str, ...] = ("a@local.test", "gone@example.test"),
         content: bytes = CONTENT) -> tuple[int, bytes]:
    """(code, text) of the reply to end of data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        try:
            client.sendmail(sender, list(recipients), content)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPRecipientsRefused as exc:
            raise AssertionError(f"recipients refused: {exc.recipients}") from None
        return 250, b""


def relay_config(milter: dict[str, object] | list[dict[str, object]]) -> dict[str, object]:
    return {"relay": {"relay_domains": ["local.test", "example.test"], "mynetworks": []},
            "milter": milter if isinstance(milter, list) else [milter]}


def without_received(stored: bytes) -> bytes:
    """The stored message minus our Received header, wherever milters left it."""
    return re.sub(rb"Received: from client\.test [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", b"", stored, count=1)


def only_message(server) -> dict:
    listed = server.queue_list()
    assert len(listed) == 1, listed
    return listed[0]


def test_changes_of_a_milter_are_what_the_spool_holds(mta_server, milters) -> None:
    server = mta_server(**relay_config({"address": milters[0]}))
    assert send(server.port, "headers@s.test")[0] == 250
    message = only_message(server)
    # X-Top was inserted at index 0: above our Received header, as the milter asked.
    assert server.queue_body(message["id"]).startswith(b"X-Top: first\r\nReceived: from client.test")
    assert without_received(server.queue_body(message["id"])) == (b"X-Top: first\r\nFrom: s@s.test\r\nSubject: [scanned] hello\r\nX-Remove: first\r\n"
                       b"X-Added: by libmilter\r\n\r\nbody line\r\n")
    assert b"content=milter:changed" in server.log_bytes()


def test_body_and_envelope_changes_over_a_unix_socket(mta_server, milters) -> None:
    server = mta_server(**relay_config({"address": milters[1]}))
    assert send(server.port, "body@s.test")[0] == 250
    assert split_received(server.queue_body(only_message(server)["id"]))[1].endswith(b"\r\n\r\nreplaced body\r\n")
    server.queue_delete(only_message(server)["id"])
    assert send(server.port, "rcpts@s.test")[0] == 250
    message = only_message(server)
    assert message["sender"] == "new-sender@example.test"
    assert [r["address"] for r in message["recipients"]] == ["a@local.test", "added@example.test"]


def test_the_milters_reject_and_tempfail_are_the_reply_to_end_of_data(mta_server, milters) -> None:
    server = mta_server(**relay_config({"address": milters[0]}))
    assert send(server.port, "reject@s.test") == (550, b"5.7.1 sender refused by test milter")
    assert send(server.port, "tempfail@s.test") == (451, b"4.7.1 scanner busy, try later")
    assert send(server.port, "plainreject@s.test") == (550, b"5.7.1 Error: message content rejected")
    assert server.queue_list() == []
    log = server.log_bytes()
    assert b"event=rejected" in log and b"reason=milter" in log and b"content=milter:reject" in log


def test_discard_answers_250_and_stores_nothing(mta_server, milters) -> None:
    server = mta_server(**relay_config({"address": milters[0]}))
    code, _ = send(server.port, "discard@s.test")
    assert code == 250
    assert server.queue_list() == []
    assert b"event=discarded" in server.log_bytes()


def test_quarantine_stores_the_message_held_with_the_reason(mta_server, milters) -> None:
    server = mta_server(**relay_config({"address": milters[0]}))
    assert send(server.port, "quarantine@s.test")[0] == 250
    message = only_message(server)
    assert {r["state"] for r in message["recipients"]} == {"held"}
    assert all("held by test milter" in r["last_reply"] for r in message["recipients"])
    text = server.mta("queue", "list").stdout.decode()
    assert "held by test milter" in text
    status, metrics = get(server, "/metrics")
    assert status == 200
    assert sample(metrics, "mta_content_decisions_total", stage="milter", result="quarantine") == 1
    server.mta("queue", "release", message["id"])  # the operator lets it go on
    assert {r["state"] for r in only_message(server)["recipients"]} == {"ready"}


@pytest.mark.parametrize("action,expected", [
    ("tempfail", (451, b"4.7.1 Error: content filter unavailable, try again later")),
    ("reject", (550, b"5.7.1 Error: message content rejected")),
    ("accept", (250, None)),
])
def test_a_milter_that_is_down_gets_the_default_action(mta_server, action, expected) -> None:
    down = f"inet:127.0.0.1:{free_port()}"  # nothing listens there
    server = mta_server(**relay_config({"address": down, "default_action": action, "timeout_seconds": 2}))
    code, text = send(server.port, "headers@s.test")
    assert code == expected[0]
    if expected[1] is not None:
        assert text == expected[1]
        assert server.queue_list() == []
    else:  # accepted unchanged
        assert split_received(server.queue_body(only_message(server)["id"]))[1] == CONTENT
    assert b"event=milter_failed" in server.log_bytes()


def test_a_milter_that_hangs_times_out_to_tempfail(mta_server, tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"inet:127.0.0.1:{silent.getsockname()[1]}"
        server = mta_server(**relay_config({"address": address, "timeout_seconds": 1}))
        assert send(server.port, "a@s.test")[0] == 451
    assert server.queue_list() == []


def test_milters_run_in_order_and_only_on_their_listeners(mta_server, milters) -> None:
    other = free_port()
    server = mta_server(start=False, **relay_config([
        {"address": milters[0]},
        {"address": milters[1], "listeners": [f"127.0.0.1:{other}"]},
    ]))
    config = server.config_path.read_text()
    server.config_path.write_text(config.replace("[[listener]]\n", f'[[listener]]\naddress = "127.0.0.1:{other}"\n\n'
                                                                   "[[listener]]\n", 1))
    server.start()
    assert send(server.port, "headers@s.test")[0] == 250  # the first milter only
    assert send(other, "headers@s.test")[0] == 250  # both: the second sees the first's changes
    bodies = {m["client"]["listener"]: without_received(server.queue_body(m["id"])) for m in server.queue_list()}
    assert bodies[f"127.0.0.1:{server.port}"].count(b"X-Added: by libmilter") == 1
    assert bodies[f"127.0.0.1:{other}"].count(b"X-Added: by libmilter") == 2
    assert bodies[f"127.0.0.1:{other}"].startswith(b"X-Top: first\r\nX-Top: first\r\n")
