"""Mailing lists end to end: a real `mta serve` with delivery workers, posts over smtplib,
the members' and the owner's mail servers as an SmtpSink on loopback.

The list is team@lists.test (a local domain); its members are at d1/d2/d3.test and its
owner at owner.test, every one of those domains routed to the sink.
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_sendmail import bindir, call  # noqa: F401 (bindir: a fixture)

pytestmark = pytest.mark.integration

LIST = "team@lists.test"
OWNER = "boss@owner.test"
MEMBERS = ["ann@d1.test", "bob@d2.test", "cat@d3.test"]
LIST_FIELDS = {
    "List-Id": "<team.lists.test>",
    "List-Post": "<mailto:team@lists.test>",
    "List-Owner": "<mailto:team-owner@lists.test>",
    "List-Unsubscribe": "<mailto:team-owner@lists.test?subject=unsubscribe>",
    "Precedence": "list",
}


def write_members(path: Path, members: list[str]) -> None:
    """Replaced whole (a new inode), as an editor or `install` would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# the team\n" + "".join(f"{m}  # member\n" for m in members) + "\n")
    os.replace(tmp, path)


def list_server(mta_server, tmp_path: Path, sink: SmtpSink, *, posting: str = "members",  # type: ignore[no-untyped-def]
                **sections) -> MtaServer:
    members = tmp_path / "team.members"
    write_members(members, MEMBERS)
    (tmp_path / "mail" / "lists.test").mkdir(parents=True)
    target = f"{sink.address}:{sink.port}"
    routes = {d: target for d in ("d1.test", "d2.test", "d3.test", "d4.test", "owner.test", "else.test")}
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": ["lists.test"], "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, "min_backoff_seconds": 1, "max_backoff_seconds": 2},
        routes=routes, local={"maildir_root": str(tmp_path / "mail")},
        list=[{"address": LIST, "members_file": str(members), "owner": OWNER, "posting": posting}],
        **sections,
    )


