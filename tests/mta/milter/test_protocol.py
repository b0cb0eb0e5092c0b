"""Golden packets for the sans-I/O milter core: every command, every reply, negotiation, malformed input."""

import struct

import pytest

from mta.milter.protocol import (
    ACTIONS_OFFERED,
    MAX_BODY_CHUNK,
    MAX_PACKET,
    NEED_DATA,
    PROTO_OFFERED,
    Action,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    Family,
    InsertHeader,
    LocalProtocolError,
    MilterConnection,
    Negotiated,
    Progress,
    Proto,
    ProtocolError,
    Quarantine,
    ReplaceBody,
    Verdict,
    body_chunks,
    packet,
)


def optneg(actions=ACTIONS_OFFERED, protocol=0, version=6, extra=b""):
    return packet(b"O", struct.pack(">III", version, actions, protocol) + extra)


def negotiated(actions=ACTIONS_OFFERED, protocol=0, extra=b""):
    conn = MilterConnection()
    conn.negotiate()
    conn.receive_data(optneg(actions, protocol, extra=extra))
    assert isinstance(conn.next_event(), Negotiated)
    return conn


def reply(conn, data):
    conn.receive_data(data)
    return conn.next_event()


def test_negotiate_offers_version_6_every_action_and_our_protocol_flags():
    out = MilterConnection().negotiate()
    assert out == b"\x00\x00\x00\x0dO" + struct.pack(">III", 6, 0x1FF, 0x1FF7FF)
    assert Proto.RCPT_REJ not in PROTO_OFFERED


def test_negotiation_reply_with_macro_lists_per_stage():
    conn = MilterConnection()
    conn.negotiate()
    extra = struct.pack(">I", 0) + b"{client_addr} j\0" + struct.pack(">I", 5) + b"i\0"
    conn.receive_data(optneg(Action.ADDHDRS, Proto.NOHELO, extra=extra)[:7])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(optneg(Action.ADDHDRS, Proto.NOHELO, extra=extra)[7:])
    ev = conn.next_event()
    assert ev.version == 6 and ev.actions == Action.ADDHDRS and ev.protocol == Proto.NOHELO
    assert dict(ev.macros) == {0: ("{client_addr}", "j"), 5: ("i",)}  # one-character names travel bare, as Postfix sends them


GOLDEN_COMMANDS = [
    (lambda c: c.connect("c.test", Family.INET, 25, "192.0.2.1"),
     b"\x00\x00\x00\x15Cc.test\x004\x00\x19192.0.2.1\x00"),
    (lambda c: c.connect("c.test", Family.INET6, 587, "2001:db8::1"),
     b"\x00\x00\x00\x17Cc.test\x006\x02\x4b2001:db8::1\x00"),
    (lambda c: c.connect("localhost", Family.UNKNOWN, 0, ""), b"\x00\x00\x00\x0cClocalhost\x00U"),
    (lambda c: c.helo("h.test"), b"\x00\x00\x00\x08Hh.test\x00"),
    (lambda c: c.mail("a@s.test", ("SIZE=10",)), b"\x00\x00\x00\x14M<a@s.test>\x00SIZE=10\x00"),
    (lambda c: c.mail("", ()), b"\x00\x00\x00\x04M<>\x00"),
    (lambda c: c.rcpt("b@r.test"), b"\x00\x00\x00\x0cR<b@r.test>\x00"),
    (lambda c: c.data(), b"\x00\x00\x00\x01T"),
    (lambda c: c.header("Subject", " hi"), b"\x00\x00\x00\x0cLSubject\x00hi\x00"),
    (lambda c: c.end_of_headers(), b"\x00\x00\x00\x01N"),
    (lambda c: c.body(b"line\r\n"), b"\x00\x00\x00\x07Bline\r\n"),
    (lambda c: c.end_of_message(), b"\x00\x00\x00\x01E"),
]


@pytest.mark.parametrize("step,wire", GOLDEN_COMMANDS)
def test_every_step_command_on_the_wire(step, wire):
    conn = negotiated()
    assert step(conn) == wire
    assert conn.awaiting_reply


def test_abort_quit_and_quit_nc_await_nothing():
    conn = negotiated()
    assert conn.abort() == b"\x00\x00\x00\x01A"
    assert conn.quit_nc() == b"\x00\x00\x00\x01K"
    assert conn.quit() == b"\x00\x00\x00\x01Q"
    assert not conn.awaiting_reply


