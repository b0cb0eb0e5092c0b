"""The sans-I/O SMTP client core: reply parsing, extensions, parameters, dot-stuffing.

The round-trip tests wire a ClientConnection to our own ServerConnection (through
the transcript App, the real relay policy) with no sockets: what the client stuffs,
the server must unstuff to the same bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.smtp import client, serverreplies
from mta.smtp.client import (
    CLOSED, MESSAGE_TOO_BIG, NEED_DATA, NEEDS_SMTPUTF8, ClientConnection, Extensions, LocalProtocolError,
    ProtocolError, ServerReply, Verb, bad_address, canonical_body, check_message, parse_extensions,
    parse_reply, stuff_body, xtext,
)
from mta.smtp.replies import ReplyClass
from tests.mta.smtp.transcript import new_app

EHLO_ALL = (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
            b"250-DSN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n")


def ready(ehlo: bytes = EHLO_ALL, lmtp: bool = False) -> ClientConnection:
    conn = ClientConnection("relay.test", lmtp=lmtp)
    conn.receive_data(b"220 mx.test ESMTP\r\n")
    assert conn.next_event().code == 220  # type: ignore[union-attr]
    conn.ehlo()
    conn.receive_data(ehlo)
    assert isinstance(conn.next_event(), ServerReply)
    return conn


def replies(conn: ClientConnection) -> list[ServerReply]:
    out = []
    while isinstance(event := conn.next_event(), ServerReply):
        out.append(event)
    return out


# --- reply parsing -----------------------------------------------------------------------

def test_single_line_reply_with_enhanced_status() -> None:
    reply = parse_reply([b"550 5.1.1 <x@y>: Recipient address rejected"])
    assert (reply.code, reply.status, reply.text) == (550, "5.1.1", "<x@y>: Recipient address rejected")
    assert reply.permanent and not reply.temporary and not reply.ok


@pytest.mark.parametrize("code", [200, 220, 250, 299, 354, 421, 450, 550, 554, 599])
def test_ok_is_the_reply_class_rule_for_single_and_multi_line_replies(code: int) -> None:
    """ServerReply keeps `ok` as a value made with the reply (read per command); it is
    ReplyClass.ok's rule, whichever way the reply was parsed."""
    rule = ReplyClass.ok.fget  # type: ignore[attr-defined]
    for lines in ([f"{code} text".encode()], [f"{code}-a".encode(), f"{code} b".encode()]):
        reply = parse_reply(lines, Verb.RCPT)
        assert reply.ok is rule(reply) is (200 <= code < 300)


def test_multi_line_reply_strips_the_status_from_every_line() -> None:
    conn = ready()
    conn.noop()
    conn.receive_data(b"451-4.7.1 first\r\n451-4.7.1 second\r\n451 4.7.1 third\r\n")
    reply = conn.next_event()
    assert isinstance(reply, ServerReply)
    assert (reply.code, reply.status, reply.lines, reply.command) == (451, "4.7.1", ("first", "second", "third"),
                                                                      Verb.NOOP)
    assert reply.text == "first second third" and reply.temporary


def test_reply_without_enhanced_status_or_text() -> None:
    assert parse_reply([b"250"]) == ServerReply(250, "", ("",))
    assert parse_reply([b"250 ok"]).status == ""
    assert parse_reply([b"250 2.0.0"]) == ServerReply(250, "2.0.0", ("",))


def test_enhanced_status_of_another_class_is_text() -> None:
    assert parse_reply([b"250 5.1.1 odd"]) == ServerReply(250, "", ("5.1.1 odd",))
    assert parse_reply([b"450 4.2.0x"]).status == ""


def test_reply_split_anywhere_and_bare_lf_line_ends() -> None:
    conn = ready()
    conn.noop()
    for byte in b"250-2.0.0 a\n250 2.0.0 b\r\n":
        assert conn.next_event() is NEED_DATA
        conn.receive_data(bytes([byte]))
    reply = conn.next_event()
    assert isinstance(reply, ServerReply) and reply.lines == ("a", "b")


def test_control_characters_in_text_are_replaced() -> None:
    assert parse_reply([b"550 5.7.1 bad\x1b[31m\x00 \xff"]).text == "bad?[31m? \ufffd"


