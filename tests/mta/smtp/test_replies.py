"""Reply values: the wire form made with the value (its one-line fast path held to the general form)."""

import pytest

from mta.smtp import replies
from mta.smtp.replies import Reply

CONSTANTS = [value for value in vars(replies).values() if isinstance(value, Reply)]
MADE = [replies.queued("4XyZ12"), replies.greeting("mx.test"), replies.closing("mx.test"),
        replies.ehlo("mx.test", 1000, starttls=True, auth=("PLAIN",)), Reply(250, "", "mx.test"),
        Reply(250, "2.1.5", ("<a@b.test>", "<c@d.test>")), Reply(554, "5.7.1", "caf\u00e9 \udcff")]


@pytest.mark.parametrize("reply", CONSTANTS + MADE, ids=str)
def test_the_wire_form_is_the_lines_form(reply: Reply) -> None:
    assert reply.wire == reply._wire_from_lines().encode("utf-8", "replace")
    assert reply.positive is (reply.code < 400)


def test_the_wire_form_by_example() -> None:
    assert replies.queued("4XyZ12").wire == b"250 2.0.0 Ok: queued as 4XyZ12\r\n"
    assert Reply(250, "", ("mx.test", "PIPELINING")).wire == b"250-mx.test\r\n250 PIPELINING\r\n"
    assert replies.START_DATA.wire == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert Reply(550, "5.1.1", "\udcff").wire == b"550 5.1.1 ?\r\n"  # a lone surrogate cannot hurt the writer


def test_the_wire_form_is_no_part_of_equality() -> None:
    assert Reply(250, "2.0.0", "Ok") == replies.OK and hash(Reply(250, "2.0.0", "Ok")) == hash(replies.OK)
    assert {replies.OK: 1}[Reply(250, "2.0.0", "Ok")] == 1
