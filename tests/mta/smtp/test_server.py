"""Server-core behaviour that is clearer as code than as a transcript."""

from mta.smtp import replies
from mta.smtp.states import State
from tests.mta.smtp.transcript import new_app

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\n"


def reply_lines(out: bytes) -> list[str]:
    return out.decode().split("\r\n")[:-1]


def test_at_least_100_recipients_then_452() -> None:
    app, _ = new_app()
    app.feed(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    rcpts = b"".join(b"RCPT TO:<u%d@local.test>\r\n" % i for i in range(101))
    lines = reply_lines(app.feed(rcpts))
    assert lines[:100] == ["250 2.1.5 Ok"] * 100
    assert lines[100] == "452 4.5.3 Error: too many recipients"
    lines = reply_lines(app.feed(b"DATA\r\n"))
    assert lines == ["354 End data with <CR><LF>.<CR><LF>"]
    app.feed(b"x\r\n.\r\n")
    assert len(app.messages[0].recipients) == 100


def _hops(n: int) -> bytes:
    return b"".join(b"Received: from h%d by h%d; Sun, 29 Nov 2026 00:00:00 +0000\r\n" % (i, i) for i in range(n))


def test_hop_count_over_50_is_554_after_data() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE)
    app.feed(b"DATA\r\n")
    assert reply_lines(app.feed(_hops(51) + b"\r\nbody\r\n.\r\n")) == [
        "554 5.4.6 Error: too many hops (Received headers)"]
    assert app.messages == []
    # 50 is still fine, and Received: lines in the body do not count.
    app.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    out = app.feed(_hops(50) + b"\r\n" + _hops(10) + b".\r\n")
    assert reply_lines(out) == ["250 2.0.0 Ok: queued as Q1"]


def test_hops_count_in_any_case_with_obsolete_space_and_without_a_body() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE + b"DATA\r\n")
    hops = b"".join(b"%s : from h%d\r\n" % (b"RECEIVED" if i % 2 else b"received", i) for i in range(51))
    assert reply_lines(app.feed(b"Subject: x\r\n" + hops + b".\r\n")) == [
        "554 5.4.6 Error: too many hops (Received headers)"]
    app.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    # Received-SPF is another field; 50 Received fields with the first on line one pass.
    out = app.feed(_hops(50) + b"Received-SPF: pass\r\n.\r\n")
    assert reply_lines(out) == ["250 2.0.0 Ok: queued as Q1"]


def test_oversized_data_is_discarded_while_streaming() -> None:
    app, _ = new_app(max_message_bytes=10_000)
    app.feed(ENVELOPE + b"DATA\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(200):  # 200 KB, twenty times the limit
        assert app.feed(line) == b""
        assert app.conn.buffered_bytes < 20_000  # memory stays bounded
    assert reply_lines(app.feed(b".\r\n")) == ["552 5.3.4 Error: message size exceeds fixed limit"]
    assert reply_lines(app.feed(b"NOOP\r\n")) == ["250 2.0.0 Ok"]


def test_timeout_and_refusal_close_with_421() -> None:
    app, _ = new_app()
    app.conn.close_with(replies.timeout("mx.test"))
    assert reply_lines(app.conn.data_to_send()) == ["421 4.4.2 mx.test Error: timeout exceeded, closing connection"]
    assert app.conn.state is State.CLOSED
    app.conn.receive_data(b"NOOP\r\n")
    app.pump()
    assert app.closed and app.conn.data_to_send() == b""


def test_decisions_pause_the_pipeline() -> None:
    """While the application has not answered, later commands wait (replies stay in order)."""
    app, _ = new_app()
    conn = app.conn
    conn.receive_data(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
    event = conn.next_event()
    assert type(event).__name__ == "MailFrom"
    assert repr(conn.next_event()) == "PAUSED"
    assert reply_lines(conn.data_to_send())[-1] == "250 DSN"  # EHLO answered, NOOP not yet
    conn.reply(replies.Reply(451, "4.3.0", "try later"))
    assert repr(conn.next_event()) == "NEED_DATA"
    assert reply_lines(conn.data_to_send()) == ["451 4.3.0 try later", "250 2.0.0 Ok"]


def test_our_queue_trouble_does_not_count_as_client_errors() -> None:
    app, _ = new_app(max_errors=3)
    conn = app.conn
    app.feed(b"EHLO c.test\r\n")
    for _ in range(5):  # five messages refused because *our* queue is full
        conn.receive_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
        app.pump()
        conn.data_to_send()
        conn.receive_data(b"x\r\n.\r\n")
        assert type(conn.next_event()).__name__ == "Message"
        conn.reply(replies.QUEUE_FULL)
        assert reply_lines(conn.data_to_send()) == ["452 4.3.1 Error: insufficient system storage, try again later"]
    assert conn.state is State.READY
    assert reply_lines(app.feed(b"FOO\r\nBAR\r\nBAZ\r\n"))[-1].startswith("421 4.7.0")  # the client's own do


def test_an_overlong_sasl_response_split_over_reads_ends_the_exchange() -> None:
    from tests.mta.smtp.transcript import new_app
    app, _ = new_app(tls=True, auth_mechanisms=("LOGIN",))
    assert app.feed(b"EHLO c.test\r\n").startswith(b"250-")
    assert app.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert app.feed(b"A" * 13000) == b""  # no line end yet: discarded while it streams
    assert app.feed(b"AAAA\r\n").startswith(b"500 5.5.2")
    assert app.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"  # a command again, not a SASL response


def test_every_command_has_its_handler() -> None:
    """_dispatch looks commands up by class: one parse_command may return and no handler
    takes would raise KeyError mid-session (BDAT and AUTH are handled before the table)."""
    import typing

    from mta.smtp import commands, server
    handled = set(server._ON_COMMAND) | {commands.Bdat, commands.Auth}
    assert handled == set(typing.get_args(commands.Command))
