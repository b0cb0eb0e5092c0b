"""Inbound policy decisions: from (config, client, command) to a Reply, and priorities.

Relay control (never an open relay): a recipient is accepted when its domain is in
[relay] local_domains or relay_domains (exact match, case-insensitive, no subdomain
wildcard), when it is the bare <postmaster> (RFC 5321 4.5.1), when the client is in
[relay] mynetworks, or when it has authenticated (SMTP AUTH). Everything else gets
554 5.7.1 for that recipient only. HELO names grant nothing.

Local recipients: in a local domain delivered to Maildir (no [routes] entry, or
"maildir"), a recipient must be an alias or have a mailbox directory, else 550 5.1.1
at RCPT time (never accept-then-bounce). Domains routed elsewhere (LMTP) are checked
by the server they are routed to.
"""

from __future__ import annotations

import ipaddress

from collections.abc import Sequence

from mta import logs
from mta.aliases import AliasError, Aliases
from mta.config import Config, RelayConfig
from mta.smtp import replies
from mta.smtp.address import AddressError, parse_path
from mta.smtp.commands import MailFrom, RcptTo
from mta.smtp.replies import Reply
from workers.delivery.maildir import mailbox_exists

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown in local recipient table")
ALIAS_BROKEN = Reply(451, "4.3.0", "Error: the alias for this recipient is broken, try again later")


class LocalRecipients:
    """Who exists in the local Maildir domains: an alias, or a mailbox directory."""

    def __init__(self, config: Config) -> None:
        self.aliases = Aliases.load(config.local.aliases or None)
        self.maildir_root = config.local.maildir_root
        self.domains = frozenset(d for d in config.relay.local_domains
                                 if config.routes.get(d, "maildir") == "maildir")
        self.all_local = tuple(config.relay.local_domains)

    def check(self, command: RcptTo) -> Reply | None:
        address = command.address
        domain = address.domain_key
        if domain not in self.domains:
            return None
        try:
            if self.aliases.expand(address.text, self.all_local) is not None:
                return None
        except AliasError as exc:
            logs.event("alias_error", rcpt=address.text, error=str(exc))
            return ALIAS_BROKEN
        if mailbox_exists(self.maildir_root, domain, address.local.lower()):
            return None
        return USER_UNKNOWN

    def verify(self, argument: str, *, expand: bool = False) -> Reply:
        """VRFY/EXPN, when the operator enabled them: only local Maildir recipients are known."""
        try:
            address = parse_path(argument if argument.startswith("<") else f"<{argument}>", utf8=False)
        except AddressError:
            return replies.bad_recipient("VRFY/EXPN take an address")
        if address.domain_key not in self.domains:
            return replies.VRFY_CANNOT
        if self.check(RcptTo(address)) is not None:
            return USER_UNKNOWN
        targets = self.expand(address.text) if expand else [address.text]
        return Reply(250, "2.1.5", tuple(f"<{t}>" for t in targets))

    def expand(self, address: str) -> list[str]:
        """Final recipients for an accepted address: alias targets, or the address itself."""
        try:
            targets = self.aliases.expand(address, self.all_local)
        except AliasError:  # already answered 451 at RCPT time; keep the address as sent
            return [address]
        return targets if targets else [address]


def check_mail_from(relay: RelayConfig, client: IPAddress | None, command: MailFrom) -> Reply:
    return replies.MAIL_OK


def check_rcpt_to(relay: RelayConfig, client: IPAddress | None, command: RcptTo,
                  local: LocalRecipients | None = None, *, authenticated: bool = False) -> Reply:
    address = command.address
    if not address.domain and address.local.lower() == "postmaster":
        return replies.RCPT_OK
    domain = address.domain_key
    if not domain.startswith("[") and (domain in relay.local_domains or domain in relay.relay_domains):
        unknown = local.check(command) if local is not None else None
        return unknown or replies.RCPT_OK
    if authenticated or (client is not None and any(client in net for net in relay.mynetworks)):
        return replies.RCPT_OK
    return replies.RELAY_DENIED


def message_priority(config: Config, *, sender: str, recipients: Sequence[str], listener: str,
                     user: str | None = None) -> int:
    """The highest priority among matching [[priority_rule]]s (0 when none matches)."""
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
