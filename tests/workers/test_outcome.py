"""Delivery outcomes (pure): states, back-off, expiry, bounces."""

import email
import email.policy

from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, Recipient
from workers.scheduler.outcome import RecipientReply, RetryPolicy, settle

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
