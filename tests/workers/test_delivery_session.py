"""OutboundSession against a real SMTP/LMTP sink (tests/integration/sink.py) over loopback.

Every test runs under both the asyncio and the uvloop event loop, bounded by
TEST_SECONDS. STARTTLS tests use a certificate made here with the openssl command
(or the cryptography package); without either they are skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from tests.integration.sink import SmtpSink, reply_for
from workers.delivery.session import (
    Outbound, OutboundRecipient, OutboundSession, RecipientResult, SessionError,
)

TEST_SECONDS = 10.0
T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, TEST_SECONDS))
    return run


@pytest.fixture
def sink() -> Iterator[Callable[..., SmtpSink]]:
    """sink(**options) -> a started SmtpSink on its own loopback address; all closed at teardown."""
    made: list[SmtpSink] = []

    def make(address: str | None = None, **options: Any) -> SmtpSink:
        server = SmtpSink(address or f"127.0.0.{len(made) + 2}", **options).start()
        made.append(server)
        return server
    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(certfile, keyfile): self-signed for mx.test, valid for a day."""
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(keyfile), "-out", str(certfile), "-days", "1",
                        "-subj", "/CN=mx.test", "-addext", "subjectAltName=DNS:mx.test"],
                       check=True, capture_output=True, timeout=30)
        return str(certfile), str(keyfile)
    _make_cert_with_cryptography(certfile, keyfile)
    return str(certfile), str(keyfile)


def _make_cert_with_cryptography(certfile: Path, keyfile: Path) -> None:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        pytest.skip("neither the openssl command nor the cryptography package: no certificate for TLS tests")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def message(*recipients: str, body: bytes = b"Subject: test\r\n\r\nhello\r\n", sender: str = "sender@relay.test",
            **fields: Any) -> Outbound:
    return Outbound(msgid="0123456789abcdef01234", sender=sender,
                    recipients=[OutboundRecipient(r) for r in recipients], body=body, **fields)


async def open_session(server: SmtpSink, **options: Any) -> OutboundSession:
    options.setdefault("tls", "none")
    options.setdefault("command_timeout", 5)
    options.setdefault("data_timeout", 5)
    return await OutboundSession.open("mx.test", server.address, server.port, helo_name="relay.test",
                                      connect_timeout=5, **options)


async def deliver(server: SmtpSink, *messages: Outbound, **options: Any) -> tuple[OutboundSession,
                                                                                   list[list[RecipientResult]]]:
    session = await open_session(server, **options)
    results = [await session.send(m) for m in messages]
    await session.close()
    return session, results


def codes(results: list[RecipientResult]) -> list[tuple[int, str]]:
    return [(r.code, r.status) for r in results]


# --- recipients and transactions ------------------------------------------------------------

@pytest.mark.parametrize("pipelining", [True, False])
def test_mixed_recipient_results_in_one_transaction(run: Run[Any], sink: Callable[..., SmtpSink],
                                                    pipelining: bool) -> None:
    server = sink(pipelining=pipelining)
    session, [results] = run(deliver(server, message("a@x.test", "r550-b@x.test", "r450-c@x.test", "d@x.test")))
    assert [r.address for r in results] == ["a@x.test", "r550-b@x.test", "r450-c@x.test", "d@x.test"]
    assert codes(results) == [(250, "2.0.0"), (550, "5.1.1"), (450, "4.2.0"), (250, "2.0.0")]
    assert [(r.ok, r.temporary, r.permanent) for r in results[:3]] == [
        (True, False, False), (False, False, True), (False, True, False)]
    [got] = server.wait_for_messages(1)
    assert got.recipients == ["a@x.test", "d@x.test"] and got.sender == "sender@relay.test"
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    assert (server.pipelined_commands > 0) == pipelining  # MAIL+RCPTs+DATA came in one write
    assert session.remote == f"mx.test[{server.address}]:{server.port}"