def post(port: int, sender: str, recipients: list[str], subject: str, extra: str = "") -> None:
    body = (f"From: <{sender}>\r\nTo: <{LIST}>\r\nSubject: {subject}\r\n{extra}"
            f"Message-ID: <{subject.replace(' ', '.')}@d1.test>\r\n\r\nhello list\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(sender, recipients, body.encode())


def by_recipient(sink: SmtpSink) -> dict[str, list]:  # type: ignore[type-arg]
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for m in sink.messages:
        for r in m.recipients:
            out.setdefault(r, []).append(m)
    return out


def test_three_members_get_one_copy_each_and_other_recipients_the_original(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink)
        post(server.port, "ann@d1.test", [LIST, "eve@else.test"], "first post")
        sink.wait_for_messages(4, timeout=20)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        time.sleep(0.5)
        got = by_recipient(sink)
        assert sorted(got) == sorted(MEMBERS + ["eve@else.test"])
        for member in MEMBERS:
            [copy] = got[member]  # one copy each, whatever the sessions
            assert copy.sender == "team-bounces@lists.test"
            parsed = email.message_from_bytes(copy.data, policy=email.policy.compat32)
            for name, value in LIST_FIELDS.items():
                assert parsed.get_all(name) == [value], name
            assert parsed["Subject"] == "first post" and b"hello list" in copy.data
        [original] = got["eve@else.test"]
        assert original.sender == "ann@d1.test"
        assert b"List-Id" not in original.data and b"Precedence" not in original.data
        assert b"event=list_copy" in server.log_bytes()


def test_a_members_bounce_reaches_the_owner_not_the_poster(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", rcpt_rule=lambda a: (550, "5.1.1", "no such user") if a == "gone@d4.test" else None) as sink:
        server = list_server(mta_server, tmp_path, sink)
        write_members(tmp_path / "team.members", MEMBERS + ["gone@d4.test"])
        post(server.port, "ann@d1.test", [LIST], "a post")
        # The member's server refuses: our bounce, from <> about the list's copy, goes to the owner.
        wait_until(lambda: OWNER in by_recipient(sink), 20, "the owner's bounce", server)
        [bounce] = by_recipient(sink)[OWNER]
        assert bounce.sender == "" and b"gone@d4.test" in bounce.data and b"5.1.1" in bounce.data
        # A bounce that a member's server sends later, to the list's -bounces address: the owner too.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("", ["team-bounces@lists.test"], b"Subject: Undelivered Mail\r\n\r\nlate bounce\r\n")
            client.sendmail("ann@d1.test", ["team-owner@lists.test"], b"Subject: please add me\r\n\r\nhi\r\n")
        wait_until(lambda: len(by_recipient(sink)[OWNER]) == 3, 20, "the late bounce and the -owner mail", server)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        time.sleep(0.5)
        poster_mail = [m for m in sink.messages if "ann@d1.test" in m.recipients]
        assert len(poster_mail) == 1 and poster_mail[0].sender == "team-bounces@lists.test"  # her list copy only
        subjects = {email.message_from_bytes(m.data)["Subject"] for m in by_recipient(sink)[OWNER]}
        assert {"Undelivered Mail", "please add me"} <= subjects


def test_a_non_member_is_refused_at_rcpt_naming_the_list(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo()
            client.mail("stranger@else.test")
            code, text = client.rcpt(LIST)
            assert (code, text) == (550, b"5.7.1 <team@lists.test>: only members may post to this list")
            assert client.rcpt("team-request@lists.test")[0] == 550  # no address of the list's: unknown (5.1.1)
            assert client.rcpt("team-owner@lists.test")[0] == 250  # anyone may write to the owner
            client.rset()
            client.mail("Bob@D2.test")  # a member, as spelled differently
            assert client.rcpt(LIST)[0] == 250
        assert server.queue_list() == []
        assert b"reason=list_members_only" in server.log_bytes()


def test_a_message_carrying_the_lists_id_goes_to_the_owner_not_the_members(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink)
        # What a loop brings back: our own copy, through a list that has ours as a member.
        post(server.port, "bob@d2.test", [LIST], "looped", extra="List-Id: The Team <TEAM.lists.test>\r\n")
        [looped] = sink.wait_for_messages(1, timeout=20)
        assert looped.recipients == [OWNER] and looped.sender == "bob@d2.test"
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        time.sleep(0.5)
        assert len(sink.messages) == 1  # no member got it
        assert b"event=list_loop" in server.log_bytes()


def test_moderated_post_is_held_until_the_owner_releases_it(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink, posting="moderated")
        post(server.port, "stranger@else.test", [LIST], "moderate me")  # anyone may post: the owner decides
        [held] = wait_until(lambda: [m for m in server.queue_list() if m["recipients"][0]["state"] == "held"], 10,
                            "the held copy", server)
        assert held["sender"] == "team-bounces@lists.test"
        assert {r["state"] for r in held["recipients"]} == {"held"}
        listing = server.mta("queue", "list").stdout.decode()
        assert f"awaiting moderation by {OWNER}" in listing
        [notice] = sink.wait_for_messages(1, timeout=20)  # the owner is told
        assert notice.recipients == [OWNER] and f"mta queue release {held['id']}".encode() in notice.data
        time.sleep(1)
        assert len(sink.messages) == 1  # nothing for the members
        server.mta("queue", "release", held["id"])
        sink.wait_for_messages(4, timeout=20)
        assert sorted(by_recipient(sink)) == sorted(MEMBERS + [OWNER])
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)


def test_expn_answers_the_members(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink, policy={"expn": True})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            code, text = client.expn(LIST)
            assert code == 250
            assert text.decode().splitlines() == [f"2.1.5 <{m}>" for m in MEMBERS]
            assert client.expn("team-owner@lists.test") == (250, f"2.1.5 <{OWNER}>".encode())


def test_the_members_file_is_read_again_when_it_changes(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo()
            client.mail("dan@d4.test")
            assert client.rcpt(LIST)[0] == 550
            client.rset()
            write_members(tmp_path / "team.members", ["dan@d4.test", "ann@d1.test"])
            client.mail("dan@d4.test")  # the same session: no reload, no reconnect
            assert client.rcpt(LIST)[0] == 250
            client.data(b"Subject: new member\r\n\r\nhi\r\n")
        sink.wait_for_messages(2, timeout=20)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        time.sleep(0.5)
        assert sorted(by_recipient(sink)) == ["ann@d1.test", "dan@d4.test"]  # bob and cat were removed
        assert b"event=list_members_loaded" in server.log_bytes()


def test_mail_from_sendmail_to_a_list_reaches_the_members(mta_server, tmp_path: Path, bindir: Path) -> None:  # noqa: F811
    with SmtpSink("127.0.0.2") as sink:
        server = list_server(mta_server, tmp_path, sink)
        done = call(bindir, "sendmail", server, "-i", "-fcron@mx.test", LIST, "eve@else.test",
                    stdin=b"Subject: nightly report\n\nall good\n")
        assert done.returncode == 0, done.stderr
        sink.wait_for_messages(4, timeout=30)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        time.sleep(0.5)
        got = by_recipient(sink)
        assert sorted(got) == sorted(MEMBERS + ["eve@else.test"])
        assert {got[m][0].sender for m in MEMBERS} == {"team-bounces@lists.test"}
        assert got["eve@else.test"][0].sender == "cron@mx.test"
