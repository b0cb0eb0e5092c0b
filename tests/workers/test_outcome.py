"""Delivery outcomes (pure): states, back-off, expiry, failure, success and delay notices."""

import email
import email.message
import email.policy
import email.utils

import pytest

from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, Recipient
from workers.scheduler.outcome import RecipientReply, RetryPolicy, delay_notice, settle

POLICY = RetryPolicy(min_backoff_seconds=60, max_backoff_seconds=600, max_queue_lifetime_seconds=3600)
BODY = b"Subject: hello\r\n\r\nbody\r\n"


def envelope(sender: str = "s@local.test", n: int = 3, notify=None) -> Envelope:  # type: ignore[no-untyped-def]
    return Envelope(id=MessageId("0" * 21), sender=sender,
                    recipients=[Recipient(f"r{i}@remote.test", notify) for i in range(n)],
                    size=len(BODY), arrival=1000.0, next_attempt=1000.0)


def run(e: Envelope, replies: list[RecipientReply], now: float = 1010.0):  # type: ignore[no-untyped-def]
    return settle(e, replies, remote="mx.remote.test", now=now, policy=POLICY, hostname="mx.test",
                  load_body=lambda: BODY)


def test_mixed_replies_deliver_bounce_and_defer() -> None:
    e = envelope()
    result = run(e, [RecipientReply(0, 250, "2.0.0", "ok"), RecipientReply(1, 550, "5.1.1", "no such user"),
                     RecipientReply(2, 451, "4.3.0", "later")])
    assert (result.delivered, result.bounced, result.deferred) == ([0], [1], [2])
    assert [r.state for r in e.recipients] == ["delivered", "bounced", "deferred"]
    assert e.next_attempt == 1010.0 + 60 and not result.finished
    assert result.bounce is not None
    bounce = result.bounce.envelope
    assert bounce.sender == "" and [r.address for r in bounce.recipients] == ["s@local.test"]
    report = email.message_from_bytes(result.bounce.body, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"550 5.1.1 no such user" in result.bounce.body and b"Remote-MTA: dns; mx.remote.test" in result.bounce.body


def test_backoff_doubles_and_caps() -> None:
    e = envelope(n=1)
    for attempt, expected in enumerate([60, 120, 240, 480, 600, 600], 1):
        run(e, [RecipientReply(0, 450, "4.2.0", "busy")], now=1010.0)
        assert e.recipients[0].attempts == attempt
        assert e.next_attempt == 1010.0 + expected


def test_expiry_bounces_a_temporary_failure_with_4_4_7() -> None:
    e = envelope(n=1)
    result = run(e, [RecipientReply(0, 451, "4.4.1", "connection refused")], now=1000.0 + 3600)
    assert result.bounced == [0] and result.finished
    assert result.bounce is not None and b"Status: 4.4.7" in result.bounce.body


def test_expiry_bounces_a_full_mailbox_with_5_2_2() -> None:
    e = envelope(n=1)
    result = run(e, [RecipientReply(0, 450, "4.2.2", "Mailbox full: a@b holds 10 of 10 bytes")], now=1000.0 + 3600)
    assert result.bounced == [0]
    assert result.bounce is not None and b"Status: 5.2.2" in result.bounce.body
    assert b"Mailbox full" in result.bounce.body


def test_never_bounce_a_bounce_and_honour_notify_never() -> None:
    assert run(envelope(sender=""), [RecipientReply(0, 550, "5.1.1", "x")]).bounce is None
    assert run(envelope(notify=("NEVER",)), [RecipientReply(0, 550, "5.1.1", "x")]).bounce is None


def test_all_final_means_finished() -> None:
    e = envelope(n=2)
    result = run(e, [RecipientReply(0, 250, "2.0.0", "ok"), RecipientReply(1, 250, "2.0.0", "ok")])
    assert result.finished and result.bounce is None


def test_too_many_recipients_is_retried_at_once_without_an_attempt() -> None:
    e = envelope(n=3)
    result = run(e, [RecipientReply(0, 250, "2.0.0", "ok"), RecipientReply(1, 452, "4.5.3", "too many recipients"),
                     RecipientReply(2, 452, "4.5.3", "too many recipients")])
    assert result.retry_now == [1, 2] and result.deferred == [] and result.bounce is None
    assert [(r.state, r.attempts) for r in e.recipients] == [("delivered", 1), ("ready", 0), ("ready", 0)]


def test_too_many_recipients_alone_is_an_ordinary_deferral() -> None:
    e = envelope(n=1)
    result = run(e, [RecipientReply(0, 452, "4.5.3", "too many recipients")])
    assert result.retry_now == [] and result.deferred == [0]


# --- success and delay notices -------------------------------------------------------------

def report_of(notice) -> tuple[email.message.EmailMessage, list]:  # type: ignore[no-untyped-def]
    """The notice parsed as RFC 3464: the message, and its per-recipient field blocks."""
    message = email.message_from_bytes(notice.body, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    status = message.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return message, status.get_payload()[1:]


@pytest.mark.parametrize(("handoff", "notify", "action"), [
    ("relayed", ("SUCCESS",), "relayed"),
    ("delivered", ("SUCCESS", "FAILURE"), "delivered"),
    ("passed", ("SUCCESS",), None),  # the next hop offered DSN: it reports success
    ("delivered", None, None),  # success is never reported unasked
    ("delivered", ("FAILURE", "DELAY"), None),
    ("delivered", ("NEVER",), None),
])
def test_success_notice_follows_notify_and_the_handoff(handoff: str, notify, action) -> None:  # type: ignore[no-untyped-def]
    e = envelope(n=1, notify=notify)
    e.recipients[0].orcpt = "rfc822;old@remote.test"
    e.envid, e.ret = "env-1", "FULL"
    result = settle(e, [RecipientReply(0, 250, "2.6.0", "queued as X")], remote="mx.remote.test", now=1010.0,
                    policy=POLICY, hostname="mx.test", load_body=lambda: BODY, handoff=handoff)
    assert result.bounce is None and result.finished
    if action is None:
        assert result.success is None
        return
    assert result.success is not None and result.success.envelope.sender == ""
    message, [block] = report_of(result.success)
    assert message["Subject"] == "Delivery Status Notification (Success)"
    assert (block["Action"], block["Status"], block["Original-Recipient"]) == (action, "2.6.0", "rfc822;old@remote.test")
    assert "Original-Envelope-Id: env-1" in message.get_payload()[1].as_string()
    assert message.get_payload()[2].get_content_type() == "text/rfc822-headers"  # no failure: headers only


def test_no_notice_of_any_kind_for_the_null_sender() -> None:
    e = envelope(sender="", n=1, notify=("SUCCESS", "DELAY"))
    assert run(e, [RecipientReply(0, 250, "2.0.0", "ok")]).success is None
    late = envelope(sender="", n=1, notify=("DELAY",))
    assert delay(late, now=1000.0 + 10_000) is None and not late.warned


def delay(e: Envelope, now: float, warn_after: float = 600):  # type: ignore[no-untyped-def]
    return delay_notice(e, now=now, warn_after_seconds=warn_after, lifetime_seconds=POLICY.max_queue_lifetime_seconds,
                        hostname="mx.test", load_body=lambda: BODY)


def test_delay_notice_once_per_message_for_its_pending_recipients_that_asked() -> None:
    e = envelope(n=5)
    e.recipients[0].notify = ("DELAY",)
    e.recipients[1].notify = ("FAILURE",)  # did not ask
    e.recipients[2].state = "delivered"  # done
    e.recipients[3].notify = ("NEVER",)
    run(e, [RecipientReply(0, 451, "4.4.1", "connection refused"), RecipientReply(4, 450, "4.2.0", "greylisted")])
    assert delay(e, now=1000.0 + 599) is None and not e.warned  # not queued long enough yet
    notice = delay(e, now=1000.0 + 600)
    assert notice is not None and e.warned
    message, blocks = report_of(notice)
    assert message["Subject"] == "Delivery Status Notification (Delay)"
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; r0@remote.test", "delayed", "4.4.1"), ("rfc822; r4@remote.test", "delayed", "4.2.0")]
    assert blocks[0]["Diagnostic-Code"] == "smtp; 451 4.4.1 connection refused"
    arrival = email.utils.parsedate_to_datetime(message.get_payload()[1].get_payload()[0]["Arrival-Date"])
    until = email.utils.parsedate_to_datetime(blocks[0]["Will-Retry-Until"])
    assert (until - arrival).total_seconds() == POLICY.max_queue_lifetime_seconds
    assert delay(e, now=1000.0 + 5000) is None  # once per message


def test_delay_notices_off_at_zero_and_for_recipients_that_never_tried() -> None:
    e = envelope(n=1)
    assert delay(e, now=1e6, warn_after=0) is None and not e.warned
    notice = delay(e, now=1000.0 + 600)  # never attempted (no reply yet): 4.0.0, no diagnostic
    assert notice is not None
    _, [block] = report_of(notice)
    assert block["Status"] == "4.0.0" and block["Diagnostic-Code"] is None
