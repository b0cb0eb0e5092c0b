"""The inbound session's decisions without sockets: the sans-I/O core driven with bytes,
each event decided by InboundSession, as protocol.py does it over a socket.

Real collaborators: the rate limits and the auth cache in a real LMDB file in tmp_path,
real mailbox directories and aliases file, a real users file (scrypt), a real DNS
server on loopback for the DNSBL. The queue is a fake committer with GroupCommitter's
one-method interface (the integration tests commit to the real spool).
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mta import logs
from mta.config import (AuthConfig, Config, LimitsConfig, ListenerConfig, LocalConfig, PolicyConfig, PriorityRule,
                        RateConfig, RelayConfig, ServerConfig)
from mta.resolver import MxResolver
from mta.smtp.commands import Expn, MailFrom, RcptTo, Vrfy
from mta.smtp.server import NEED_DATA, Credentials, Message
from mta.users import User, hash_password, save_users
from mtaqueue import MessageId, NewMessage, QueueFull, QueueIOError, Recipient
from mtaqueue.cache_lmdb import LmdbCache
from tests.integration.conftest import split_received
from tests.integration.dns_fixtures import dns_server  # noqa: F401
from tests.integration.dns_server import DnsServer
from workers.inbound.access import Access
from workers.inbound.auth import Authenticator
from workers.inbound.budget import MemoryBudget
from workers.inbound.content import Pipeline
from workers.inbound.context import WorkerContext
from workers.inbound.decision import Decision
from workers.inbound.main import server_options
from workers.inbound.policy import LocalRecipients, RcptDecision
from workers.inbound.ratelimit import RateLimiter
from workers.inbound.session import Client, InboundSession
from workers.inbound.stages import STAGES

OUTSIDER = Client.at("192.0.2.10", 40000)
INSIDER = Client.at("10.0.0.5", 40001)
SMTP = ListenerConfig(address="127.0.0.1:2525")
SUBMISSION = ListenerConfig(address="127.0.0.1:2587", mode="submission", auth_plaintext=True)
PASSWORD = "correct horse"
HASH = hash_password(PASSWORD)  # once: scrypt is deliberately slow


class FakeCommitter:
    """GroupCommitter's interface: commit() returns once stored, or raises a QueueError."""

    def __init__(self) -> None:
        self.stored: list[NewMessage] = []
        self.error: Exception | None = None

    async def commit(self, message: NewMessage) -> None:
        await self.commit_all((message,))

    async def commit_all(self, messages: tuple[NewMessage, ...]) -> None:
        if self.error is not None:
            raise self.error
        self.stored.extend(messages)


class Notified:
    def __init__(self) -> None:
        self.ids: list[MessageId] = []

    def new(self, msgid: MessageId) -> None:
        self.ids.append(msgid)


class Rig:
    """One inbound worker's context over real files; sessions on it share the limits."""

    def __init__(self, tmp_path: Path, *, aliases: str = "", mailboxes: tuple[str, ...] = ("alice@local.test",),
                 budget_bytes: int = 1024**2, resolver: MxResolver | None = None, **sections: Any) -> None:
        for address in mailboxes:
            user, _, domain = address.partition("@")
            (tmp_path / "mail" / domain / user).mkdir(parents=True)
        (tmp_path / "aliases").write_text(aliases)
        save_users(str(tmp_path / "users"), {"carol": User("carol", HASH, ("carol@local.test",))})
        self.config = Config(
            server=ServerConfig(hostname="mx.test"),
            listener=(SMTP, SUBMISSION),
            relay=RelayConfig(local_domains=("local.test",), relay_domains=("relay.test",),
                              mynetworks=(ipaddress.ip_network("10.0.0.0/8"),)),
            local=LocalConfig(maildir_root=str(tmp_path / "mail"), aliases=str(tmp_path / "aliases")),
            **{"auth": AuthConfig(users_file=str(tmp_path / "users")), **sections})
        self.cache = LmdbCache(str(tmp_path / "cache"))
        self.committer = FakeCommitter()
        self.notified = Notified()
        self.ctx = WorkerContext(
            self.config, {lst.address: server_options(self.config, lst) for lst in self.config.listener},
            self.committer, LocalRecipients(self.config), self.notified, ssl_context=None,
            authenticator=Authenticator(self.config.auth, self.cache, str(tmp_path / "cache")),
            limiter=RateLimiter(self.config, self.cache), access=Access(self.config, resolver),
            budget=MemoryBudget(budget_bytes), content=Pipeline(self.config, STAGES))

    def session(self, client: Client = OUTSIDER, listener: ListenerConfig = SMTP) -> Session:
        return Session(InboundSession(self.ctx, listener), client)

    def close(self) -> None:
        self.ctx.authenticator.close()
        self.cache.close()


