"""Batch SMTP (mta/bsmtp.py): what `mta queue export` writes reads back as the same
envelopes and bytes; plain BSMTP (no record of ours, LF line ends, written by hand)
reads as its commands say; an edited or broken message is refused by itself."""

from __future__ import annotations

import io

import pytest

from mta import bsmtp
from mta.smtp.commands import MailFrom, RcptTo, parse_command
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, Recipient

LIMIT = 10 * 1024 * 1024


def envelope(n: int, body: bytes, **fields: object) -> Envelope:
    base: dict[str, object] = dict(id=MessageId(f"{n:021X}"), sender="s@client.test",
                                   recipients=[Recipient("a@x.test")], size=len(body), arrival=1000.0 + n,
                                   next_attempt=2000.5 + n)
    return Envelope(**(base | fields))  # type: ignore[arg-type]


EVERY_FIELD = [
    # DSN parameters of every kind, every recipient state, attempts and replies, priority, the client
    (envelope(1, b"Subject: one\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast\r\n", recipients=[
        Recipient("a@x.test", ("SUCCESS", "DELAY"), "rfc822;orig+tag=1@x.test", "deferred", 3, "451 4.3.0 later"),
        Recipient("b@x.test", ("NEVER",), None, "held", 0, None),
        Recipient("c@y.test", None, "rfc822;list@y.test", "ready", 1, "421 4.4.2 dropped"),
        Recipient("d@y.test", ("FAILURE",), None, "delivered", 1, "250 2.0.0 ok"),
        Recipient("e@z.test", None, None, "bounced", 2, "550 5.1.1 no such user"),
    ], priority=5, attempts=4, ret="HDRS", envid="batch 7+x=y", body_type="8BITMIME",
        client={"ip": "192.0.2.1", "port": 4242, "helo": "c.test", "tls": {"version": "TLSv1.3"}, "user": None}),
     b"Subject: one\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast\r\n"),
    # SMTPUTF8: UTF-8 in both addresses
    (envelope(2, "Subject: é\r\n\r\nbody ü\r\n".encode(), sender="jöran@bücher.test",
              recipients=[Recipient("ñandú@exämple.test", ("SUCCESS",))], smtputf8=True, ret="FULL",
              body_type="8BITMIME"),
     "Subject: é\r\n\r\nbody ü\r\n".encode()),
    # the null sender (a bounce), content with no final CRLF and a bare LF: BDAT carries it exactly
    (envelope(3, b"no final line end\nbare LF\rbare CR", sender=""), b"no final line end\nbare LF\rbare CR"),
    # many recipients: the record takes several NOOP lines
    (envelope(4, b"x\r\n", recipients=[Recipient(f"user{i}@many.test", ("SUCCESS", "FAILURE"),
                                                 f"rfc822;user{i}@alias.test", "deferred", i, f"451 4.7.1 try {i}")
                                       for i in range(60)]), b"x\r\n"),
    # an empty body
    (envelope(5, b""), b""),
]


def batch(items: list[tuple[Envelope, bytes]]) -> bytes:
    return bsmtp.header("mx.test") + b"".join(b"".join(bsmtp.message(e, b)) for e, b in items) + bsmtp.trailer()


def read(data: bytes) -> list[bsmtp.BatchMessage | bsmtp.BatchError]:
    return list(bsmtp.read(io.BytesIO(data), LIMIT))


def test_every_envelope_field_and_byte_of_content_round_trips() -> None:
    data = batch(EVERY_FIELD)
    got = read(data)
    assert [type(g) for g in got] == [bsmtp.BatchMessage] * len(EVERY_FIELD)
    for (want, body), message in zip(EVERY_FIELD, got):
        assert isinstance(message, bsmtp.BatchMessage)
        assert message.record == want
        assert message.body == body
    first = got[0]
    assert isinstance(first, bsmtp.BatchMessage)
    # The commands say what a plain reader needs: only the recipients still queued, with their DSN parameters.
    assert first.commands == [
        "MAIL FROM:<s@client.test> SIZE=46 BODY=8BITMIME RET=HDRS ENVID=batch+207+2Bx+3Dy",
        "RCPT TO:<a@x.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;orig+2Btag+3D1@x.test",
        "RCPT TO:<b@x.test> NOTIFY=NEVER",
        "RCPT TO:<c@y.test> ORCPT=rfc822;list@y.test",
    ]
    assert first.mail.envid == "batch 7+x=y" and first.rcpts[0].orcpt == "rfc822;orig+tag=1@x.test"


