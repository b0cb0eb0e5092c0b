"""Delivery outcomes -> new recipient states, retry times and notices (pure).

`settle` applies one attempt's per-recipient replies to an envelope:
  2xx -> delivered; 5xx -> bounced; 452 4.5.3 (too many recipients) -> ready again at
  once; other 4xx -> deferred with exponential back-off between
  min_backoff_seconds and max_backoff_seconds, or bounced (status 4.4.7, action failed;
  5.2.2 when the last reply was 4.2.2, mailbox full) once the message is older than
  max_queue_lifetime_seconds.
Notices (RFC 3464 DSNs from <> to the envelope sender, each a NewMessage to commit in
the same transaction as the change that caused it; a message from <> never gets one):
  - failure: the bounced recipients whose NOTIFY allows it (none given: yes);
  - success: the delivered recipients with NOTIFY=SUCCESS, as "delivered" or "relayed"
    by the attempt's handoff; none when the next hop offered DSN ("passed": NOTIFY went
    with the message, the next hop reports success, RFC 3461 5.2.2);
  - delay (`delay_notice`): once per message (`Envelope.warned`), when it has been
    queued `warn_after_seconds`, about its pending recipients whose NOTIFY allows it
    (none given: yes), with Will-Retry-Until = arrival + the queue lifetime.
Pure: `now` and the body loader are passed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import re

from mta.dsn import DsnRecipient, build_dsn, should_notify
from mta.messages import Handoff
from mta.queueops import FINAL_STATES
from mtaqueue.ids import new_id
from mtaqueue.records import Envelope, NewMessage, Recipient

_TEMPORARY_STATUS = re.compile(r"\d{3} (4\.\d{1,3}\.\d{1,3})\b")  # in a last_reply "451 4.3.0 text"


class RecipientReply(NamedTuple):  # (a tuple: built per recipient per attempt, cheaper than a dataclass)
    index: int
    code: int
    status: str
    text: str

    def __str__(self) -> str:
        code, status, text = str(self.code), self.status, self.text
        if status and text:
            return f"{code} {status} {text}"
        return " ".join(part for part in (code, status, text) if part)


# A RecipientReply from a Done's reply, whose arity and types messages.decode has checked:
# tuple.__new__ straight, in C (RecipientReply._make is Python code, per recipient).
reply_of = functools.partial(tuple.__new__, RecipientReply)


@dataclass(frozen=True)
class RetryPolicy:
    min_backoff_seconds: float
    max_backoff_seconds: float
    max_queue_lifetime_seconds: float

    def backoff(self, attempts: int) -> float:
        return min(self.max_backoff_seconds, self.min_backoff_seconds * 2 ** max(0, attempts - 1))


@dataclass
class Settlement:
    delivered: list[int] = field(default_factory=list)
    bounced: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    retry_now: list[int] = field(default_factory=list)  # 452 4.5.3: ready for a new transaction
    bounce: NewMessage | None = None  # the failure notice
    success: NewMessage | None = None  # the success notice (NOTIFY=SUCCESS)
    finished: bool = False  # every recipient is delivered or bounced: delete the message


def settle(envelope: Envelope, replies: Sequence[RecipientReply], *, remote: str | None, now: float,
           policy: RetryPolicy, hostname: str, load_body: Callable[[], bytes],
           handoff: Handoff = "relayed") -> Settlement:
    """Mutates `envelope` (states, attempts, next_attempt) and says what else to do.
    `handoff`: what the 2xx replies of this attempt mean for a success notice."""
    result = Settlement()
    expired = now - envelope.arrival >= policy.max_queue_lifetime_seconds
    dsn: list[DsnRecipient] = []
    success: list[DsnRecipient] = []
    retry_at: list[float] = []
    # "Too many recipients" is retried at once only while it makes progress: some
    # recipient of the same transaction was accepted (else it is an ordinary deferral).
    progress = len(replies) > 1 and any(200 <= r.code < 300 for r in replies)
    for reply in replies:
        rcpt = envelope.recipients[reply.index]
        rcpt.attempts += 1
        rcpt.last_reply = str(reply)
        if 200 <= reply.code < 300:
            rcpt.state = "delivered"
            result.delivered.append(reply.index)
            if handoff != "passed" and should_notify(rcpt.notify, handoff):
                status = reply.status if reply.status.startswith("2.") else "2.0.0"
                # Maildir (no remote) has no SMTP reply to quote.
                success.append(DsnRecipient(rcpt.address, handoff, status, rcpt.orcpt, remote_mta=remote,
                                            diagnostic=str(reply) if remote else None, last_attempt=now))
            continue
        if reply.code == 452 and reply.status == "4.5.3" and progress and not expired:
            # "Too many recipients": not a failure of this recipient (RFC 5321 4.5.3.1.10);
            # it goes in the next transaction, now, without counting an attempt.
            rcpt.attempts -= 1
            rcpt.state = "ready"
            result.retry_now.append(reply.index)
            continue
        if 400 <= reply.code < 500 and not expired:
            rcpt.state = "deferred"
            result.deferred.append(reply.index)
            retry_at.append(now + policy.backoff(rcpt.attempts))
            continue
        rcpt.state = "bounced"
        result.bounced.append(reply.index)
        status = reply.status or ("5.0.0" if reply.code >= 500 else "4.0.0")
        if 400 <= reply.code < 500:
            # Delivery time expired; a mailbox still full is the permanent 5.2.2 (RFC 3463).
            status = "5.2.2" if reply.status == "4.2.2" else "4.4.7"
            rcpt.last_reply = f"{reply} (gave up after {int(now - envelope.arrival)} s in the queue)"
        if should_notify(rcpt.notify, "failed"):
            dsn.append(_dsn_recipient(rcpt, status, remote, rcpt.last_reply, now))
    envelope.attempts += 1
    pending = [r for r in envelope.recipients if r.state not in FINAL_STATES]
    result.finished = not pending
    if retry_at:
        earlier = [envelope.next_attempt] if envelope.next_attempt > now and any(
            r.state == "deferred" and i not in result.deferred for i, r in enumerate(envelope.recipients)) else []
        envelope.next_attempt = min(retry_at + earlier)
    if envelope.sender and (dsn or success):
        original = load_body()
        if dsn:
            result.bounce = make_notice(envelope, dsn, now=now, hostname=hostname, original=original)
        if success:
            result.success = make_notice(envelope, success, now=now, hostname=hostname, original=original)
    return result


def delay_notice(envelope: Envelope, *, now: float, warn_after_seconds: float, lifetime_seconds: float,
                 hostname: str, load_body: Callable[[], bytes]) -> NewMessage | None:
    """The message's one delay notice, if it is due now (then `envelope.warned` is set):
    queued `warn_after_seconds` or longer (0: never), not warned yet, not from <>, and
    some pending recipient's NOTIFY asks for it. It covers every such recipient."""
    if (envelope.warned or not envelope.sender or warn_after_seconds <= 0
            or now - envelope.arrival < warn_after_seconds):
        return None
    until = envelope.arrival + lifetime_seconds
    delayed = [_delayed(r, until) for r in envelope.recipients
               if r.state not in FINAL_STATES and should_notify(r.notify, "delayed")]
    if not delayed:
        return None
    envelope.warned = True
    return make_notice(envelope, delayed, now=now, hostname=hostname, original=load_body())


