"""RCPT policy (pure): the bare <postmaster> is decided and kept as a real address; RET=HDRS.

Backscatter (issue 13): a bare <postmaster> used to be accepted from anyone before any
local-recipient check, so a forged message to it bounced, in full, to the forged
sender. It now gets exactly the verdict of postmaster@ the first local domain (or of
postmaster@ our hostname when there is none), and mail from an untrusted client to any
postmaster is stored with RET=HDRS. The mailboxes and aliases files are real files.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mta.config import Config, LocalConfig, RelayConfig, ServerConfig
from mta.smtp.address import Address
from mta.smtp.commands import RcptTo, parse_command
from workers.inbound.policy import LocalRecipients, RcptDecision, check_rcpt_to, dsn_ret

OUTSIDER = ipaddress.ip_address("192.0.2.10")
INSIDER = ipaddress.ip_address("10.0.0.5")
MYNETWORKS = (ipaddress.ip_network("10.0.0.0/8"),)


def rcpt(path: str) -> RcptTo:
    command = parse_command(f"RCPT TO:{path}", utf8=False)
    assert isinstance(command, RcptTo), command
    return command


class Site:
    """A relay's recipient policy over real mailbox directories and a real aliases file."""

    def __init__(self, tmp_path: Path, local_domains: tuple[str, ...], aliases: str | None = None,
                 mailboxes: tuple[str, ...] = (), routes: dict[str, str] | None = None) -> None:
        root = tmp_path / "mail"
        for address in mailboxes:
            user, _, domain = address.partition("@")
            (root / domain / user).mkdir(parents=True)
        alias_file = ""
        if aliases is not None:
            (tmp_path / "aliases").write_text(aliases)
            alias_file = str(tmp_path / "aliases")
        self.config = Config(server=ServerConfig(hostname="MX.Test"),
                             relay=RelayConfig(local_domains=local_domains, relay_domains=("relay.test",),
                                               mynetworks=MYNETWORKS),
                             local=LocalConfig(maildir_root=str(root), aliases=alias_file),
                             routes=routes or {})
        self.local = LocalRecipients(self.config)

    def check(self, path: str, client: ipaddress.IPv4Address = OUTSIDER, **kw: bool) -> RcptDecision:
        return check_rcpt_to(self.config.relay, client, rcpt(path), self.local,
                             hostname=self.config.server.hostname, **kw)


def verdict(decision: RcptDecision) -> tuple[int, str, str]:
    return decision.reply.code, decision.reply.status, decision.reason


UNKNOWN = (550, "5.1.1", "user_unknown")
OK = (250, "2.1.5", "")


# --- local domains -----------------------------------------------------------------------

def test_without_a_postmaster_both_forms_are_unknown_users(tmp_path: Path) -> None:
    site = Site(tmp_path, ("local.test", "other.test"), mailboxes=("alice@local.test",))
    for path in ("<postmaster>", "<PostMaster>", "<postmaster@local.test>", "<POSTMASTER@Local.Test>"):
        assert verdict(site.check(path)) == UNKNOWN, path
    # Neither trust nor AUTH makes an unknown local user exist.
    assert verdict(site.check("<postmaster>", INSIDER)) == UNKNOWN
    assert verdict(site.check("<postmaster>", authenticated=True)) == UNKNOWN
    assert verdict(site.check("<alice@local.test>")) == OK


def test_the_bare_form_is_kept_as_postmaster_at_the_first_local_domain(tmp_path: Path) -> None:
    site = Site(tmp_path, ("local.test", "other.test"), mailboxes=("postmaster@local.test",))
    decision = site.check("<Postmaster>")
    assert verdict(decision) == OK
    assert decision.rcpt == RcptTo(Address("postmaster", "local.test"), None, "rfc822;Postmaster")
    # NOTIFY and an ORCPT the client gave are kept as they were.
    given = site.check("<postmaster> NOTIFY=NEVER ORCPT=rfc822;pm@example.org")
    assert given.rcpt == RcptTo(Address("postmaster", "local.test"), ("NEVER",), "rfc822;pm@example.org")
    # The first local domain decides, not the second (which has no postmaster).
    assert verdict(site.check("<postmaster@other.test>")) == UNKNOWN
    # Addresses with a domain are kept as sent.
    assert site.check("<postmaster@local.test>").rcpt == rcpt("<postmaster@local.test>")


def test_a_bare_postmaster_alias_serves_both_forms(tmp_path: Path) -> None:
    site = Site(tmp_path, ("local.test",), aliases="postmaster: ops@example.com\n")
    for path in ("<postmaster>", "<postmaster@local.test>"):
        decision = site.check(path)
        assert verdict(decision) == OK, path
        assert site.local.expand(decision.rcpt.address.text) == ["ops@example.com"]


def test_a_broken_postmaster_alias_is_a_temporary_failure(tmp_path: Path) -> None:
    site = Site(tmp_path, ("local.test",), aliases="postmaster: a\na: b\nb: a\n")
    assert verdict(site.check("<postmaster>")) == (451, "4.3.0", "rcpt")


