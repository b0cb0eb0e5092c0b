"""Inbound policy decisions: from (config, client, command) to a Decision, and priorities.

Relay control (never an open relay): a recipient is accepted when its domain is in
[relay] local_domains or relay_domains (exact match, case-insensitive, no subdomain
wildcard), when the client is in [relay] mynetworks, or when it has authenticated
(SMTP AUTH). Everything else gets 554 5.7.1 for that recipient only. HELO names grant
nothing.

Local recipients: in a local domain delivered to Maildir (no [routes] entry, or
"maildir"), a recipient must be an alias or have a mailbox directory, else 550 5.1.1
at RCPT time (never accept-then-bounce). With [local] mailboxes, a mailbox exists when
the file lists it (or one of its aliases, which the commit rewrites to the mailbox's
address, ORCPT keeping the original); a listed mailbox full by its quota (mta/quota.py)
is 452 4.2.2 (the message may come back when there is room). Domains routed elsewhere
(LMTP) are checked by the server they are routed to.
A mailing list's addresses (mta/lists.py) exist too: its -bounces and -owner addresses
expand to its owner; EXPN of the list answers its members.

Postmaster (RFC 5321 4.5.1) without backscatter: the bare <postmaster> is decided, and
stored, as postmaster@ the first local domain, or @ [server] hostname when there is
none; it gets exactly the verdict of that address. With no local domains the
hostname's postmaster is ours only through the aliases file (whose bare names then
apply to the hostname): unknown, it is 550 5.1.1 for a client that may not relay.
Mail from such a client to any postmaster is stored with DSN RET=HDRS (`dsn_ret`), so
a bounce never returns a forged message in full.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

from mta import logs, quota
from mta.aliases import AliasError, Aliases
from mta.config import Config, RelayConfig
from mta.lists import Lists
from mta.mailboxes import mailbox_exists, mailbox_path
from mta.mailboxfile import MailboxFile
from mta.smtp import replies
from mta.smtp.address import Address, AddressError, parse_path
from mta.smtp.commands import MailFrom, RcptTo
from mta.smtp.replies import Reply
from workers.inbound.decision import Decision

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown in local recipient table")
ALIAS_BROKEN = Reply(451, "4.3.0", "Error: the alias for this recipient is broken, try again later")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")
# Refusals of a recipient, each with its reason (the mta_inbound_rejected_total label).
UNKNOWN_USER = Decision(USER_UNKNOWN, "user_unknown")
BROKEN_ALIAS = Decision(ALIAS_BROKEN, "rcpt")
FULL_MAILBOX = Decision(MAILBOX_FULL, "mailbox_full")
NO_RELAY = Decision(replies.RELAY_DENIED, "relay")


@dataclasses.dataclass(frozen=True, slots=True)
class RcptDecision:
    """A RCPT verdict, why it was refused, and the recipient as the transaction keeps it."""

    reply: Reply
    reason: str  # "" when accepted; else relay | user_unknown | mailbox_full | rcpt (the rejected-metric label)
    rcpt: RcptTo  # the bare <postmaster> as postmaster@domain, ORCPT keeping what was sent


class LocalRecipients:
    """Who exists in the local Maildir domains: a mailing list, an alias, or a mailbox directory."""

    def __init__(self, config: Config) -> None:
        self.aliases = Aliases.load(config.local.aliases or None)
        self.lists = Lists(config.list)
        self.maildir_root = config.local.maildir_root
        self.domains = frozenset(d for d in config.relay.local_domains
                                 if config.routes.get(d, "maildir") == "maildir")
        # No local domains: the aliases file's bare names (`postmaster: ...`) apply to our hostname.
        self.all_local = tuple(config.relay.local_domains) or (config.server.hostname.lower().rstrip("."),)
        self.mailboxes = MailboxFile(config.local.mailboxes) if config.local.mailboxes else None

    def check(self, command: RcptTo) -> Decision | None:
        """None when the recipient exists here (or is not ours to judge); else the refusal."""
        address = command.address
        domain = address.domain_key
        if domain not in self.domains or (self.lists and self.lists.find(address.text) is not None):
            return None
        unknown = self.check_alias(address)
        if unknown is not UNKNOWN_USER:
            return unknown
        if self.mailboxes is not None:
            return self.check_mailbox(address.text)
        if mailbox_exists(self.maildir_root, domain, address.local.lower()):
            return None
        return unknown

    def check_mailbox(self, address: str) -> Decision | None:
        """A listed mailbox with room (None), full (FULL_MAILBOX) or none (UNKNOWN_USER)."""
        assert self.mailboxes is not None
        box = self.mailboxes.lookup(address)
        if box is None:
            return UNKNOWN_USER
        if box.has_quota:
            limits = quota.Limits(box.quota_bytes, box.quota_messages)
            try:
                usage = quota.usage(mailbox_path(self.maildir_root, box.domain, box.user), limits, write=False)
            except OSError as exc:  # delivery meets the same error and answers for it
                logs.event("quota_error", mailbox=box.address, error=str(exc))
                return None
            if usage.full(limits):
                return FULL_MAILBOX
        return None

    def check_alias(self, address: Address) -> Decision | None:
        """None when `address` is an alias; UNKNOWN_USER when not; BROKEN_ALIAS when it cannot expand."""
        try:
            if self.aliases.expand(address.text, self.all_local) is not None:
                return None
        except AliasError as exc:
            logs.event("alias_error", rcpt=address.text, error=str(exc))
            return BROKEN_ALIAS
        return UNKNOWN_USER

    def verify(self, argument: str, *, expand: bool = False) -> Reply:
        """VRFY/EXPN, when the operator enabled them: only local Maildir recipients are known."""
        try:
            address = parse_path(argument if argument.startswith("<") else f"<{argument}>", utf8=False)
        except AddressError:
            return replies.bad_recipient("VRFY/EXPN take an address")
        if address.domain_key not in self.domains:
            return replies.VRFY_CANNOT
        if self.check(RcptTo(address)) not in (None, FULL_MAILBOX):  # full: it still exists
            return USER_UNKNOWN
        found = self.lists.find(address.text) if self.lists else None
        if expand and found is not None and found[1] == "post":
            targets = list(found[0].members()) or [address.text]
        else:
            targets = self.expand(address.text) if expand else [address.text]
        return Reply(250, "2.1.5", tuple(f"<{t}>" for t in targets))

    def expand(self, address: str) -> list[str]:
        """Final recipients for an accepted address: a list's owner for its -bounces and
        -owner addresses, alias targets, or the address itself (a list's too: listpost.py)."""
        found = self.lists.find(address) if self.lists else None
        if found is not None:
            return [found[0].owner] if found[1] != "post" else [address]
        try:
            targets = self.aliases.expand(address, self.all_local)
        except AliasError:  # already answered 451 at RCPT time; keep the address as sent
            return [address]
        if targets:
            return targets
        local = address.rpartition("@")[2].lower().rstrip(".") in self.domains
        box = self.mailboxes.lookup(address) if self.mailboxes is not None and local else None
        return [box.address] if box is not None and box.address != address.lower() else [address]


def check_mail_from(relay: RelayConfig, client: IPAddress | None, command: MailFrom) -> Reply:
    return replies.MAIL_OK


def check_rcpt_to(relay: RelayConfig, client: IPAddress | None, command: RcptTo,
                  local: LocalRecipients | None = None, *, hostname: str,
                  authenticated: bool = False) -> RcptDecision:
    """`local` None: no local recipient table (every address of a local domain exists)."""
    host = hostname.lower().rstrip(".")
    if not command.address.domain:  # the bare <postmaster>, the one path the parser allows without a domain
        command = RcptTo(Address("postmaster", relay.local_domains[0] if relay.local_domains else host),
                         command.notify, command.orcpt or f"rfc822;{command.address.text}")
    address = command.address
    domain = address.domain_key
    if not domain.startswith("[") and (domain in relay.local_domains or domain in relay.relay_domains):
        return _decision(local.check(command) if local is not None else None, command)
    may_relay = authenticated or (client is not None and any(client in net for net in relay.mynetworks))
    if not relay.local_domains and domain == host and address.local.lower() == "postmaster":
        unknown = local.check_alias(address) if local is not None else UNKNOWN_USER
        if unknown is not UNKNOWN_USER or not may_relay:  # ours to refuse: 550 5.1.1, not "relay denied"
            return _decision(unknown, command)
    return _decision(None if may_relay else NO_RELAY, command)


def _decision(refusal: Decision | None, rcpt: RcptTo) -> RcptDecision:
    if refusal is None:
        return RcptDecision(replies.RCPT_OK, "", rcpt)
    return RcptDecision(refusal.reply, refusal.reason, rcpt)


def dsn_ret(requested: str | None, recipients: Sequence[RcptTo], *, trusted: bool) -> str | None:
    """The RET stored with a message: HDRS for mail to any postmaster from a client neither in
    mynetworks nor authenticated, whatever it asked: its bounce goes to a sender that may be
    forged (backscatter), so it never carries the original in full."""
    if not trusted and any(r.address.local.lower() == "postmaster" for r in recipients):
        return "HDRS"
    return requested


def message_priority(config: Config, *, sender: str, recipients: Sequence[str], listener: str,
                     user: str | None = None) -> int:
    """The highest priority among matching [[priority_rule]]s (0 when none matches)."""
    if not config.priority_rule:  # the usual configuration: no domain to work out
        return 0
    sender_domain = sender.rpartition("@")[2].lower()
    rcpt_domains = {r.rpartition("@")[2].lower() for r in recipients}
    best = 0
    for rule in config.priority_rule:
        if rule.sender_domain is not None and rule.sender_domain.lower() != sender_domain:
            continue
        if rule.recipient_domain is not None and rule.recipient_domain.lower() not in rcpt_domains:
            continue
        if rule.listener is not None and rule.listener != listener:
            continue
        if rule.user is not None and rule.user != user:
            continue
        best = max(best, rule.priority)
    return best