class Session:
    """Drives one InboundSession the way protocol.py does, minus the socket."""

    def __init__(self, session: InboundSession, client: Client) -> None:
        self.session = session
        self.conn = session.conn
        self.connect = session.check_connect(client)
        if self.connect.accepted:
            self.conn.greet()
        else:
            self.conn.refuse(self.connect.reply)
        self.replies()

    def event(self, line: str) -> Any:
        self.session.receive_data(line.encode() + b"\r\n")
        return self.conn.next_event()

    def replies(self) -> list[str]:
        self.session.account()
        return self.conn.data_to_send().decode().splitlines()

    def ehlo(self) -> None:
        assert self.event("EHLO c.test") is NEED_DATA
        self.replies()

    def mail(self, path: str) -> Decision:
        event = self.event(f"MAIL FROM:{path}")
        assert isinstance(event, MailFrom), event
        decision = self.session.check_mail(event)
        self.conn.reply(decision.reply)
        return decision

    def rcpt(self, path: str) -> RcptDecision:
        event = self.event(f"RCPT TO:{path}")
        assert isinstance(event, RcptTo), event
        decision = self.session.check_rcpt(event)
        self.conn.reply(decision.reply, decision.rcpt)
        return decision

    def data(self, content: str = "Subject: hi\r\n\r\nhello\r\n") -> Decision:
        assert self.event("DATA") is NEED_DATA
        assert self.replies()[-1].startswith("354 ")
        self.session.receive_data(content.encode() + b".\r\n")
        message = self.conn.next_event()
        assert isinstance(message, Message), message
        decision = asyncio.run(self.session.on_message(message))
        self.conn.reply(decision.reply)
        return decision

    def auth(self, name: str, password: str) -> Decision:
        token = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
        event = self.event(f"AUTH PLAIN {token}")
        assert isinstance(event, Credentials), event
        decision = asyncio.run(self.session.authenticate(event))
        self.conn.reply(decision.reply)
        return decision


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, aliases="postmaster: alice\nteam: alice, bob@elsewhere.test\n")
    yield r
    r.close()


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(logs, "_stream", out)
    return out


def verdict(decision: Decision | RcptDecision) -> tuple[str, str]:
    return f"{decision.reply.code} {decision.reply.status}", decision.reason


def rejected(reason: str, code: str) -> float:
    return REGISTRY.get_sample_value("mta_inbound_rejected_total", {"reason": reason, "code": code}) or 0.0


# --- connect ---------------------------------------------------------------------------------

def test_connection_refusals_name_the_limit_that_refused(tmp_path: Path, log: io.StringIO) -> None:
    rig = Rig(tmp_path, limits=LimitsConfig(max_connections_per_ip=2),
              policy=PolicyConfig(client_deny=(ipaddress.ip_network("198.51.100.0/24"),)))
    try:
        denied = rig.session(Client.at("198.51.100.1", 1))
        assert verdict(denied.connect) == ("554 5.7.1", "client_denied")
        first = rig.session()
        assert first.connect.accepted and str(first.connect.reply).startswith("220 mx.test")
        assert rig.session().connect.accepted
        before = rejected("max_connections_per_ip", "4xx")
        assert verdict(rig.session().connect) == ("421 4.7.0", "max_connections_per_ip")
        assert rejected("max_connections_per_ip", "4xx") - before == 1
        first.session.release()
        first.session.release()  # once: a second release gives back no other session's slot
        assert rig.session().connect.accepted
        assert rig.session().connect.reason == "max_connections_per_ip"
    finally:
        rig.close()
    assert "event=refused client=198.51.100.1 reason=client_denied" in log.getvalue()