def make_notice(envelope: Envelope, recipients: list[DsnRecipient], *, now: float, hostname: str,
                original: bytes) -> NewMessage:
    """A DSN about `recipients` of `envelope`, from <> to its sender, ready to commit."""
    msgid = new_id(now)
    body = build_dsn(reporting_mta=hostname, original_sender=envelope.sender, recipients=recipients,
                     original=original, arrival=envelope.arrival, now=now, envid=envelope.envid,
                     ret=envelope.ret, queue_id=envelope.id)
    notice = Envelope(
        id=msgid, sender="", recipients=[Recipient(envelope.sender)], size=len(body), arrival=now,
        next_attempt=now, priority=envelope.priority, smtputf8=envelope.smtputf8,
        client={"protocol": "bounce", "origin": envelope.id},
    )
    return NewMessage(notice, body)


def _delayed(rcpt: Recipient, until: float) -> DsnRecipient:
    """A pending recipient in a delay notice: its last temporary reply, if it has one."""
    found = _TEMPORARY_STATUS.match(rcpt.last_reply or "")
    return DsnRecipient(rcpt.address, "delayed", found.group(1) if found else "4.0.0", rcpt.orcpt,
                        diagnostic=rcpt.last_reply if found else None, will_retry_until=until)


def _dsn_recipient(rcpt: Recipient, status: str, remote: str | None, diagnostic: str | None,
                   now: float) -> DsnRecipient:
    return DsnRecipient(address=rcpt.address, action="failed", status=status, orcpt=rcpt.orcpt,
                        remote_mta=remote, diagnostic=diagnostic, last_attempt=now)
