"""Inbound policy decisions: pure functions from (config, client, command) to a Reply.

Relay control (never an open relay): a recipient is accepted when its domain is in
[relay] local_domains or relay_domains (exact match, case-insensitive, no subdomain
wildcard), when it is the bare <postmaster> (RFC 5321 4.5.1), or when the client is in
[relay] mynetworks. Everything else gets 554 5.7.1 for that recipient only.
"""

from __future__ import annotations

import ipaddress

from mta.config import RelayConfig
from mta.smtp import replies
from mta.smtp.commands import MailFrom, RcptTo
from mta.smtp.replies import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def check_mail_from(relay: RelayConfig, client: IPAddress | None, command: MailFrom) -> Reply:
    return replies.MAIL_OK


def check_rcpt_to(relay: RelayConfig, client: IPAddress | None, command: RcptTo) -> Reply:
    address = command.address
    if not address.domain and address.local.lower() == "postmaster":
        return replies.RCPT_OK
    domain = address.domain_key
    if not domain.startswith("[") and (domain in relay.local_domains or domain in relay.relay_domains):
        return replies.RCPT_OK
    if client is not None and any(client in net for net in relay.mynetworks):
        return replies.RCPT_OK
    return replies.RELAY_DENIED