def test_the_file_is_valid_smtp_line_by_line() -> None:
    """Every command line parses as our SMTP server parses it and stays under 512 octets;
    dot-stuffing is on the wire; each message starts with its NOOP lines."""
    data = batch(EVERY_FIELD[:2] + EVERY_FIELD[3:])  # (the BDAT message's bytes are not lines)
    lines = data.split(b"\r\n")
    assert lines[0] == b"EHLO mx.test" and lines[-2:] == [b"QUIT", b""]
    in_data, utf8 = False, False
    for raw in lines[1:-2]:
        if in_data:
            assert raw == b"." or not raw.startswith(b".") or raw.startswith(b"..")
            in_data = raw != b"."
            continue
        assert len(raw) + 2 <= 512, raw[:60]
        command = parse_command(raw.decode("utf-8"), utf8=utf8)
        assert not hasattr(command, "code"), (raw, command)
        utf8 = command.smtputf8 if isinstance(command, MailFrom) else utf8
        in_data = raw == b"DATA"
    assert b"\r\n...leading dot\r\n" not in data and b"\r\n..leading dot\r\n...two\r\n..\r\nlast\r\n." in data
    assert data.count(b"NOOP XMTA-ENVELOPE ") > len(EVERY_FIELD)  # the 60-recipient record takes several


def test_a_finished_message_is_not_written() -> None:
    done = envelope(9, b"x\r\n", recipients=[Recipient("a@x.test", state="delivered")])
    assert bsmtp.message(done, b"x\r\n") == []


def test_hand_written_plain_bsmtp_with_lf_line_ends() -> None:
    data = (b"HELO old.test\n"
            b"MAIL FROM:<a@b.test> RET=FULL ENVID=q+2B1 BODY=7BIT\n"
            b"RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.test\n"
            b"rcpt to:<e@d.test>\n"
            b"DATA\n"
            b"Subject: hi\n\n..dot\nend\n.\n"
            b"\n"
            b"MAIL FROM:<>\nRCPT TO:<f@d.test>\nDATA\nbounce\n.\nQUIT\nignored after QUIT\n")
    first, second = read(data)
    assert isinstance(first, bsmtp.BatchMessage) and isinstance(second, bsmtp.BatchMessage)
    assert first.record is None and first.helo == "old.test" and first.line == 2
    assert (first.mail.address.text, first.mail.ret, first.mail.envid, first.mail.body) == ("a@b.test", "FULL", "q+1", "7BIT")
    assert [(r.address.text, r.notify, r.orcpt) for r in first.rcpts] == [
        ("c@d.test", ("SUCCESS", "FAILURE"), "rfc822;c+x@d.test"), ("e@d.test", None, None)]
    assert first.body == b"Subject: hi\r\n\r\n.dot\r\nend\r\n"
    assert second.mail.address.text == "" and second.body == b"bounce\r\n" and second.line == 12


def test_an_edited_message_is_refused_and_the_others_read() -> None:
    data = batch(EVERY_FIELD[:2]).replace(b"RCPT TO:<b@x.test> NOTIFY=NEVER", b"RCPT TO:<evil@x.test> NOTIFY=NEVER")
    first, second = read(data)
    assert isinstance(first, bsmtp.BatchError) and isinstance(second, bsmtp.BatchMessage)
    assert "MAIL and RCPT lines are not those of its envelope record" in first.error and "line 4:" in first.error
    assert second.record == EVERY_FIELD[1][0]
    resized = batch(EVERY_FIELD[:1]).replace(b"\r\nlast\r\n", b"\r\nlast!\r\n")
    [refused] = read(resized)
    assert isinstance(refused, bsmtp.BatchError) and "its content is 47 octets" in refused.error


def test_a_refused_command_spoils_its_message_only() -> None:
    data = (b"MAIL FROM:<a@b.test> FOO=1\r\nRCPT TO:<c@d.test>\r\nDATA\r\nfirst\r\n.\r\n"
            b"MAIL FROM:<a@b.test>\r\nDATA\r\nsecond\r\n.\r\n"
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nthird\r\n.\r\n")
    first, second, third = read(data)
    assert isinstance(first, bsmtp.BatchError) and "line 1" in first.error and "FOO" in first.error
    assert isinstance(second, bsmtp.BatchError) and "DATA without MAIL and RCPT" in second.error
    assert isinstance(third, bsmtp.BatchMessage) and third.body == b"third\r\n"
    assert isinstance(third.rcpts[0], RcptTo)


@pytest.mark.parametrize("data, why", [
    (b"\x00" * 5000, "not a batch SMTP file"),
    (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nno end", "ends inside a message's DATA"),
    (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n", "before its DATA"),
    (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 100 LAST\r\nshort", "inside a BDAT chunk"),
])
def test_not_batch_smtp(data: bytes, why: str) -> None:
    with pytest.raises(bsmtp.NotBatch, match=why):
        read(data)


def test_a_message_over_the_limit_is_refused_and_skipped() -> None:
    data = (b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + b"x" * 100 + b"\r\n.\r\n"
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nsmall\r\n.\r\n")
    big, small = list(bsmtp.read(io.BytesIO(data), 50))
    assert isinstance(big, bsmtp.BatchError) and "bigger than 50 octets" in big.error
    assert isinstance(small, bsmtp.BatchMessage) and small.body == b"small\r\n"