def test_a_connection_over_the_window_is_refused_as_connection_rate(tmp_path: Path) -> None:
    rig = Rig(tmp_path, rate=RateConfig(connections_per_window=1))
    try:
        rig.session().session.release()
        before = rejected("connection_rate", "4xx")
        assert verdict(rig.session().connect) == ("421 4.7.0", "connection_rate")
        assert rejected("connection_rate", "4xx") - before == 1
        assert rig.session(INSIDER).connect.accepted  # mynetworks: exempt from the windows
    finally:
        rig.close()


# --- relay control -----------------------------------------------------------------------------

def test_relay_control_by_domain_network_and_authentication(rig: Rig) -> None:
    outsider = rig.session()
    outsider.ehlo()
    assert outsider.mail("<x@example.org>").accepted
    assert verdict(outsider.rcpt("<anyone@relay.test>")) == ("250 2.1.5", "")
    assert verdict(outsider.rcpt("<alice@local.test>")) == ("250 2.1.5", "")
    assert verdict(outsider.rcpt("<nobody@local.test>")) == ("550 5.1.1", "user_unknown")
    assert verdict(outsider.rcpt("<victim@elsewhere.test>")) == ("554 5.7.1", "relay")
    assert outsider.replies()[-1] == "554 5.7.1 Relay access denied"

    insider = rig.session(INSIDER)
    insider.ehlo()
    insider.mail("<x@example.org>")
    assert verdict(insider.rcpt("<victim@elsewhere.test>")) == ("250 2.1.5", "")

    # Behind a PROXY LOCAL header the address is the proxy's own, never a relay client.
    proxied = rig.session(Client(INSIDER.ip, INSIDER.port))
    proxied.ehlo()
    proxied.mail("<x@example.org>")
    assert verdict(proxied.rcpt("<victim@elsewhere.test>")) == ("554 5.7.1", "relay")


def test_an_authenticated_session_relays_and_sends_only_as_its_own_addresses(tmp_path: Path) -> None:
    rig = Rig(tmp_path, auth=AuthConfig(users_file=str(tmp_path / "users"), sender_login_match=True))
    try:
        submission = rig.session(listener=SUBMISSION)
        submission.ehlo()
        assert verdict(submission.auth("carol", "wrong")) == ("535 5.7.8", "failure")
        assert verdict(submission.auth("carol", PASSWORD)) == ("235 2.7.0", "")
        assert submission.session.user_name == "carol"
        assert verdict(submission.mail("<mallory@local.test>")) == ("553 5.7.1", "sender_login_mismatch")
        assert submission.mail("<carol@local.test>").accepted
        assert verdict(submission.rcpt("<victim@elsewhere.test>")) == ("250 2.1.5", "")
        assert submission.data().reply.code == 250
        envelope = rig.committer.stored[0].envelope
        assert envelope.client["user"] == "carol" and envelope.client["protocol"] == "ESMTPA"
    finally:
        rig.close()


def test_auth_failures_lock_the_address_out(tmp_path: Path) -> None:
    rig = Rig(tmp_path, auth=AuthConfig(users_file=str(tmp_path / "users"), max_failures=2,
                                        slow_after_failures=5))
    try:
        s = rig.session(listener=SUBMISSION)
        s.ehlo()
        assert verdict(s.auth("carol", "one")) == ("535 5.7.8", "failure")
        assert verdict(s.auth("carol", "two")) == ("421 4.7.0", "failure")  # the failure that locks out
        assert verdict(rig.session(listener=SUBMISSION).connect) == ("421 4.7.0", "auth_lockout")
    finally:
        rig.close()


# --- the postmaster and backscatter ------------------------------------------------------------------

def test_bare_postmaster_is_stored_as_the_local_address_with_ret_hdrs(rig: Rig) -> None:
    outsider = rig.session()
    outsider.ehlo()
    outsider.mail("<forged@example.org> RET=FULL")
    decision = outsider.rcpt("<Postmaster>")
    assert verdict(decision) == ("250 2.1.5", "")
    assert decision.rcpt.address.text == "postmaster@local.test"
    assert outsider.data().reply.code == 250
    envelope = rig.committer.stored[0].envelope
    assert envelope.recipients == [Recipient("alice@local.test", None, "rfc822;Postmaster")]
    assert envelope.ret == "HDRS"  # its bounce never carries the forged original in full

    insider = rig.session(INSIDER)
    insider.ehlo()
    insider.mail("<colleague@example.org> RET=FULL")
    insider.rcpt("<postmaster@local.test>")
    insider.data()
    assert rig.committer.stored[1].envelope.ret == "FULL"  # a trusted client keeps what it asked