@pytest.mark.parametrize("lines", [
    [b"25 ok"], [b"2500 ok"], [b"abc ok"], [b"150 ok"], [b"650 ok"], [b"250ok"], [b" 250 ok"],
    [b"250-a", b"251 b"], [b"250 a", b"250 b"], [b"250-a"], [],
])
def test_malformed_replies_are_protocol_errors(lines: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(lines)


def test_protocol_errors_are_sticky() -> None:
    conn = ready()
    conn.noop()
    conn.receive_data(b"hello there\r\n250 ok\r\n")
    with pytest.raises(ProtocolError):
        conn.next_event()
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_reply_with_no_command_outstanding_is_a_protocol_error() -> None:
    conn = ready()
    conn.receive_data(b"250 2.0.0 extra\r\n")
    with pytest.raises(ProtocolError, match="no command outstanding"):
        conn.next_event()


@pytest.mark.parametrize("verb, reply", [("mail", b"354 go ahead\r\n"), ("data", b"250 ok\r\n")])
def test_reply_of_the_wrong_class_is_a_protocol_error(verb: str, reply: bytes) -> None:
    conn = ready()
    conn.mail_from("a@b.test")
    if verb == "data":
        conn.receive_data(b"250 ok\r\n")
        conn.next_event()
        conn.data()
    conn.receive_data(reply)
    with pytest.raises(ProtocolError, match="unexpected reply"):
        conn.next_event()


def test_overlong_line_and_too_many_lines_are_protocol_errors() -> None:
    conn = ready()
    conn.noop()
    conn.receive_data(b"250 " + b"x" * 5000)
    with pytest.raises(ProtocolError, match="longer than"):
        conn.next_event()
    conn = ready()
    conn.noop()
    conn.receive_data(b"250-x\r\n" * 300)
    with pytest.raises(ProtocolError, match="lines"):
        conn.next_event()


def test_eof_gives_closed_after_the_buffered_replies() -> None:
    conn = ClientConnection("relay.test")
    conn.receive_data(b"421 4.3.2 going away\r\n250 half")
    conn.receive_eof()
    reply = conn.next_event()
    assert isinstance(reply, ServerReply) and reply.code == 421 and reply.command is Verb.GREETING
    assert conn.next_event() is CLOSED
    assert not conn.greeted


# --- extensions and hello ------------------------------------------------------------------

def test_ehlo_extensions() -> None:
    conn = ready()
    ext = conn.extensions
    for keyword in ("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "STARTTLS", "ENHANCEDSTATUSCODES", "CHUNKING"):
        assert keyword in ext
    assert ext.max_size == 1000 and conn.pipelining and conn.esmtp and conn.helo_done


def test_extension_parsing_edge_cases() -> None:
    ext = parse_extensions(("mx.test says hi", "size 0", "auth=login plain", "  x-Custom  a b ", "", "8bitmime"))
    assert ext.keywords == {"SIZE": "0", "X-CUSTOM": "a b", "8BITMIME": ""}
    assert ext.max_size is None  # SIZE 0: no fixed limit
    assert Extensions({"SIZE": "lots"}).max_size is None
    assert Extensions({}).max_size is None


def test_helo_fallback_forgets_extensions() -> None:
    conn = ClientConnection("relay.test")
    conn.receive_data(b"220 old.test\r\n")
    conn.next_event()
    assert conn.ehlo() == b"EHLO relay.test\r\n"
    conn.receive_data(b"502 5.5.2 what\r\n")
    assert conn.next_event().code == 502  # type: ignore[union-attr]
    assert not conn.helo_done
    assert conn.helo() == b"HELO relay.test\r\n"
    conn.receive_data(b"250 old.test\r\n")
    reply = conn.next_event()
    assert isinstance(reply, ServerReply) and reply.command is Verb.HELO
    assert conn.helo_done and not conn.esmtp and not conn.pipelining
    assert conn.mail_from("a@b.test", size=10, body_type="8BITMIME") == b"MAIL FROM:<a@b.test>\r\n"


def test_lmtp_says_lhlo_and_has_no_helo() -> None:
    conn = ClientConnection("relay.test", lmtp=True)
    conn.receive_data(b"220 lmtp.test LMTP\r\n")
    conn.next_event()
    assert conn.ehlo() == b"LHLO relay.test\r\n"
    with pytest.raises(LocalProtocolError):
        conn.helo()


def test_commands_before_the_greeting_or_hello_are_our_bug() -> None:
    conn = ClientConnection("relay.test")
    with pytest.raises(LocalProtocolError):
        conn.ehlo()
    conn.receive_data(b"220 mx.test\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.mail_from("a@b.test")


# --- STARTTLS ------------------------------------------------------------------------------

def test_starttls_forgets_extensions_until_ehlo_again() -> None:
    conn = ready()
    assert conn.starttls() == b"STARTTLS\r\n"
    with pytest.raises(LocalProtocolError):
        conn.mail_from("a@b.test")
    conn.receive_data(b"220 2.0.0 go ahead\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.ehlo()  # not before the handshake
    conn.tls_established()
    assert conn.tls and not conn.helo_done and conn.extensions == Extensions({})
    with pytest.raises(LocalProtocolError):
        conn.mail_from("a@b.test")
    conn.ehlo()
    conn.receive_data(b"250-mx.test\r\n250 SIZE 5\r\n")
    conn.next_event()
    assert conn.extensions.max_size == 5
    with pytest.raises(LocalProtocolError):
        conn.starttls()


def test_bytes_after_the_starttls_220_are_an_injection() -> None:
    conn = ready()
    conn.starttls()
    conn.receive_data(b"220 2.0.0 go ahead\r\n250-mx.test\r\n250 PIPELINING\r\n")
    with pytest.raises(ProtocolError, match="injection"):
        conn.next_event()


def test_starttls_only_when_offered() -> None:
    conn = ready(b"250-mx.test\r\n250 PIPELINING\r\n")
    with pytest.raises(LocalProtocolError):
        conn.starttls()


# --- MAIL and RCPT parameters ------------------------------------------------------------

def test_mail_and_rcpt_parameters_when_advertised() -> None:
    conn = ready()
    line = conn.mail_from("a@b.test", size=100, body_type="8bitmime", smtputf8=True, ret="hdrs", envid="q+1 =x")
    assert line == b"MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=q+2B1+20+3Dx\r\n"
    assert conn.rcpt_to("c@d.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;C@d.test") == \
        b"RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;C@d.test\r\n"
    assert conn.rcpt_to("ü@d.test", notify=("NEVER",), orcpt="rfc822;ü@d.test") == \
        "RCPT TO:<ü@d.test> NOTIFY=NEVER\r\n".encode()  # no xtext form for non-ASCII: ORCPT left out


def test_parameters_left_out_when_not_advertised() -> None:
    conn = ready(b"250-mx.test\r\n250 PIPELINING\r\n")
    assert conn.mail_from("", size=100, body_type="8BITMIME", ret="FULL", envid="x") == b"MAIL FROM:<>\r\n"
    assert conn.rcpt_to("c@d.test", notify=("NEVER",), orcpt="rfc822;c@d.test") == b"RCPT TO:<c@d.test>\r\n"
    conn = ready(b"250-mx.test\r\n250 PIPELINING\r\n")
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        conn.mail_from("a@b.test", smtputf8=True)


@pytest.mark.parametrize("address", ["a@b.test>\r\nRCPT TO:<evil@x", "a\n@b", "a@b\x00", "a>b@c", "<a@b>"])
def test_addresses_that_would_break_the_command_line(address: str) -> None:
    assert bad_address(address) is not None
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.mail_from(address)


def test_quoted_local_part_may_hold_angle_brackets() -> None:
    assert bad_address('"a>b"@c.test') is None
    assert bad_address("ü@c.test") is None
    conn = ready()
    conn.mail_from("a@b.test")
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        conn.rcpt_to("ü@c.test")


def test_xtext() -> None:
    assert xtext("abc") == "abc"
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") is None


def test_check_message() -> None:
    ext = parse_extensions(("mx", "SIZE 100", "SMTPUTF8"))
    assert check_message(ext, 100, smtputf8=True) is None
    assert check_message(ext, 101, smtputf8=False) is MESSAGE_TOO_BIG
    assert check_message(parse_extensions(("mx",)), 10**9, smtputf8=True) is NEEDS_SMTPUTF8
    assert check_message(parse_extensions(("mx",)), 10**9, smtputf8=False) is None
    assert (MESSAGE_TOO_BIG.code, MESSAGE_TOO_BIG.status) == (552, "5.3.4")
    assert (NEEDS_SMTPUTF8.code, NEEDS_SMTPUTF8.status) == (553, "5.6.7")


# --- transactions ------------------------------------------------------------------------

def test_pipelined_replies_are_matched_in_order() -> None:
    conn = ready()
    conn.mail_from("a@b.test")
    conn.rcpt_to("c@d.test")
    conn.rcpt_to("e@d.test")
    conn.data()
    assert conn.awaiting == (Verb.MAIL, Verb.RCPT, Verb.RCPT, Verb.DATA)
    conn.receive_data(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n354 go\r\n")
    got = replies(conn)
    assert [(r.command, r.code) for r in got] == [(Verb.MAIL, 250), (Verb.RCPT, 550), (Verb.RCPT, 250),
                                                  (Verb.DATA, 354)]
    assert conn.accepted == 1
    assert conn.message_body(b"hi\r\n") == b"hi\r\n.\r\n"
    assert tuple(conn.awaiting) == (Verb.DOT,)
    conn.receive_data(b"250 2.0.0 queued\r\n")
    assert replies(conn)[0].command is Verb.DOT
    assert conn.accepted == 0 and tuple(conn.awaiting) == ()
    conn.mail_from("a@b.test")  # the next transaction


LINE_TEXT = st.tuples(
    st.sampled_from([b"250", b"421", b"550", b"25", b"2500", b"abc", b""]),
    st.sampled_from([b" ", b"-", b"", b"x"]),
    st.sampled_from([b"", b"2", b"2.", b"2.1.0", b"2.1.0 ok", b"2.1.0  two", b"5.1.1 no", b"4.7.1", b"2.1.0x",
                     b"2.1234.0 x", b"ok \x1b[31m", b"\xff\x00", b"\xe2\x80\xa8 sep", b"\x7f", b"text " * 3]),
).map(b"".join)


def test_a_reply_line_seen_before_answers_the_command_it_now_answers() -> None:
    """Single-line replies are parsed once and kept (client._PARSED): the same line to
    another command is that command's reply, and of the wrong class still an error."""
    conn = ready()
    for _ in range(2):
        conn.mail_from("a@b.test")
        conn.rcpt_to("c@d.test")
        conn.data()
        conn.receive_data(b"250 2.0.0 ok\r\n250 2.0.0 ok\r\n354 go\r\n")
        got = replies(conn)
        assert [(r.command, r.code, r.status, r.text) for r in got] == [
            (Verb.MAIL, 250, "2.0.0", "ok"), (Verb.RCPT, 250, "2.0.0", "ok"), (Verb.DATA, 354, "", "go")]
        conn.message_body(b"hi\r\n")
        conn.receive_data(b"250 2.0.0 ok\r\n")
        assert replies(conn)[0].command is Verb.DOT
    conn.mail_from("a@b.test")
    conn.receive_data(b"250 2.0.0 ok\r\n")
    conn.next_event()
    conn.data()
    conn.receive_data(b"250 2.0.0 ok\r\n")  # seen before, but no reply DATA may get
    with pytest.raises(ProtocolError, match="unexpected reply to DATA"):
        conn.next_event()


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=30), LINE_TEXT))
def test_single_line_replies_parse_as_the_general_parser_does(raw: bytes) -> None:
    def parsed(parse):  # type: ignore[no-untyped-def]
        try:
            return parse()
        except ProtocolError as exc:
            return str(exc)
    assert parsed(lambda: serverreplies._parse_line(raw, Verb.DOT)) == parsed(lambda: serverreplies._parse_lines([raw], Verb.DOT))


def test_the_parsed_reply_cache_stays_bounded() -> None:
    conn = ready()
    for i in range(client.MAX_PARSED + 10):
        conn.noop()
        conn.receive_data(b"250 2.0.0 ok %d\r\n" % i)
        assert conn.next_event().text == f"ok {i}"  # type: ignore[union-attr]
        assert 0 < len(client._PARSED) <= client.MAX_PARSED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"250 2.1.0 ok", b"250 ok", b"250", b"250 5.1.1 odd", b"250 2.0.0 a\x1bb\xff",
                                 b"250-multi", b"450 4.2.0 later"]), min_size=1, max_size=12))
