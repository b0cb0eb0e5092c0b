"""The milter client against a real libmilter milter (Debian's python3-milter), on loopback.

The peer (libmilter_peer.py) runs as its own process under the system Python; what it
does is chosen by the sender's local part. Plus a milter that is down and one that hangs.
"""

import asyncio
import socket
import time

import pytest
import uvloop

from mta.milter.changes import Message, apply_modifications
from mta.milter.client import Envelope, MilterAddress, MilterFailed, run_milter
from tests.integration.conftest import free_port
from tests.integration.libmilter import libmilter_peers

pytestmark = pytest.mark.integration

CONTENT = (b"Subject: hello\r\nX-Remove: first\r\nX-Remove: second\r\nFrom: s@s.test\r\n\r\n"
           b"line one\r\n" + b"x" * 150_000 + b"\r\n")
ENVELOPE = Envelope(
    "client.test", "192.0.2.7", 40123, "helo.client.test",
    {"j": "mx.test", "_": "client.test [192.0.2.7]", "{client_addr}": "192.0.2.7",
     "{auth_authen}": "alice", "{tls_version}": "TLSv1.3"},
    queue_id="0123456789ABCDEF",
)


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """One libmilter peer on TCP, one on a unix socket: their MilterAddresses."""
    with libmilter_peers(tmp_path_factory.mktemp("milter")) as (tcp, unix):
        yield MilterAddress.parse(tcp), MilterAddress.parse(unix)


def run(address, sender, timeout=10.0, recipients=("a@r.test", "gone@example.test"), content=CONTENT,
        loop_factory=None):
    message = Message.parse(content, sender, recipients, ("SIZE=150100",))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run_milter(address, ENVELOPE, message, timeout))
    return message, result


def test_reject_at_mail_with_the_milters_own_reply(peers):
    _, result = run(peers[0], "reject@s.test")
    assert (result.verdict, result.code, result.status, result.text) == (
        "reject", 550, "5.7.1", "sender refused by test milter")


def test_tempfail_at_end_of_message_with_its_reply(peers):
    _, result = run(peers[0], "tempfail@s.test")
    assert (result.verdict, result.code, result.status, result.text) == (
        "tempfail", 451, "4.7.1", "scanner busy, try later")


@pytest.mark.parametrize("local,verdict", [("plainreject", "reject"), ("discard", "discard"),
                                           ("accept", "accept")])
def test_plain_verdicts(peers, local, verdict):
    _, result = run(peers[0], f"{local}@s.test")
    assert (result.verdict, result.code, result.modifications) == (verdict, 0, ())


def test_headers_added_changed_inserted_and_deleted(peers):
    message, result = run(peers[0], "headers@s.test")
    assert result.verdict == "accept"
    changed = apply_modifications(message, result.modifications)
    assert changed.headers == (
        ("X-Top", "first"), ("Subject", "[scanned] hello"), ("X-Remove", "first"),
        ("From", "s@s.test"), ("X-Added", "by libmilter"),
    )
    assert changed.body == message.body


def test_body_replaced(peers):
    message, result = run(peers[0], "body@s.test")
    changed = apply_modifications(message, result.modifications)
    assert changed.body == b"replaced body\r\n"
    assert changed.content().endswith(b"From: s@s.test\r\n\r\nreplaced body\r\n")


def test_recipients_and_sender_changed(peers):
    message, result = run(peers[1], "rcpts@s.test")  # over the unix socket
    changed = apply_modifications(message, result.modifications)
    assert changed.recipients == ("a@r.test", "added@example.test")
    assert (changed.sender, changed.sender_args) == ("new-sender@example.test", ("BODY=8BITMIME",))


def test_quarantine_with_its_reason(peers):
    message, result = run(peers[0], "quarantine@s.test")
    assert result.verdict == "accept" and result.quarantine == "held by test milter"
    assert apply_modifications(message, result.modifications).quarantine == "held by test milter"


def seen(result):
    return {m.name.removeprefix("X-Seen-"): m.value for m in result.modifications}