# --- envelope building -----------------------------------------------------------------------------

def test_the_envelope_expands_aliases_keeps_orcpt_and_lists_each_recipient_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, aliases="team: alice, bob@elsewhere.test\n",
              priority_rule=(PriorityRule(priority=7, sender_domain="example.org"),))
    try:
        s = rig.session()
        s.ehlo()
        s.mail("<sender@example.org>")
        s.rcpt("<alice@local.test> NOTIFY=SUCCESS ORCPT=rfc822;alice@old.test")
        s.rcpt("<Team@local.test>")
        s.rcpt("<ALICE@local.test>")
        decision = s.data("Subject: hi\r\n\r\nhello\r\n")
        stored = rig.committer.stored[0]
        envelope = stored.envelope
        assert str(decision.reply) == f"250 2.0.0 Ok: queued as {envelope.id}"
        assert rig.notified.ids == [envelope.id]
        assert envelope.recipients == [
            Recipient("alice@local.test", ("SUCCESS",), "rfc822;alice@old.test"),
            Recipient("bob@elsewhere.test", None, "rfc822;Team@local.test"),
        ]
        assert envelope.sender == "sender@example.org" and envelope.priority == 7 and envelope.ret is None
        assert stored.body.startswith(b"Received: from c.test ([192.0.2.10])\r\n\tby mx.test (mta) with ESMTP id ")
        assert stored.body.endswith(b"Subject: hi\r\n\r\nhello\r\n") and envelope.size == len(stored.body)
        assert envelope.client == {"ip": "192.0.2.10", "port": 40000, "helo": "c.test", "listener": SMTP.address,
                                   "protocol": "ESMTP", "tls": None, "user": None}
    finally:
        rig.close()


def test_submitted_mail_gets_date_and_message_id_and_relayed_mail_never(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        submission = rig.session(listener=SUBMISSION)
        submission.ehlo()
        submission.auth("carol", PASSWORD)
        submission.mail("<carol@local.test>")
        submission.rcpt("<bob@elsewhere.test>")
        submission.data("Subject: hi\r\n\r\nhello\r\n")
        insider = rig.session(INSIDER)  # mynetworks may relay on port 25: its mail is not ours to change
        insider.ehlo()
        insider.mail("<x@example.org>")
        insider.rcpt("<bob@elsewhere.test>")
        insider.data("Subject: hi\r\n\r\nhello\r\n")
        submitted, relayed = rig.committer.stored
        _, content = split_received(submitted.body)
        date, msgid = content.split(b"\r\n")[1:3]
        assert date.startswith(b"Date: ") and content.endswith(b"\r\n\r\nhello\r\n")
        assert msgid == f"Message-ID: <{submitted.envelope.id}@mx.test>".encode(), content
        assert submitted.envelope.size == len(submitted.body)
        assert relayed.body.endswith(b"\r\nSubject: hi\r\n\r\nhello\r\n") and b"Message-ID" not in relayed.body
    finally:
        rig.close()


@pytest.mark.parametrize(("error", "reply", "reason"), [
    (QueueFull("no room"), "452 4.3.1", "queue_full"),
    (QueueIOError("disk"), "451 4.3.0", "queue_error"),
])
def test_a_failed_commit_is_a_4xx_and_nothing_is_announced(rig: Rig, error: Exception, reply: str,
                                                          reason: str) -> None:
    rig.committer.error = error
    s = rig.session()
    s.ehlo()
    s.mail("<x@example.org>")
    s.rcpt("<alice@local.test>")
    before = rejected(reason, "4xx")
    assert verdict(s.data()) == (reply, reason)
    assert rejected(reason, "4xx") - before == 1
    assert rig.notified.ids == []
    rig.committer.error = None
    s.mail("<x@example.org>")  # the session goes on
    s.rcpt("<alice@local.test>")
    assert s.data().accepted and len(rig.notified.ids) == 1


# --- rates, lists, memory ------------------------------------------------------------------------

def test_message_and_recipient_rates_refuse_with_450(tmp_path: Path) -> None:
    limited = Rig(tmp_path, rate=RateConfig(messages_per_window=1, recipients_per_window=2))
    try:
        s = limited.session()
        s.ehlo()
        assert s.mail("<x@example.org>").accepted
        assert s.rcpt("<alice@local.test>").reason == ""
        assert s.rcpt("<alice@local.test>").reason == ""
        assert verdict(s.rcpt("<alice@local.test>")) == ("450 4.7.1", "recipient_rate")
        s.data()
        assert verdict(s.mail("<x@example.org>")) == ("450 4.7.1", "message_rate")
        other = limited.session()  # another session of the same address: the same window (LMDB)
        other.ehlo()
        assert verdict(other.mail("<x@example.org>")) == ("450 4.7.1", "message_rate")
        trusted = limited.session(INSIDER)
        trusted.ehlo()
        assert trusted.mail("<x@example.org>").accepted
    finally:
        limited.close()


def test_sender_and_recipient_deny_lists(tmp_path: Path, log: io.StringIO) -> None:
    rig = Rig(tmp_path, policy=PolicyConfig(sender_deny=("spam.test",), recipient_deny=("alice@local.test",)))
    try:
        s = rig.session()
        s.ehlo()
        assert verdict(s.mail("<a@SPAM.test>")) == ("553 5.7.1", "sender_denied")
        assert s.mail("<>").accepted  # the null sender is never denied
        assert verdict(s.rcpt("<Alice@local.test>")) == ("550 5.7.1", "recipient_denied")
    finally:
        rig.close()
    assert "event=rejected client=192.0.2.10 reason=sender_denied reply=" in log.getvalue()
    assert "reason=recipient_denied" in log.getvalue() and "rcpt=Alice@local.test" in log.getvalue()


def test_the_memory_budget_refuses_mail_and_transfers_beyond_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, budget_bytes=4096)
    try:
        s = rig.session()
        s.ehlo()
        assert verdict(s.mail("<x@example.org> SIZE=3000")) == ("452 4.3.1", "memory_budget")
        assert s.mail("<x@example.org> SIZE=1000").accepted
        s.rcpt("<alice@local.test>")
        assert s.event("DATA") is NEED_DATA
        before = rejected("memory_budget", "4xx")
        s.session.receive_data(b"x" * 5000 + b"\r\n")
        assert rejected("memory_budget", "4xx") - before == 1
        s.session.receive_data(b"more\r\n.\r\n")
        assert s.conn.next_event() is NEED_DATA  # the core read the rest and kept none of it
        assert s.replies()[-1].startswith("451 4.3.1")
        assert rig.committer.stored == [] and rig.ctx.budget.held == 0
    finally:
        rig.close()


