"""Posts to a mailing list: who may post, and the copies stored for a message (listpost.py).
Members come from real files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import ListConfig, parse
from mta.lists import Lists
from mtaqueue import Envelope, NewMessage, Recipient, new_id
from workers.inbound.listpost import check_post, split
from workers.inbound.policy import LocalRecipients

BODY = b"Received: by mx.test; id X\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def lists(tmp_path: Path) -> Lists:
    (tmp_path / "team").write_text("ann@d1.test\nbob@d2.test\n")
    (tmp_path / "mods").write_text("ann@d1.test\n")
    (tmp_path / "empty").write_text("# nobody yet\n")
    return Lists((ListConfig("team@lists.test", str(tmp_path / "team"), "boss@owner.test"),
                  ListConfig("mods@lists.test", str(tmp_path / "mods"), "boss@owner.test", "moderated"),
                  ListConfig("open@lists.test", str(tmp_path / "empty"), "boss@owner.test", "anyone")))


def stored(*rcpts: str, body: bytes = BODY) -> NewMessage:
    envelope = Envelope(id=new_id(), sender="eve@else.test", recipients=[Recipient(r, ("FAILURE",)) for r in rcpts],
                        size=len(body), arrival=1.0, next_attempt=1.0, ret="FULL", envid="E1", client={"ip": "1.2.3.4"})
    return NewMessage(envelope, body)


def test_members_only_takes_the_envelope_sender_of_a_member(lists: Lists) -> None:
    refusal = check_post(lists, "TEAM@lists.test", "eve@else.test")
    assert refusal is not None and str(refusal.reply) == "550 5.7.1 <team@lists.test>: only members may post to this list"
    assert refusal.reason == "list_members_only"
    assert check_post(lists, "team@lists.test", "") is not None  # <> is nobody's address
    assert check_post(lists, "team@lists.test", "Bob@D2.test") is None
    assert check_post(lists, "team-bounces@lists.test", "") is None  # bounces reach the owner
    assert check_post(lists, "mods@lists.test", "eve@else.test") is None  # the owner moderates
    assert check_post(lists, "eve@else.test", "x@y.test") is None


def test_no_list_recipient_stores_the_message_as_it_is(lists: Lists) -> None:
    message = stored("a@else.test")
    assert [c.message for c in split(message, lists)] == [message]


def test_the_list_copy_goes_to_the_members_from_the_bounces_address(lists: Lists) -> None:
    message = stored("x@else.test", "team@lists.test")
    original, copy = split(message, lists)
    assert original.message.envelope.id == message.envelope.id and original.list is None
    assert [r.address for r in original.message.envelope.recipients] == ["x@else.test"]
    assert original.message.body == BODY
    env = copy.message.envelope
    assert env.id != message.envelope.id and copy.list == "team@lists.test" and copy.held_for is None
    assert env.sender == "team-bounces@lists.test" and env.ret is None and env.envid is None
    assert [(r.address, r.state, r.notify) for r in env.recipients] == [("ann@d1.test", "ready", None),
                                                                         ("bob@d2.test", "ready", None)]
    assert copy.message.body.startswith(b"Received: by mx.test; id X\r\nSubject: hi\r\nList-Id: <team.lists.test>\r\n")
    assert env.size == len(copy.message.body) and env.client["list"] == "team@lists.test"


def test_a_post_to_lists_only_keeps_the_id_for_the_first_copy(lists: Lists) -> None:
    message = stored("team@lists.test", "mods@lists.test",
                     body=BODY.replace(b"Subject: hi", b"Subject: a\r\n long one"))
    team, mods, notice = split(message, lists)
    assert team.message.envelope.id == message.envelope.id and mods.message.envelope.id != message.envelope.id
    assert [(r.state, r.last_reply) for r in mods.message.envelope.recipients] == [
        ("held", "awaiting moderation by boss@owner.test")]
    assert mods.held_for == "boss@owner.test"
    # The owner is told, in the same transaction, what waits and how to send it.
    held_id = mods.message.envelope.id
    assert notice.list is None and notice.held_for is None
    env = notice.message.envelope
    assert (env.sender, [(r.address, r.state) for r in env.recipients]) == (
        "mods-bounces@lists.test", [("boss@owner.test", "ready")])
    text = notice.message.body.decode()
    assert "\r\nTo: <boss@owner.test>\r\n" in text and "From: <mods-owner@lists.test>\r\n" in text
    assert "Subject: mods@lists.test: a post from eve@else.test awaits moderation\r\n" in text
    assert "  subject:  a long one\r\n" in text and f"mta queue release {held_id}\r\n" in text
    assert env.size == len(notice.message.body)


def test_a_loop_and_an_empty_list_go_to_the_owner_once(lists: Lists) -> None:
    looped = stored("team@lists.test", "open@lists.test", "boss@owner.test",
                    body=b"List-Id: <team.lists.test>\r\n" + BODY)
    [only] = split(looped, lists)
    assert only.message.envelope.id == looped.envelope.id and only.message.body == looped.body
    assert [(r.address, r.orcpt) for r in only.message.envelope.recipients] == [("boss@owner.test", None)]
    [owner] = split(stored("open@lists.test"), lists)
    assert [(r.address, r.orcpt) for r in owner.message.envelope.recipients] == [
        ("boss@owner.test", "rfc822;open@lists.test")]


def test_members_that_are_local_aliases_or_lists_are_expanded_once_without_looping(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("sales@lists.test: sam@d5.test, sue@d6.test\nboss: boss@owner.test\n")
    (tmp_path / "all").write_text("team@lists.test\nsales@lists.test\nann@d1.test\nall@lists.test\n"
                                  "all-owner@lists.test\n")
    (tmp_path / "team").write_text("ann@d1.test\nbob@d2.test\nall@lists.test\n")  # all is a member of team too
    config = parse({"relay": {"local_domains": ["lists.test"]}, "local": {"aliases": str(tmp_path / "aliases")},
                    "list": [{"address": "all@lists.test", "members_file": str(tmp_path / "all"), "owner": "o@x.test"},
                             {"address": "team@lists.test", "members_file": str(tmp_path / "team"),
                              "owner": "o@x.test"}]})
    local = LocalRecipients(config)
    [copy] = split(stored("all@lists.test"), local.lists, local.expand)
    assert [r.address for r in copy.message.envelope.recipients] == [
        "ann@d1.test", "bob@d2.test", "sam@d5.test", "sue@d6.test"]
    assert copy.message.envelope.sender == "all-bounces@lists.test"
    assert copy.message.body.count(b"List-Id:") == 1