def test_macros_go_in_one_packet_before_their_step():
    conn = negotiated()
    out = conn.data({"i": "Q1", "j": "mx.test"})
    assert out == b"\x00\x00\x00\x11DTi\x00Q1\x00j\x00mx.test\x00" + b"\x00\x00\x00\x01T"


def test_macros_are_filtered_by_the_list_the_milter_asked_for():
    conn = negotiated(extra=struct.pack(">I", 4) + b"{i}\0")
    out = conn.data({"i": "Q1", "j": "mx.test"})
    assert out == b"\x00\x00\x00\x07DTi\x00Q1\x00" + b"\x00\x00\x00\x01T"


# Each step with the flag that skips it and the flag that makes it no-reply.
STEP_FLAGS = [
    (Proto.NOCONNECT, Proto.NR_CONN, lambda c: c.connect("c", Family.UNKNOWN, 0, "")),
    (Proto.NOHELO, Proto.NR_HELO, lambda c: c.helo("h")),
    (Proto.NOMAIL, Proto.NR_MAIL, lambda c: c.mail("a@b")),
    (Proto.NORCPT, Proto.NR_RCPT, lambda c: c.rcpt("a@b")),
    (Proto.NODATA, Proto.NR_DATA, lambda c: c.data()),
    (Proto.NOHDRS, Proto.NR_HDR, lambda c: c.header("A", "b")),
    (Proto.NOEOH, Proto.NR_EOH, lambda c: c.end_of_headers()),
    (Proto.NOBODY, Proto.NR_BODY, lambda c: c.body(b"x")),
]


@pytest.mark.parametrize("skip_flag,no_reply_flag,step", STEP_FLAGS)
def test_a_step_the_milter_does_not_want_is_not_sent(skip_flag, no_reply_flag, step):
    conn = negotiated(protocol=skip_flag)
    assert step(conn) == b""
    assert not conn.awaiting_reply


@pytest.mark.parametrize("skip_flag,no_reply_flag,step", STEP_FLAGS)
def test_a_no_reply_step_is_sent_and_not_waited_for(skip_flag, no_reply_flag, step):
    conn = negotiated(protocol=no_reply_flag)
    assert step(conn) != b""
    assert not conn.awaiting_reply
    with pytest.raises(ProtocolError, match="none was awaited"):
        reply(conn, packet(b"c"))


def test_header_leading_space_is_kept_only_when_negotiated():
    assert negotiated(protocol=Proto.HDR_LEADSPC).header("A", " b") == packet(b"L", b"A\0 b\0")
    assert negotiated().header("A", " b") == packet(b"L", b"A\0b\0")


@pytest.mark.parametrize("code,kind", [
    (b"a", "accept"), (b"c", "continue"), (b"r", "reject"), (b"t", "tempfail"), (b"d", "discard"),
])
def test_simple_replies(code, kind):
    conn = negotiated()
    conn.mail("a@b")
    assert reply(conn, packet(code)) == Verdict(kind)
    assert not conn.awaiting_reply


@pytest.mark.parametrize("text,verdict", [
    (b"550 5.7.1 go away", Verdict("reject", 550, "5.7.1", "go away")),
    (b"451 4.7.1 later\nplease", Verdict("tempfail", 451, "4.7.1", "later please")),
    (b"554 no status", Verdict("reject", 554, "", "no status")),
])
def test_replycode_is_the_milters_own_reply(text, verdict):
    conn = negotiated()
    conn.rcpt("a@b")
    assert reply(conn, packet(b"y", text + b"\0")) == verdict


def test_progress_keeps_the_reply_awaited():
    conn = negotiated()
    conn.end_of_message()
    assert reply(conn, packet(b"p")) == Progress()
    assert conn.awaiting_reply
    assert reply(conn, packet(b"a")) == Verdict("accept")


def test_every_modification_at_end_of_message():
    conn = negotiated()
    conn.end_of_message()
    conn.receive_data(b"".join([
        packet(b"h", b"X-A\0one\0"),
        packet(b"m", struct.pack(">I", 2) + b"Subject\0new\0"),
        packet(b"i", struct.pack(">I", 0) + b"X-Top\0t\0"),
        packet(b"b", b"new body\r\n"),
        packet(b"e", b"<n@s.test>\0BODY=8BITMIME\0"),
        packet(b"+", b"<x@r.test>\0"),
        packet(b"2", b"<y@r.test>\0NOTIFY=NEVER\0"),
        packet(b"-", b"<z@r.test>\0"),
        packet(b"q", b"suspicious\0"),
        packet(b"c"),
    ]))
    events = [conn.next_event() for _ in range(10)]
    assert events == [
        AddHeader("X-A", "one"), ChangeHeader(2, "Subject", "new"), InsertHeader(0, "X-Top", "t"),
        ReplaceBody(b"new body\r\n"), ChangeFrom("<n@s.test>", "BODY=8BITMIME"),
        AddRecipient("<x@r.test>"), AddRecipient("<y@r.test>", "NOTIFY=NEVER"),
        DeleteRecipient("<z@r.test>"), Quarantine("suspicious"), Verdict("continue"),
    ]
    assert conn.next_event() is NEED_DATA and not conn.awaiting_reply