def test_vrfy_and_expn_answer_for_local_recipients(tmp_path: Path) -> None:
    rig = Rig(tmp_path, aliases="team: alice, bob@elsewhere.test\n", policy=PolicyConfig(vrfy=True, expn=True))
    try:
        s = rig.session()
        s.ehlo()
        for line, expected in (("VRFY alice@local.test", "250 2.1.5 <alice@local.test>"),
                               ("VRFY nobody@local.test", "550 5.1.1 User unknown in local recipient table"),
                               ("EXPN team@local.test", "250-2.1.5 <alice@local.test>")):
            event = s.event(line)
            assert isinstance(event, (Vrfy, Expn)), event
            s.conn.reply(s.session.check_vrfy(event))
            assert s.replies()[0] == expected
    finally:
        rig.close()


# --- DNSBL ---------------------------------------------------------------------------------------

def test_a_listed_client_waits_for_the_lookup_and_is_refused_at_mail(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.set("10.2.0.192.bl.test", "A", "127.0.0.2")
    cache = LmdbCache(str(tmp_path / "dns"))
    rig = Rig(tmp_path, resolver=MxResolver([dns_server.nameserver], cache, 2.0, random.Random(0)),
              policy=PolicyConfig(dnsbl=("bl.test",)))
    try:
        assert rig.session(INSIDER).session.dnsbl_lookup() is None  # mynetworks: never looked up
        s = rig.session()
        lookup = s.session.dnsbl_lookup()
        assert lookup is not None and s.session.waits_for_dnsbl
        asyncio.run(lookup)
        assert not s.session.waits_for_dnsbl
        s.ehlo()
        decision = s.mail("<x@example.org>")
        assert str(decision.reply) == "554 5.7.1 Service unavailable; client [192.0.2.10] blocked using bl.test"
        assert decision.reason == "dnsbl"
    finally:
        rig.close()
        cache.close()
