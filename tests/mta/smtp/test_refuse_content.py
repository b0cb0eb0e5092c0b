"""refuse_content(): the application drops a transfer it cannot hold (the worker's memory budget)."""

from mta.smtp import replies
from tests.mta.smtp.transcript import new_app

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\n"
LINE = b"x" * 998 + b"\r\n"
REFUSED = "451 4.3.1 Error: insufficient system resources, message discarded, try again later"


def reply_lines(out: bytes) -> list[str]:
    return out.decode().split("\r\n")[:-1]


def test_a_refused_data_transfer_is_read_to_its_end_kept_nowhere_and_answered_451() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE + b"DATA\r\n")
    app.feed(LINE * 100)
    assert app.conn.in_transfer and app.conn.held_bytes > 100_000
    assert app.conn.refuse_content(replies.MEMORY_DISCARDED)
    assert app.conn.held_bytes <= 4  # freed at once
    assert not app.conn.refuse_content(replies.MEMORY_DISCARDED)  # already dropped
    for _ in range(100):
        assert app.feed(LINE) == b""
        assert app.conn.held_bytes <= 4 + len(LINE)
    assert reply_lines(app.feed(b".\r\n")) == [REFUSED]
    assert app.messages == []
    # In step: the next command and the next message are fine.
    assert reply_lines(app.feed(b"NOOP\r\n")) == ["250 2.0.0 Ok"]
    app.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    assert reply_lines(app.feed(b"hello\r\n.\r\n")) == ["250 2.0.0 Ok: queued as Q1"]
    assert app.messages[0].data == b"hello\r\n"


def test_an_end_of_data_split_across_the_refusal_still_ends_the_message() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE + b"DATA\r\n")
    app.feed(LINE * 10 + b"\r\n.")  # CRLF "." held back: it may be the end
    assert app.conn.refuse_content(replies.MEMORY_DISCARDED)
    assert reply_lines(app.feed(b"\r\nNOOP\r\n")) == [REFUSED, "250 2.0.0 Ok"]


def test_a_refused_bdat_chunk_is_consumed_and_the_transaction_ends() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE)
    app.feed(b"BDAT 100000 LAST\r\n" + b"y" * 50_000)
    assert app.conn.in_transfer and app.conn.held_bytes >= 50_000
    assert app.conn.refuse_content(replies.MEMORY_DISCARDED)
    assert app.feed(b"y" * 40_000) == b""
    assert app.conn.held_bytes == 0
    # The rest of the chunk and a pipelined NOOP behind it: the chunk is answered, then NOOP.
    assert reply_lines(app.feed(b"y" * 10_000 + b"NOOP\r\n")) == [REFUSED, "250 2.0.0 Ok"]
    assert app.messages == []


def test_bdat_refused_between_chunks_answers_the_next_chunk() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE)
    assert reply_lines(app.feed(b"BDAT 5\r\nhello")) == ["250 2.0.0 Ok: 5 octets received"]
    assert app.conn.in_transfer and app.conn.held_bytes == 5
    assert app.conn.refuse_content(replies.MEMORY_DISCARDED)
    assert app.conn.held_bytes == 0
    assert reply_lines(app.feed(b"BDAT 6 LAST\r\n world")) == [REFUSED]
    # The transaction is over: a further chunk is a sequence error, read and discarded.
    assert reply_lines(app.feed(b"BDAT 3 LAST\r\nabc")) == ["503 5.5.1 Error: need MAIL command"]
    assert app.messages == []


def test_nothing_to_refuse_outside_a_transfer() -> None:
    app, _ = new_app()
    app.feed(ENVELOPE)
    assert not app.conn.in_transfer
    assert not app.conn.refuse_content(replies.MEMORY_DISCARDED)
    app.feed(b"DATA\r\n")
    assert reply_lines(app.feed(b"hi\r\n.\r\n")) == ["250 2.0.0 Ok: queued as Q1"]
