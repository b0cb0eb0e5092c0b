"""Backscatter through postmaster, with real processes: refused at RCPT, or bounced with headers only.

A bare <postmaster> used to be accepted from anyone; with nobody there to receive it,
a forged message bounced, in full, to the forged sender. Now it gets the verdict of
postmaster@ the first local domain (or @ [server] hostname, mx.test here, when there is
none): 550 5.1.1 unless a mailbox or an alias exists. Mail from a client neither in
mynetworks nor authenticated to any postmaster is stored with RET=HDRS, so its bounce
carries the original's header section only. The outside client connects from
127.0.0.9; mynetworks, where set, is 127.0.0.1/32.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, Reply, SmtpClient, queued_id, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import FAST_RETRY, mailbox, maildir_messages

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.9"
BODY_LINE = b"the secret body line that must not come back"


def serve(mta_server, tmp_path: Path, *, local: list[str], aliases: str | None = None,  # type: ignore[no-untyped-def]
          routes: dict[str, str] | None = None) -> MtaServer:
    """An mta delivering to Maildir under tmp_path/mail and to `routes`; mynetworks 127.0.0.1/32."""
    (tmp_path / "mail").mkdir(exist_ok=True)
    local_section = {"maildir_root": str(tmp_path / "mail")}
    if aliases is not None:
        (tmp_path / "aliases").write_text(aliases)
        local_section["aliases"] = str(tmp_path / "aliases")
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": local, "relay_domains": sorted(routes or {}), "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, **FAST_RETRY}, routes=routes or {}, local=local_section,
    )


async def rcpt_replies(port: int, paths: list[str], source: str = OUTSIDER) -> list[Reply]:
    """One transaction: MAIL, then each RCPT: their replies (RSET at the end, nothing is sent)."""
    client = await SmtpClient.connect(port, source=source)
    try:
        mail = await client.command("MAIL FROM:<someone@forged.test>")
        assert mail.code == 250, mail
        replies = [await client.command(f"RCPT TO:{path}") for path in paths]
        await client.command("RSET")
        return replies
    finally:
        await client.close()


async def send(port: int, mail_from: str, rcpt_path: str, subject: str, source: str = OUTSIDER) -> Reply:
    """One message with a body line we can look for; the reply that ended it."""
    client = await SmtpClient.connect(port, source=source)
    try:
        for line in (f"MAIL FROM:{mail_from}", f"RCPT TO:{rcpt_path}", "DATA"):
            reply = await client.command(line)
            if reply.code >= 400:
                return reply
        return await client.command(f"Subject: {subject}\r\n\r\n{BODY_LINE.decode()}\r\n.")
    finally:
        await client.close()


def codes(replies: list[Reply]) -> list[str]:
    return [f"{r.code} {r.text[:5]}" for r in replies]


def test_no_local_domains_and_no_alias_refuses_bare_postmaster(mta_server, tmp_path: Path) -> None:
    """(a) Nobody receives postmaster@mx.test: refused at RCPT, nothing queued, nothing bounced."""
    server = serve(mta_server, tmp_path, local=[])
    assert codes(asyncio.run(rcpt_replies(server.port, ["<postmaster>", "<POSTMASTER@mx.test>"]))) \
        == ["550 5.1.1", "550 5.1.1"]
    reply = asyncio.run(send(server.port, "<victim@forged.test>", "<postmaster>", "forged"))
    assert (reply.code, reply.text[:5]) == (550, "5.1.1"), reply
    assert server.queue_list() == []
    assert b"event=bounce_queued" not in server.log_bytes()


def test_local_domains_without_a_postmaster_refuse_both_forms(mta_server, tmp_path: Path) -> None:
    """(b) A local domain, with users, but no postmaster mailbox or alias."""
    mailbox(tmp_path, "local.test", "alice")
    server = serve(mta_server, tmp_path, local=["local.test"])
    replies = asyncio.run(rcpt_replies(server.port, ["<postmaster>", "<Postmaster>", "<postmaster@local.test>",
                                                     "<alice@local.test>"]))
    assert codes(replies) == ["550 5.1.1", "550 5.1.1", "550 5.1.1", "250 2.1.5"]
    # mynetworks grants relaying, never a local user that does not exist.
    assert codes(asyncio.run(rcpt_replies(server.port, ["<postmaster>"], source="127.0.0.1"))) == ["550 5.1.1"]


def test_bare_postmaster_reaches_the_mailbox_while_it_exists(mta_server, tmp_path: Path) -> None:
    """(c) A postmaster mailbox in the first local domain: delivered there; once removed, refused."""
    box = mailbox(tmp_path, "local.test", "postmaster")
    server = serve(mta_server, tmp_path, local=["local.test", "other.test"])
    assert queued_id(asyncio.run(send(server.port, "<someone@client.test>", "<postmaster>", "to the postmaster")))
    [delivered] = wait_until(lambda: maildir_messages(box), 15, "delivery to the postmaster mailbox", server)
    assert b"\nDelivered-To: postmaster@local.test\n" in delivered and BODY_LINE in delivered
    shutil.rmtree(box)  # mailboxes are looked up live: no reload
    assert codes(asyncio.run(rcpt_replies(server.port, ["<postmaster>"]))) == ["550 5.1.1"]


def test_no_local_domains_a_postmaster_alias_for_the_hostname_delivers(mta_server, tmp_path: Path) -> None:
    """(c) No local domains: the aliases file names who gets postmaster@mx.test, bare or not."""
    with SmtpSink("127.0.0.2") as sink:
        server = serve(mta_server, tmp_path, local=[], aliases="postmaster@mx.test: ops@remote.test\n",
                       routes={"remote.test": f"127.0.0.2:{sink.port}"})
        assert queued_id(asyncio.run(send(server.port, "<someone@client.test>", "<postmaster>", "bare")))
        assert queued_id(asyncio.run(send(server.port, "<someone@client.test>", "<postmaster@mx.test>", "full")))
        got = sink.wait_for_messages(2, timeout=15)
        assert sorted(m.recipients[0] for m in got) == ["ops@remote.test", "ops@remote.test"]
        assert all(BODY_LINE in m.data for m in got)


def test_a_bounce_of_untrusted_mail_to_postmaster_carries_headers_only(mta_server, tmp_path: Path) -> None:
    """(d) postmaster forwards to an address that refuses (550): the outsider's message bounces
    with its header section only, even though it asked RET=FULL; a trusted client's in full."""
    sender_box = mailbox(tmp_path, "local.test", "sender")
    with SmtpSink("127.0.0.2") as sink:
        server = serve(mta_server, tmp_path, local=["local.test"], aliases="postmaster: r550-ops@remote.test\n",
                       routes={"remote.test": f"127.0.0.2:{sink.port}"})
        for subject, source in (("from outside", OUTSIDER), ("from mynetworks", "127.0.0.1")):
            reply = asyncio.run(send(server.port, "<sender@local.test> RET=FULL", "<postmaster>", subject, source))
            assert queued_id(reply), reply
        bounces = wait_until(lambda: len(maildir_messages(sender_box)) == 2 and maildir_messages(sender_box), 20,
                             "two bounces in the sender's Maildir", server)
    returned = {}
    for raw in bounces:
        report = email.message_from_bytes(raw, policy=email.policy.default)
        assert report.get_content_type() == "multipart/report", raw[:300]
        parts = list(report.iter_parts())
        assert parts[1].get_content_type() == "message/delivery-status"
        assert b"r550-ops@remote.test" in raw and b"rfc822;postmaster" in raw
        subject = b"from outside" if b"Subject: from outside" in raw else b"from mynetworks"
        returned[subject] = (parts[2].get_content_type(), BODY_LINE in raw)
    assert returned == {b"from outside": ("text/rfc822-headers", False),
                        b"from mynetworks": ("message/rfc822", True)}
