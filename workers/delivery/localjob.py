"""Local delivery of one job: each recipient's Sieve plan carried out, then the replies.

For every recipient: its mailbox's script (sieve.py) gives a Plan (no script: INBOX).
Then, in this order:
1. Vacation: the record of each mailbox with a reply to send is locked (vacationlog.py)
   and a reply it says this sender had already is dropped.
2. The new messages the plans make are committed to the spool by this worker's
   GroupCommitter (a group commit, fsynced): redirects, from the original
   envelope sender (RFC 5228 4.2), the message as stored with `Delivered-To:
   <recipient>` on top (the loop guard sieve.py reads), a local alias expanded as
   inbound would ([local] aliases); vacation replies, from <>. The scheduler is told
   (`New` on this worker's scheduler connection, through `notify`) before the job's
   Done, which goes on the same connection after it.
3. The replies are recorded and the records unlocked.
4. The stores: INBOX and each fileinto folder (`store`).
So a crash anywhere costs a duplicate (a second redirect or reply when the job runs
again), never a loss. A recipient whose new messages could not be committed stores
nothing and is deferred (452 4.3.1 queue full, 451 4.3.0 otherwise).

Replies: stored -> 250; discarded, or only redirected -> 250 (the log line says so);
reject/ereject -> 550 5.7.1 with the script's reason, and the scheduler's DSN tells the
sender (RFC 5429 2.1: no SMTP refusal is possible after the message was accepted).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mta import logs, metrics
from mta.aliases import AliasError, Aliases
from mta.config import Config
from mta.messages import RcptReply
from mta.smtp.transaction import Outbound, OutboundRecipient
from mta.sieve.vacation import Reply
from mtaqueue import Envelope, NewMessage, QueueError, QueueFull, Recipient, new_id
from mtaqueue.committer import GroupCommitter
from workers.delivery import maildir, sieve
from workers.delivery.localbox import LocalDelivery
from workers.delivery.sieve import Plan, Scripts
from workers.delivery.vacationlog import VacationLog


@dataclass
class _Work:
    """One recipient of the job: where its mail goes and what its script decided."""
    index: int
    msgid: str
    rcpt: OutboundRecipient
    mailbox: str | None  # None: no mailbox (maildir.deliver gives the refusal)
    plan: Plan | None  # None: no script, INBOX
    new: list[NewMessage]


class LocalJobs:
    """The delivery worker's local deliveries: scripts cached across jobs."""

    def __init__(self, config: Callable[[], Config], local: Callable[[], LocalDelivery], committer: GroupCommitter,
                 notify: Callable[[list[str]], None]) -> None:
        self._config = config
        self._local = local  # which mailbox an address is, and the store (owner, quota): localbox.py
        self._committer = committer
        self._notify = notify
        self.scripts = Scripts()
        self._aliases: tuple[Config, Aliases] | None = None  # loaded for this config

    def _targets(self, config: Config, address: str) -> list[str]:
        """A redirect's final recipients: a local alias is expanded (as inbound expands
        what it accepts), anything else is the address itself."""
        if self._aliases is None or self._aliases[0] is not config:
            try:
                self._aliases = (config, Aliases.load(config.local.aliases or None))
            except (OSError, AliasError) as exc:
                logs.event("alias_error", path=config.local.aliases, error=str(exc),
                           action="Sieve redirects to local aliases are not expanded; fix the aliases file")
                self._aliases = (config, Aliases({}))
        try:
            targets = self._aliases[1].expand(address, config.relay.local_domains)
        except AliasError as exc:
            logs.event("alias_error", rcpt=address, error=str(exc))
            return [address]
        return targets or [address]

    async def deliver(self, message: Outbound, rcpts: Sequence[int]) -> list[RcptReply]:
        loop = asyncio.get_running_loop()
        now = time.time()
        work = await loop.run_in_executor(None, self._plan_all, message, rcpts, now)
        logs_held = await self._vacation_logs(work, now)
        try:
            failed = await self._commit(work)
            for item in work:
                reply = item.plan.vacation if item.plan is not None else None
                if reply is not None and item.index not in failed and item.mailbox in logs_held:
                    await _to_the_end(loop.run_in_executor(None, logs_held[item.mailbox].record,
                                                           reply.to, reply.handle, reply.days, now))
        finally:
            for held in logs_held.values():
                held.close()
        replies: list[RcptReply] = []
        for item in work:
            if item.index in failed:
                replies.append((item.index, *failed[item.index]))
            else:
                replies.append(await loop.run_in_executor(None, self._store, message, item))
        return replies

    async def _vacation_logs(self, work: list[_Work], now: float) -> dict[str, VacationLog]:
        """Lock the record of each mailbox with a reply to send (in path order: no two jobs
        wait for each other) and drop the replies it says were sent already; the locks
        are held until the replies are committed and recorded."""
        held: dict[str, VacationLog] = {}
        promised: set[tuple[str, str, str]] = set()  # two addresses of one mailbox in the job: one reply
        try:
            for item in sorted(work, key=lambda w: w.mailbox or ""):
                plan, mailbox = item.plan, item.mailbox
                if plan is None or plan.vacation is None or mailbox is None:
                    continue
                reply = plan.vacation
                if mailbox not in held:
                    held[mailbox] = await VacationLog.acquire(mailbox)
                once = (mailbox, reply.to.lower(), reply.handle)
                if once in promised or held[mailbox].answered(reply.to, reply.handle, now):
                    plan.vacation = None
                    plan.actions = ["vacation:answered-before" if a == "vacation" else a for a in plan.actions]
                else:
                    promised.add(once)
                    item.new.append(_vacation_reply(item.msgid, item.rcpt, reply, now))
        except BaseException:
            for log in held.values():
                log.close()
            raise
        return held

    def _plan_all(self, message: Outbound, rcpts: Sequence[int], now: float) -> list[_Work]:
        config = self._config()
        work = []
        for i, rcpt in zip(rcpts, message.recipients):
            mailbox = self._local().mailbox_dir(rcpt.address)
            plan = None
            if mailbox is not None:
                plan = sieve.plan(self.scripts, mailbox, sender=message.sender, recipient=rcpt.address,
                                  addresses=tuple(_addresses(rcpt)), body=message.body,
                                  hostname=config.server.hostname, now=now)
            item = _Work(i, message.msgid, rcpt, mailbox, plan, [])
            if plan is not None:
                if plan.error is not None:
                    logs.event("sieve_run_error", msgid=message.msgid, rcpt=rcpt.address, error=plan.error,
                               action="kept in INBOX")
                item.new = [_redirected(message, rcpt, self._targets(config, to), now) for to in plan.redirects]
            work.append(item)
        return work

    async def _commit(self, work: list[_Work]) -> dict[int, tuple[int, str, str]]:
        """Commit every new message (one group commit), tell the scheduler; the recipients
        whose messages failed, with their reply."""
        pending = [(item, m) for item in work for m in item.new]
        if not pending:
            return {}
        results = await asyncio.gather(*(self._committer.commit(m) for _, m in pending), return_exceptions=True)
        failed: dict[int, tuple[int, str, str]] = {}
        committed = []
        for (item, new), result in zip(pending, results):
            if isinstance(result, QueueFull):
                failed[item.index] = (452, "4.3.1", f"queue full, cannot queue the Sieve script's message: {result}")
            elif isinstance(result, QueueError):
                failed[item.index] = (451, "4.3.0", f"queue error, cannot queue the Sieve script's message: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                committed.append(new.envelope.id)
        if committed:
            self._notify(committed)
        return failed

    def _store(self, message: Outbound, item: _Work) -> RcptReply:
        local = self._local()
        rcpt, plan = item.rcpt, item.plan
        folders = [""] if plan is None else plan.folders
        if plan is not None:
            for label in plan.actions if plan.error is None else ["error"]:
                metrics.DELIVERY_SIEVE_ACTIONS.labels(_metric_action(label)).inc()
        if plan is not None and plan.error is None:
            logs.event("sieve", msgid=message.msgid, rcpt=rcpt.address, actions=",".join(plan.actions) or "none",
                       queued=" ".join(m.envelope.id for m in item.new) or None, no_reply=plan.vacation_skipped)
        stored = []
        for folder in folders:
            try:
                path = local.deliver(rcpt.address, message.body, return_path=message.sender, folder=folder)
            except maildir.MaildirError as exc:
                return (item.index, 450 if exc.temporary else 550, exc.status, exc.text)
            stored.append(f"{folder}/{os.path.basename(path)}" if folder else os.path.basename(path))
        if plan is not None and plan.reject is not None:
            return (item.index, 550, "5.7.1", f"refused by the recipient's Sieve script: {plan.reject}"[:400])
        if stored:
            return (item.index, 250, "2.0.0", f"delivered to maildir as {', '.join(stored)}")
        what = "discarded" if plan is not None and plan.discarded else "redirected"
        return (item.index, 250, "2.0.0", f"{what} by the recipient's Sieve script")


def _metric_action(label: str) -> str:
    """A Plan's log label as the metric's action: "fileinto:Work" -> fileinto,
    "vacation:not-due" and "vacation:answered-before" -> vacation_skipped."""
    kind, _, detail = label.partition(":")
    return "vacation_skipped" if kind == "vacation" and detail else kind


def _addresses(rcpt: OutboundRecipient) -> list[str]:
    """The recipient's own addresses for vacation: the mailbox's, and the one the sender
    wrote when an alias led here (ORCPT)."""
    found = [rcpt.address]
    if rcpt.orcpt is not None and rcpt.orcpt.lower().startswith("rfc822;"):
        original = rcpt.orcpt[7:]
        if original.lower() != rcpt.address.lower():
            found.append(original)
    return found


def _redirected(message: Outbound, rcpt: OutboundRecipient, to: list[str], now: float) -> NewMessage:
    """The message as stored, to `to`, from the original envelope sender, DSN parameters kept."""
    body = f"Delivered-To: {rcpt.address}\r\n".encode() + message.body
    orcpt = rcpt.orcpt or f"rfc822;{rcpt.address}"
    envelope = Envelope(
        id=new_id(now), sender=message.sender,
        recipients=[Recipient(target, rcpt.notify, orcpt) for target in to],
        size=len(body), arrival=now, next_attempt=now, ret=message.ret, envid=message.envid,
        body_type=message.body_type, smtputf8=message.smtputf8,
        client={"protocol": "sieve-redirect", "origin": message.msgid, "mailbox": rcpt.address},
    )
    return NewMessage(envelope, body)


def _vacation_reply(msgid: str, rcpt: OutboundRecipient, reply: Reply, now: float) -> NewMessage:
    body = reply.content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    envelope = Envelope(
        id=new_id(now), sender="", recipients=[Recipient(reply.to)], size=len(body), arrival=now,
        next_attempt=now, body_type="8BITMIME" if any(b > 0x7F for b in body) else None,
        client={"protocol": "sieve-vacation", "origin": msgid, "mailbox": rcpt.address},
    )
    return NewMessage(envelope, body)


async def _to_the_end(work: asyncio.Future[None]) -> None:
    """Await an executor's `work`; cancelled meanwhile (a drain's deadline), wait for its
    thread to be done before the cancellation goes on: the caller's `finally` closes the
    descriptor the thread writes (closed under it, its number could be another file's by
    the time it writes, and the lock would go early)."""
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            try:
                await asyncio.wait({work})
            except asyncio.CancelledError:
                continue
        raise