def test_cached_replies_equal_fresh_parses(lines: list[bytes]) -> None:
    conn = ready()
    for line in lines * 2:
        conn.noop()
        if line.startswith(b"250-"):
            conn.receive_data(line + b"\r\n250 end\r\n")
            expected = parse_reply([line, b"250 end"], Verb.NOOP)
        else:
            conn.receive_data(line + b"\r\n")
            expected = parse_reply([line], Verb.NOOP)
        assert conn.next_event() == expected


def test_lmtp_expects_one_reply_per_accepted_recipient() -> None:
    conn = ready(lmtp=True)
    conn.mail_from("a@b.test")
    for rcpt in ("x@d", "y@d", "z@d"):
        conn.rcpt_to(rcpt)
    conn.data()
    conn.receive_data(b"250 ok\r\n250 ok\r\n450 4.2.1 busy\r\n250 ok\r\n354 go\r\n")
    replies(conn)
    conn.message_body(b"x")
    assert conn.awaiting == (Verb.DOT, Verb.DOT)


def test_lmtp_354_without_a_recipient_is_a_protocol_error() -> None:
    conn = ready(lmtp=True)
    conn.mail_from("a@b.test")
    conn.rcpt_to("x@d")
    conn.data()
    conn.receive_data(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    with pytest.raises(ProtocolError, match="RFC 2033"):
        replies(conn)


def test_body_only_after_354_and_mail_only_outside_a_transaction() -> None:
    conn = ready()
    conn.mail_from("a@b.test")
    with pytest.raises(LocalProtocolError):
        conn.mail_from("a@b.test")
    conn.rcpt_to("c@d")
    conn.data()
    with pytest.raises(LocalProtocolError):
        conn.message_body(b"x")
    conn.receive_data(b"250 ok\r\n250 ok\r\n554 5.5.1 no\r\n")
    replies(conn)
    with pytest.raises(LocalProtocolError):
        conn.message_body(b"x")
    conn.rset()
    conn.receive_data(b"250 2.0.0 ok\r\n")
    replies(conn)
    conn.mail_from("a@b.test")


def test_next_mail_may_follow_the_content_with_pipelining() -> None:
    conn = ready()
    conn.mail_from("a@b.test")
    conn.rcpt_to("c@d.test")
    conn.data()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    replies(conn)
    conn.message_body(b"one\r\n")
    conn.mail_from("e@b.test")  # before the reply to the final dot (RFC 2920 3.1)
    conn.rcpt_to("f@d.test")
    conn.rcpt_to("g@d.test")
    conn.data()
    assert conn.awaiting == (Verb.DOT, Verb.MAIL, Verb.RCPT, Verb.RCPT, Verb.DATA)
    conn.receive_data(b"250 2.0.0 one queued\r\n250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    got = replies(conn)
    assert [(r.command, r.code) for r in got] == [(Verb.DOT, 250), (Verb.MAIL, 250), (Verb.RCPT, 250),
                                                  (Verb.RCPT, 550), (Verb.DATA, 354)]
    assert conn.accepted == 1  # the second transaction's, not reset by the first one's dot
    assert conn.message_body(b"two\r\n") == b"two\r\n.\r\n"


def test_next_mail_waits_for_the_final_reply_without_pipelining() -> None:
    conn = ready(ehlo=b"250-mx.test\r\n250 SIZE 1000\r\n")
    conn.mail_from("a@b.test")
    conn.receive_data(b"250 ok\r\n")
    conn.rcpt_to("c@d.test")
    conn.receive_data(b"250 ok\r\n")
    conn.data()
    conn.receive_data(b"354 go\r\n")
    replies(conn)
    conn.message_body(b"one\r\n")
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        conn.mail_from("e@b.test")
    conn.receive_data(b"250 queued\r\n")
    replies(conn)
    conn.mail_from("e@b.test")


# --- dot-stuffing ---------------------------------------------------------------------------

@pytest.mark.parametrize("body, wire", [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".a\r\n", b"..a\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n..b\r\n.", b"a\r\n...b\r\n..\r\n.\r\n"),
    (b"a\n.b\n", b"a\r\n..b\r\n.\r\n"),  # bare LF: CRLF on the wire, and the dot is at a line start
    (b"a\r.b\r", b"a\r\n..b\r\n.\r\n"),  # bare CR likewise
    (b"a\r\r\nb\n\r", b"a\r\n\r\nb\r\n\r\n.\r\n"),
    (b"a\r\n\r\n.\r\n", b"a\r\n\r\n..\r\n.\r\n"),  # a smuggled end of data stays content
])
def test_stuffing(body: bytes, wire: bytes) -> None:
    assert stuff_body(body) == wire


def test_canonical_body_is_what_size_counts() -> None:
    assert canonical_body(b"a\nb") == b"a\r\nb\r\n"
    assert canonical_body(b"") == b""
    body = b"x\r\n" * 10
    assert canonical_body(body) is body  # no copy when nothing changes


def unstuff(wire: bytes) -> bytes:
    """The receiver's side, as mta/smtp/server.py does it."""
    content = b"\r\n" + wire
    end = content.find(b"\r\n.\r\n")
    assert end == len(content) - 5, "the end of data appears before the end"
    return content[: end + 2].replace(b"\r\n.", b"\r\n")[2:]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\r\n.\r\n", b"\x00", b"\xff"]),
                max_size=30).map(b"".join))