@pytest.mark.parametrize("pipelining", [True, False])
def test_no_accepted_recipient_skips_data_and_resets(run: Run[Any], sink: Callable[..., SmtpSink],
                                                     pipelining: bool) -> None:
    server = sink(pipelining=pipelining)
    session, [refused, ok] = run(deliver(server, message("r550-a@x.test", "r452-b@x.test"), message("c@x.test")))
    assert codes(refused) == [(550, "5.1.1"), (452, "4.5.3")]
    assert codes(ok) == [(250, "2.0.0")]
    verbs = server.verbs()
    first = verbs[: verbs.index("RSET") + 1]
    assert first == (["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET"] if pipelining  # DATA got 554
                     else ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"])
    assert len(server.messages) == 1 and server.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_refused_gives_every_recipient_its_reply(run: Run[Any], sink: Callable[..., SmtpSink],
                                                      pipelining: bool) -> None:
    server = sink(pipelining=pipelining, mail_rule=lambda a: reply_for(451) if a.startswith("busy") else None)
    refused = message("a@x.test", "b@x.test", sender="busy@relay.test")
    _, [results, ok] = run(deliver(server, refused, message("c@x.test")))
    assert codes(results) == [(451, "4.3.0"), (451, "4.3.0")] and codes(ok) == [(250, "2.0.0")]
    assert server.verbs() == (["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]
                              if pipelining else ["EHLO", "MAIL", "MAIL", "RCPT", "DATA", "QUIT"])


def test_bad_addresses_are_refused_locally(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    _, [bad_sender, bad_rcpt] = run(deliver(server, message("a@x.test", sender="x>\r\nRSET"),
                                            message("a@x.test", "b>@x.test", "")))
    assert codes(bad_sender) == [(553, "5.1.7")]  # never sent: it would break the command line
    assert codes(bad_rcpt) == [(250, "2.0.0"), (553, "5.1.3"), (553, "5.1.3")]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_connection_reuse_for_three_messages(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    bodies = [f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode() for i in range(3)]
    session, results = run(deliver(server, *(message(f"u{i}@x.test", body=b) for i, b in enumerate(bodies))))
    assert all(r.ok for rs in results for r in rs)
    got = server.wait_for_messages(3)
    assert [m.data for m in got] == bodies and {m.connection for m in got} == {1}
    assert server.connections == 1 and server.peak_connections == 1
    assert server.verbs().count("EHLO") == 1 and server.verbs()[-1] == "QUIT"
    assert not session.usable  # closed


async def send_chain(session: OutboundSession, *messages: Outbound) -> list[list[RecipientResult]]:
    """Each message announced behind the previous one's content, as the delivery worker does."""
    results = []
    for i, m in enumerate(messages):
        following = messages[i + 1] if i + 1 < len(messages) else None
        results.append(await session.send(m, follow=lambda f=following: f))  # type: ignore[misc]
    return results


@pytest.mark.parametrize("pipelining", [True, False])
def test_next_message_rides_the_previous_content(run: Run[Any], sink: Callable[..., SmtpSink],
                                                 pipelining: bool) -> None:
    server = sink(pipelining=pipelining)
    bodies = [f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode() for i in range(4)]

    async def scenario() -> list[list[RecipientResult]]:
        session = await open_session(server)
        results = await send_chain(session, *(message(f"u{i}@x.test", "r550-no@x.test", body=b)
                                              for i, b in enumerate(bodies)))
        await session.close()
        return results

    results = run(scenario())
    assert [codes(r) for r in results] == [[(250, "2.0.0"), (550, "5.1.1")]] * 4
    got = server.wait_for_messages(4)
    assert [m.data for m in got] == bodies and [m.recipients for m in got] == [[f"u{i}@x.test"] for i in range(4)]
    assert server.connections == 1 and server.verbs()[-1] == "QUIT"
    # With PIPELINING, each next MAIL went out with the content before it: 3 round trips saved.
    assert server.commands_after_content == (3 if pipelining else 0)


def test_lost_before_the_announced_mail_is_answered_is_stale(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(drop_mail_after=1)  # the second MAIL (behind the first content) finds it gone

    async def scenario() -> tuple[list[list[RecipientResult]], bool, bool]:
        session = await open_session(server)
        results = await send_chain(session, message("a@x.test"), message("b@x.test"))
        stale, reusable = session.stale, session.reusable
        await session.close()
        return results, stale, reusable

    (first, second), stale, reusable = run(scenario())
    assert codes(first) == [(250, "2.0.0")] and codes(second) == [(451, "4.4.2")]
    assert stale and not reusable  # nothing of it reached the server: the worker sends it again
    assert server.commands_after_content == 1  # it was announced behind the first content
    assert [m.recipients for m in server.wait_for_messages(1)] == [["a@x.test"]]


def test_421_to_the_content_spoils_the_announced_message(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(data_rule=lambda a: reply_for(421, "going down") if a.startswith("a") else None)

    async def scenario() -> tuple[list[list[RecipientResult]], bool]:
        session = await open_session(server)
        results = await send_chain(session, message("a@x.test"), message("b@x.test"))
        usable = session.usable
        await session.close()
        return results, usable

    (first, second), usable = run(scenario())
    assert codes(first) == [(421, "4.3.2")] and codes(second) == [(451, "4.4.2")]
    assert not usable and "no longer usable" in second[0].text


def test_a_message_refused_locally_is_not_announced(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()

    async def scenario() -> list[list[RecipientResult]]:
        session = await open_session(server)
        results = await send_chain(session, message("a@x.test"), message("b>@x.test"), message("c@x.test"))
        await session.close()
        return results

    results = run(scenario())
    assert [codes(r) for r in results] == [[(250, "2.0.0")], [(553, "5.1.3")], [(250, "2.0.0")]]
    assert [m.recipients for m in server.wait_for_messages(2)] == [["a@x.test"], ["c@x.test"]]
    assert server.commands_after_content == 0  # the refused one announced nothing; c came after it
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]


def test_dot_stuffing_arrives_intact(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    body = b".starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n\r\n.\r\n.."
    bare = b"bare\nLF then\n.dot and bare\rCR\n"
    run(deliver(server, message("a@x.test", body=body), message("a@x.test", body=bare)))
    first, second = server.wait_for_messages(2)
    assert first.data == body + b"\r\n"  # the last line ended with CRLF
    assert first.wire == b"..starts with a dot\r\n...two dots\r\n..\r\nafter a lone dot\r\n\r\n..\r\n...\r\n.\r\n"
    assert second.data == b"bare\r\nLF then\r\n.dot and bare\r\nCR\r\n"
    assert b"\r\n..dot" in second.wire


def test_parameters_sent_only_when_advertised(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    full, bare = sink(), sink(dsn=False, eightbitmime=False, size_limit=None)
    for server in (full, bare):
        msg = message("a@x.test", body_type="8BITMIME", ret="HDRS", envid="env+1")
        msg.recipients[0] = OutboundRecipient("a@x.test", notify=("FAILURE", "DELAY"), orcpt="rfc822;A@x.test")
        _, [results] = run(deliver(server, msg))
        assert results[0].ok  # the sink answers 555 to any parameter it did not advertise
    [got] = full.wait_for_messages(1)
    size = str(len(b"Subject: test\r\n\r\nhello\r\n"))
    assert got.mail_params == {"SIZE": size, "BODY": "8BITMIME", "RET": "HDRS", "ENVID": "env+2B1"}
    assert got.rcpt_params == [{"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;A@x.test"}]
    [got] = bare.wait_for_messages(1)
    assert got.mail_params == {} and got.rcpt_params == [{}]


def test_size_refusal_without_data(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(size_limit=100)
    session, [big, small] = run(deliver(server, message("a@x.test", "b@x.test", body=b"x" * 99 + b"\r\n"),
                                        message("a@x.test", body=b"small\r\n")))
    assert codes(big) == [(552, "5.3.4"), (552, "5.3.4")] and all(r.permanent for r in big)
    assert codes(small) == [(250, "2.0.0")]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]  # the big one never left
    assert server.messages[0].data == b"small\r\n"


def test_smtputf8_refusal(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(smtputf8=False)
    _, [flagged, address, ascii_only] = run(deliver(
        server, message("a@x.test", smtputf8=True), message("ü@x.test"), message("a@x.test")))
    assert codes(flagged) == [(553, "5.6.7")] and codes(address) == [(553, "5.6.7")]
    assert codes(ascii_only) == [(250, "2.0.0")]
    assert server.verbs().count("MAIL") == 1


def test_smtputf8_when_offered(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    _, [results] = run(deliver(server, message("ü@x.test", body="Subject: ü\r\n\r\nü\r\n".encode())))
    assert results[0].ok
    [got] = server.wait_for_messages(1)
    assert "SMTPUTF8" in got.mail_params and got.recipients == ["ü@x.test"]


def test_lmtp_per_recipient_results(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(lmtp=True)
    rcpts = ("a@x.test", "d450-b@x.test", "r550-c@x.test", "d552-d@x.test", "e@x.test")
    session, [results, again] = run(deliver(server, message(*rcpts), message("f@x.test"), lmtp=True))
    assert codes(results) == [(250, "2.0.0"), (450, "4.2.0"), (550, "5.1.1"), (552, "5.2.2"), (250, "2.0.0")]
    assert codes(again) == [(250, "2.0.0")]
    first = server.wait_for_messages(2)[0]
    assert first.recipients == ["a@x.test", "d450-b@x.test", "d552-d@x.test", "e@x.test"]
    assert len(first.replies) == 4
    assert server.verbs() == ["LHLO", "MAIL", "RCPT", "RCPT", "RCPT", "RCPT", "RCPT", "DATA",
                              "MAIL", "RCPT", "DATA", "QUIT"]


def test_lmtp_per_recipient_results_with_the_next_message_announced(run: Run[Any],
                                                                    sink: Callable[..., SmtpSink]) -> None:
    """Under LMTP one reply per accepted recipient follows the dot; the next message's MAIL,
    RCPT and DATA replies come after them and are matched to that message."""
    server = sink(lmtp=True)
    first = message("a@x.test", "d450-b@x.test", "r550-c@x.test", "d552-d@x.test")
    second = message("r450-e@x.test", "f@x.test", "d451-g@x.test")
    third = message("h@x.test")

    async def scenario() -> list[list[RecipientResult]]:
        session = await open_session(server, lmtp=True)
        results = await send_chain(session, first, second, third)
        await session.close()
        return results

    one, two, three = run(scenario())
    assert codes(one) == [(250, "2.0.0"), (450, "4.2.0"), (550, "5.1.1"), (552, "5.2.2")]
    assert codes(two) == [(450, "4.2.0"), (250, "2.0.0"), (451, "4.3.0")]
    assert codes(three) == [(250, "2.0.0")]
    assert [m.recipients for m in server.wait_for_messages(3)] == [
        ["a@x.test", "d450-b@x.test", "d552-d@x.test"], ["f@x.test", "d451-g@x.test"], ["h@x.test"]]
    assert server.commands_after_content == 2


def test_smtp_final_reply_applies_to_all_accepted(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    _, [results] = run(deliver(server, message("a@x.test", "d451-b@x.test", "r550-c@x.test")))
    assert codes(results) == [(451, "4.3.0"), (451, "4.3.0"), (550, "5.1.1")]


def test_helo_fallback(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(ehlo=False)
    _, [results] = run(deliver(server, message("a@x.test", "b@x.test", body_type="8BITMIME")))
    assert all(r.ok for r in results)
    assert server.verbs() == ["EHLO", "HELO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert server.pipelined_commands == 0 and server.messages[0].mail_params == {}


# --- session failures ----------------------------------------------------------------------

@pytest.mark.parametrize("greeting, permanent", [(421, False), (554, True)])
def test_refusing_greeting_raises(run: Run[Any], sink: Callable[..., SmtpSink], greeting: int,
                                  permanent: bool) -> None:
    server = sink(greeting_code=greeting)
    with pytest.raises(SessionError) as caught:
        run(open_session(server))
    exc = caught.value
    assert (exc.code, exc.permanent, exc.stage) == (greeting, permanent, "greeting")
    assert exc.status == ("4.3.2" if greeting == 421 else "5.3.2")
    if greeting == 554:
        server.wait_until(lambda: "QUIT" in server.verbs())  # RFC 5321 3.1: QUIT after a 554 greeting
    assert server.verbs() == ([] if greeting == 421 else ["QUIT"])


def test_connect_refused_raises(run: Run[Any]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens once it is closed
    with pytest.raises(SessionError) as caught:
        run(OutboundSession.open("mx.test", "127.0.0.1", port, helo_name="relay.test", connect_timeout=2))
    assert (caught.value.stage, caught.value.permanent, caught.value.status) == ("connect", False, "4.4.1")


def test_drop_after_data_defers_and_spoils_the_session(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(drop_after_data=True)

    async def scenario() -> tuple[list[RecipientResult], list[RecipientResult], bool]:
        session = await open_session(server)
        first = await session.send(message("a@x.test", "r550-b@x.test", "c@x.test"))
        usable = session.usable
        second = await session.send(message("a@x.test"))
        await session.close()
        return first, second, usable

    first, second, usable = run(scenario())
    assert codes(first) == [(451, "4.4.2"), (550, "5.1.1"), (451, "4.4.2")]
    assert "lost connection" in first[0].text and first[0].temporary
    assert not usable and codes(second) == [(451, "4.4.2")]
    assert server.wait_for_messages(1)[0].dropped


def test_final_reply_timeout_defers(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(delay_seconds=1.0)

    async def scenario() -> tuple[list[RecipientResult], bool]:
        session = await open_session(server, data_timeout=0.2)
        results = await session.send(message("a@x.test", "b@x.test"))
        usable = session.usable
        await session.close()
        return results, usable

    results, usable = run(scenario())
    assert codes(results) == [(451, "4.4.2")] * 2 and "timed out" in results[0].text
    assert not usable


def test_421_mid_transaction_defers_the_rest(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink(rcpt_rule=lambda a: reply_for(421, "shutting down") if a.startswith("x") else None)

    async def scenario() -> tuple[list[RecipientResult], bool]:
        session = await open_session(server)
        results = await session.send(message("a@x.test", "b@x.test", "x@x.test"))
        usable = session.usable
        await session.close()
        return results, usable

    results, usable = run(scenario())
    assert codes(results) == [(421, "4.3.2")] * 3 and not usable
    assert server.messages == []


def test_concurrent_sessions_are_counted(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    one, two = sink("127.0.0.2"), sink("127.0.0.3")

    async def scenario() -> None:
        sessions = await asyncio.gather(*(open_session(s) for s in (one, one, one, two)))
        assert one.current_connections == 3 and two.current_connections == 1
        results = await asyncio.gather(*(s.send(message(f"u{i}@x.test")) for i, s in enumerate(sessions)))
        assert all(r[0].ok for r in results)
        await asyncio.gather(*(s.close() for s in sessions))

    run(scenario())
    assert one.peak_connections == 3 and two.peak_connections == 1
    assert len(one.wait_for_messages(3)) == 3 and len(two.messages) == 1


# --- TLS -----------------------------------------------------------------------------------

def test_encrypt_without_starttls_fails_temporarily(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    with pytest.raises(SessionError) as caught:
        run(open_session(server, tls="encrypt"))
    exc = caught.value
    assert (exc.status, exc.permanent, exc.stage) == ("4.7.5", False, "starttls") and 400 <= exc.code < 500
    assert "MAIL" not in server.verbs()  # never downgraded


def test_may_without_starttls_stays_plain(run: Run[Any], sink: Callable[..., SmtpSink]) -> None:
    server = sink()
    session, [results] = run(deliver(server, message("a@x.test"), tls="may"))
    assert results[0].ok and not session.tls and not server.messages[0].tls


@pytest.mark.parametrize("tls", ["may", "encrypt"])
def test_starttls(run: Run[Any], sink: Callable[..., SmtpSink], cert: tuple[str, str], tls: str) -> None:
    server = sink(tls_cert=cert)
    session, results = run(deliver(server, message("a@x.test"), message("b@x.test"), tls=tls))
    assert session.tls and all(r.ok for rs in results for r in rs)
    assert server.tls_connections == 1 and all(m.tls for m in server.wait_for_messages(2))
    assert server.verbs() == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]


def test_none_ignores_starttls(run: Run[Any], sink: Callable[..., SmtpSink], cert: tuple[str, str]) -> None:
    server = sink(tls_cert=cert)
    session, _ = run(deliver(server, message("a@x.test"), tls="none"))
    assert not session.tls and server.tls_connections == 0 and "STARTTLS" not in server.verbs()


def test_verify(run: Run[Any], sink: Callable[..., SmtpSink], cert: tuple[str, str]) -> None:
    server = sink(tls_cert=cert)
    trusted = ssl.create_default_context(cafile=cert[0])
    session, [results] = run(deliver(server, message("a@x.test"), tls="verify", ssl_context_verify=trusted))
    assert session.tls and results[0].ok

    async def wrong_name() -> None:
        await OutboundSession.open("other.test", server.address, server.port, helo_name="relay.test",
                                   tls="verify", ssl_context_verify=trusted, command_timeout=5)
    with pytest.raises(SessionError) as caught:
        run(wrong_name())
    assert (caught.value.status, caught.value.stage, caught.value.permanent) == ("4.7.5", "starttls", False)

    with pytest.raises(SessionError) as caught:  # the default CA store does not know our certificate
        run(open_session(server, tls="verify"))
    assert caught.value.status == "4.7.5"


def test_failed_handshake_fails_the_session(run: Run[Any], sink: Callable[..., SmtpSink],
                                            cert: tuple[str, str]) -> None:
    server = sink(tls_cert=cert, starttls_fault="garbage")
    with pytest.raises(SessionError) as caught:
        run(open_session(server, tls="may"))
    exc = caught.value
    assert (exc.status, exc.stage, exc.permanent) == ("4.7.5", "starttls", False) and 400 <= exc.code < 500


def test_replies_injected_before_the_handshake_fail_the_session(run: Run[Any], sink: Callable[..., SmtpSink],
                                                                 cert: tuple[str, str]) -> None:
    server = sink(tls_cert=cert, starttls_fault="inject")
    with pytest.raises(SessionError) as caught:
        run(open_session(server, tls="encrypt"))
    assert caught.value.stage == "starttls" and "injection" in caught.value.text
    assert not caught.value.permanent