def test_the_milter_sees_the_session_macros_and_message(peers):
    _, result = run(peers[0], "report@s.test")
    assert seen(result) == {
        "rcpts": "a@r.test,gone@example.test", "args": "SIZE=150100",
        "headers": "Subject,X-Remove,X-Remove,From", "chunks": "3", "bytes": str(len(CONTENT) - 69),
        "client": "client.test/192.0.2.7", "i": "0123456789ABCDEF", "j": "mx.test",
        "_": "client.test [192.0.2.7]", "client_addr": "192.0.2.7", "auth_authen": "alice",
        "tls_version": "TLSv1.3",
    }


def test_a_nul_in_a_header_reaches_the_milter_as_a_space(peers):
    _, result = run(peers[0], "report@s.test", content=b"Subject: a\0b\r\nX-N\0ul: v\r\n\r\nbody\r\n")
    assert seen(result)["headers"] == "Subject,X-N ul"


def test_skip_stops_the_body_after_the_first_chunk(peers):
    _, result = run(peers[0], "skip@s.test")
    assert (seen(result)["chunks"], seen(result)["bytes"]) == ("1", "65535")


def test_progress_renews_the_step_deadline(peers):
    # 6 x 0.4 s of work at end of message, a progress after each: longer than the 1 s timeout.
    _, result = run(peers[0], "slow@s.test", timeout=1.0)
    assert result.verdict == "accept" and [m.name for m in result.modifications] == ["X-Slow"]


def test_under_uvloop(peers):
    _, result = run(peers[1], "reject@s.test", loop_factory=uvloop.new_event_loop)
    assert (result.verdict, result.code) == ("reject", 550)


def test_a_milter_that_hangs_times_out(peers):
    started = time.monotonic()
    with pytest.raises(MilterFailed, match="timed out after 1.0s"):
        run(peers[0], "hang@s.test", timeout=1.0)
    assert time.monotonic() - started < 5


def test_a_milter_that_never_answers_negotiation_times_out():
    with socket.socket() as listener:  # accepts in the kernel's backlog, never reads
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = MilterAddress.parse(f"inet:127.0.0.1:{listener.getsockname()[1]}")
        with pytest.raises(MilterFailed, match="timed out"):
            run(address, "a@s.test", timeout=0.5)


def test_a_milter_that_is_down(tmp_path):
    with pytest.raises(MilterFailed, match="cannot be reached"):
        run(MilterAddress.parse(f"inet:127.0.0.1:{free_port()}"), "a@s.test")
    with pytest.raises(MilterFailed, match="cannot be reached"):
        run(MilterAddress.parse(f"unix:{tmp_path}/absent.sock"), "a@s.test")


def test_a_milter_that_breaks_the_protocol():
    async def bad_peer(reader, writer):
        await reader.read(100)
        writer.write(b"\x00\x00\x00\x00")  # a zero-length packet
        await writer.drain()
        await reader.read(100)  # until the client hangs up
        writer.close()
        await writer.wait_closed()

    fails_against(bad_peer, "broke the protocol: milter sent a packet of 0")


def test_a_milter_that_closes_mid_message():
    async def closing_peer(reader, writer):
        await reader.read(100)  # the negotiation
        writer.write(b"\x00\x00\x00\x0dO" + bytes.fromhex("00000006 000001ff 00000000"))
        await writer.drain()
        await reader.read(100)  # the connect step: hang up instead of answering
        writer.close()
        await writer.wait_closed()

    fails_against(closing_peer, "closed the connection")


@pytest.mark.parametrize("text", ["inet:host", "inet::25", "tcp:h:25", "unix:relative", "inet:h:0"])
def test_bad_milter_addresses(text):
    with pytest.raises(ValueError, match="inet:host:port or unix:/path"):
        MilterAddress.parse(text)


def test_milter_addresses():
    assert MilterAddress.parse("inet:[::1]:8891") == MilterAddress(host="::1", port=8891)
    assert str(MilterAddress.parse("unix:/run/m.sock")) == "unix:/run/m.sock"


def fails_against(peer, match: str) -> None:
    """Run one message against a scripted `peer` (an asyncio stream handler): MilterFailed."""
    async def scenario():
        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        message = Message.parse(CONTENT, "a@s.test", ["b@r.test"])
        async with server:
            with pytest.raises(MilterFailed, match=match):
                await run_milter(MilterAddress.parse(f"inet:127.0.0.1:{port}"), ENVELOPE, message, 5)

    asyncio.run(scenario())