def test_stuffing_round_trip(body: bytes) -> None:
    wire = stuff_body(body)
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")  # no bare CR or LF
    assert unstuff(wire) == canonical_body(body)
    assert canonical_body(body).replace(b"\r\n", b"") == body.replace(b"\r\n", b"").replace(b"\r", b"").replace(
        b"\n", b"")  # only line ends change


# --- against our own server core, no sockets ------------------------------------------------

def converse(bodies: list[bytes]) -> tuple[list[ServerReply], list[bytes]]:
    """Deliver each body to the sans-I/O server, pipelined; return the replies and what it stored."""
    app, greeting = new_app(max_message_bytes=100_000)
    conn = ClientConnection("relay.test")
    got: list[ServerReply] = []

    def exchange(out: bytes, expect: int) -> None:
        conn.receive_data(app.feed(out))
        for _ in range(expect):
            event = conn.next_event()
            assert isinstance(event, ServerReply), event
            got.append(event)

    conn.receive_data(greeting)
    got.append(conn.next_event())  # type: ignore[arg-type]
    exchange(conn.ehlo(), 1)
    assert conn.pipelining
    for body in bodies:
        wire = (conn.mail_from("a@relay.test", size=len(canonical_body(body)))
                + conn.rcpt_to("b@local.test") + conn.rcpt_to("c@nowhere.test") + conn.data())
        exchange(wire, 4)
        exchange(conn.message_body(body), 1)
    exchange(conn.quit(), 1)
    return got, [m.data for m in app.messages]