def test_a_first_local_domain_routed_to_lmtp_is_judged_by_the_lmtp_server(tmp_path: Path) -> None:
    site = Site(tmp_path, ("lmtp.test",), routes={"lmtp.test": "lmtp:127.0.0.1:24"})
    decision = site.check("<postmaster>")
    assert verdict(decision) == OK and decision.rcpt.address.text == "postmaster@lmtp.test"


# --- no local domains: postmaster@ our hostname ----------------------------------------

def test_no_local_domains_and_no_alias_refuses_bare_postmaster_as_unknown(tmp_path: Path) -> None:
    site = Site(tmp_path, ())
    decision = site.check("<postmaster>")
    assert verdict(decision) == UNKNOWN
    assert decision.rcpt.address.text == "postmaster@mx.test"
    # The explicit address gets the same verdict: ours to refuse, not "relay denied".
    assert verdict(site.check("<postmaster@mx.test>")) == UNKNOWN
    assert verdict(site.check("<postmaster@relay-me.test>")) == (554, "5.7.1", "relay")
    # Without a local recipient table nobody is known there either.
    assert verdict(check_rcpt_to(site.config.relay, OUTSIDER, rcpt("<postmaster>"), None,
                                 hostname="mx.test")) == UNKNOWN


def test_no_local_domains_a_trusted_client_gets_the_relay_rules(tmp_path: Path) -> None:
    site = Site(tmp_path, ())
    for kw in ({"client": INSIDER}, {"authenticated": True}):
        decision = site.check("<postmaster>", **kw)  # type: ignore[arg-type]
        assert verdict(decision) == OK, kw
        assert decision.rcpt.address.text == "postmaster@mx.test"


@pytest.mark.parametrize("aliases", ["postmaster: ops@example.com\n", "postmaster@mx.test: ops@example.com\n"])
def test_no_local_domains_a_postmaster_alias_applies_to_the_hostname(tmp_path: Path, aliases: str) -> None:
    site = Site(tmp_path, (), aliases=aliases)
    for path in ("<postmaster>", "<postmaster@mx.test>", "<postmaster@MX.TEST>"):
        decision = site.check(path)
        assert verdict(decision) == OK, path
        assert site.local.expand(decision.rcpt.address.text) == ["ops@example.com"]
    assert verdict(site.check("<postmaster@elsewhere.test>")) == (554, "5.7.1", "relay")


# --- RET ------------------------------------------------------------------------------

@pytest.mark.parametrize("requested", [None, "FULL", "HDRS"])
def test_untrusted_mail_to_any_postmaster_is_stored_with_ret_hdrs(requested: str | None) -> None:
    to_postmaster = [rcpt("<alice@local.test>"), rcpt("<PostMaster@local.test>")]
    assert dsn_ret(requested, to_postmaster, trusted=False) == "HDRS"
    assert dsn_ret(requested, [rcpt("<postmaster@relay.test>")], trusted=False) == "HDRS"
    assert dsn_ret(requested, to_postmaster, trusted=True) == requested
    assert dsn_ret(requested, [rcpt("<alice@local.test>")], trusted=False) == requested


# --- the virtual mailboxes file ------------------------------------------------------------

def virtual_site(tmp_path: Path) -> Site:
    (tmp_path / "mail" / "a.test").mkdir(parents=True)
    (tmp_path / "mail" / "a.test" / "dironly").mkdir()  # a folder alone no longer makes a mailbox
    (tmp_path / "mailboxes").write_text("alice@a.test aliases=al@b.test\nfull@a.test quota_messages=1\n")
    box = tmp_path / "mail" / "a.test" / "full"
    (box / "new").mkdir(parents=True)
    (box / "new" / "1.M1P1.h,S=10").write_bytes(b"x" * 10)
    site = Site(tmp_path, ("a.test", "b.test"))
    site.config = Config(server=site.config.server, relay=site.config.relay,
                         local=LocalConfig(maildir_root=str(tmp_path / "mail"), mailboxes=str(tmp_path / "mailboxes")))
    site.local = LocalRecipients(site.config)
    return site


def test_with_a_mailboxes_file_it_decides_who_exists_and_who_is_full(tmp_path: Path) -> None:
    site = virtual_site(tmp_path)
    assert verdict(site.check("<alice@a.test>")) == OK
    assert verdict(site.check("<AL@b.test>")) == OK
    assert verdict(site.check("<dironly@a.test>")) == UNKNOWN
    assert verdict(site.check("<alice@b.test>")) == UNKNOWN
    assert verdict(site.check("<full@a.test>")) == (452, "4.2.2", "mailbox_full")
    assert site.local.verify("full@a.test").code == 250  # full, but it exists
    assert site.local.expand("Al@b.test") == ["alice@a.test"]  # an alias goes to its mailbox
    assert site.local.expand("alice@a.test") == ["alice@a.test"]