def test_skip_ends_the_body_when_negotiated():
    conn = negotiated(protocol=Proto.SKIP)
    conn.body(b"x")
    assert reply(conn, packet(b"s")) == Verdict("skip")
    assert conn.body(b"more") == b""
    assert conn.end_of_message() == packet(b"E")


def test_body_chunks_are_at_most_65535_octets():
    assert [len(c) for c in body_chunks(b"x" * 140000)] == [65535, 65535, 8930]
    with pytest.raises(LocalProtocolError):
        negotiated().body(b"x" * (MAX_BODY_CHUNK + 1))


MALFORMED = [
    ("zero length", lambda c: c.end_of_message(), b"\x00\x00\x00\x00", "packet of 0"),
    ("oversized", lambda c: c.end_of_message(), struct.pack(">I", MAX_PACKET + 1) + b"h", "packet of"),
    ("unknown reply", lambda c: c.end_of_message(), packet(b"Z"), "unknown reply"),
    ("unterminated", lambda c: c.end_of_message(), packet(b"h", b"X-A\0one"), "unterminated"),
    ("one string", lambda c: c.end_of_message(), packet(b"h", b"X-A\0"), "1 strings"),
    ("empty name", lambda c: c.end_of_message(), packet(b"h", b"\0v\0"), "empty name"),
    ("short index", lambda c: c.end_of_message(), packet(b"m", b"\0\0"), "index"),
    ("modification early", lambda c: c.mail("a@b"), packet(b"h", b"X\0v\0"), "modification"),
    ("skip not negotiated", lambda c: c.body(b"x"), packet(b"s"), "SKIP"),
    ("skip to mail", lambda c: c.mail("a@b"), packet(b"s"), "SKIP"),
    ("2xx reply code", lambda c: c.mail("a@b"), packet(b"y", b"250 ok\0"), "4xx or 5xx"),
    ("accept with data", lambda c: c.mail("a@b"), packet(b"a", b"x"), "with data"),
]


@pytest.mark.parametrize("name,step,data,match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_replies_are_the_milters_protocol_error(name, step, data, match):
    conn = negotiated(protocol=Proto.SKIP if name == "skip to mail" else Proto(0))
    step(conn)
    with pytest.raises(ProtocolError, match=match):
        reply(conn, data)
    with pytest.raises(ProtocolError):  # sticky
        conn.next_event()


def test_modification_not_negotiated_is_a_protocol_error():
    conn = negotiated(actions=Action.ADDHDRS)
    conn.end_of_message()
    conn.receive_data(packet(b"h", b"X\0v\0"))
    assert conn.next_event() == AddHeader("X", "v")
    with pytest.raises(ProtocolError, match="CHGBODY"):
        reply(conn, packet(b"b", b"x"))


@pytest.mark.parametrize("data,match", [
    (optneg(version=7), "version 7"),
    (optneg(version=1), "version 1"),
    (optneg(protocol=Proto.RCPT_REJ), "protocol flags"),
    (optneg(actions=0x200), "actions"),
    (packet(b"O", b"\0\0\0\6"), "at least 12"),
    (optneg(extra=struct.pack(">I", 9) + b"j\0"), "unknown stage"),
    (optneg(extra=struct.pack(">I", 1) + b"j"), "malformed"),
    (packet(b"c"), "answered negotiation"),
])
def test_bad_negotiation_is_a_protocol_error(data, match):
    conn = MilterConnection()
    conn.negotiate()
    with pytest.raises(ProtocolError, match=match):
        reply(conn, data)


def test_steps_out_of_order_are_our_error():
    conn = MilterConnection()
    with pytest.raises(LocalProtocolError):
        conn.helo("h")
    conn.negotiate()
    with pytest.raises(LocalProtocolError):
        conn.helo("h")  # negotiation still awaited
    conn.receive_data(optneg())
    conn.next_event()
    conn.helo("h")
    with pytest.raises(LocalProtocolError):
        conn.mail("a@b")  # HELO's reply still awaited
    with pytest.raises(LocalProtocolError, match="NUL"):
        negotiated().helo("h\0x")