def test_round_trip_through_the_server_core() -> None:
    bodies = [b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n.\r\nend", b"", b"bare\nlf\rcr\r\n.\n"]
    got, stored = converse(bodies)
    assert stored == [canonical_body(b) for b in bodies]
    codes = [(r.command, r.code) for r in got]
    assert codes[:2] == [(Verb.GREETING, 220), (Verb.EHLO, 250)]
    assert codes[2:7] == [(Verb.MAIL, 250), (Verb.RCPT, 250), (Verb.RCPT, 554), (Verb.DATA, 354), (Verb.DOT, 250)]
    assert codes[-1] == (Verb.QUIT, 221)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"Received: x\r\n"]),
                max_size=20).map(b"".join))
def test_any_body_survives_the_server_core(body: bytes) -> None:
    _, stored = converse([body])
    assert stored == [canonical_body(body)]


# --- fuzzing: only ProtocolError ------------------------------------------------------------

def primed() -> ClientConnection:
    """A connection awaiting many replies of every kind."""
    conn = ready()
    conn.mail_from("a@b.test")
    for _ in range(20):
        conn.rcpt_to("c@d.test")
    conn.data()
    for _ in range(20):
        conn.noop()
    return conn


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=1, max_value=300), max_size=20), st.booleans())
def test_reply_parser_raises_only_protocol_error(data: bytes, cuts: list[int], eof: bool) -> None:
    conn = primed()
    pos = 0
    try:
        for cut in cuts + [len(data)]:
            conn.receive_data(data[pos:pos + cut])
            pos += cut
            while isinstance(conn.next_event(), ServerReply):
                pass
        if eof:
            conn.receive_eof()
            while isinstance(conn.next_event(), ServerReply):
                pass
    except ProtocolError:
        pass  # the peer's fault, reported as such


LINE = st.tuples(
    st.sampled_from([b"250", b"354", b"421", b"550", b"199", b"25", b"2500", b"abc", b""]),
    st.sampled_from([b" ", b"-", b"", b"x"]),
    st.sampled_from([b"", b"2.1.0 ok", b"5.1.1 no", b"4.7.1", b"\xff\x00", b"text " * 3]),
    st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(st.lists(LINE, max_size=40))
def test_reply_like_lines_raise_only_protocol_error(lines: list[bytes]) -> None:
    conn = primed()
    conn.receive_data(b"".join(lines))
    try:
        while isinstance(event := conn.next_event(), ServerReply):
            assert event.code // 100 in (2, 3, 4, 5)
    except ProtocolError:
        pass  # the peer's fault, reported as such
