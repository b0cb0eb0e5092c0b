"""Mailing lists' data: the members file, the list's header fields and its loop check, [[list]] validation."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from mta import logs
from mta.config import ConfigError, ListConfig, parse
from mta.listheaders import add_list_fields, carries_list_id
from mta.lists import Lists, MailingList, MembersError, bounces_owner, parse_members

TEAM = ListConfig(address="Team@Lists.test", members_file="", owner="boss@owner.test")


def test_members_file_comments_duplicates_and_errors() -> None:
    text = "# the team\n\nann@d1.test\nbob@d2.test   # Bob\n  ANN@d1.test\n#cat@d3.test\n"
    assert parse_members(text, "f") == ("ann@d1.test", "bob@d2.test")
    with pytest.raises(MembersError, match=r"f:2: one address per line"):
        parse_members("ann@d1.test\nann@d1.test bob@d2.test\n", "f")
    with pytest.raises(MembersError, match=r"f:1: 'ann' is not an address"):
        parse_members("ann\n", "f")


def test_members_are_read_again_when_the_file_changes_and_a_bad_file_keeps_the_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs, "_stream", log)
    path = tmp_path / "members"
    lst = MailingList(ListConfig(address="team@lists.test", members_file=str(path), owner="boss@owner.test"))
    assert lst.members() == () and "list_members_missing" in log.getvalue()
    path.write_text("ann@d1.test\n")
    assert lst.members() == ("ann@d1.test",) and lst.is_member("ANN@D1.test")
    path.write_text("ann@d1.test\nbob@d2.test\n")  # same inode, new size
    assert lst.is_member("bob@d2.test")
    path.write_text("ann@d1.test\nnot an address\n")
    assert lst.members() == ("ann@d1.test", "bob@d2.test")  # the last good copy
    assert "event=list_members_invalid" in log.getvalue() and "members:2:" in log.getvalue()
    os.remove(path)
    assert lst.members() == ()


def test_a_list_owns_its_address_its_bounces_and_owner_addresses() -> None:
    lists = Lists((TEAM,))
    [team] = lists.all
    assert lists.find("team@lists.test") == (team, "post")
    assert lists.find("TEAM-Bounces@lists.test") == (team, "bounces")
    assert lists.find("team-owner@lists.test") == (team, "owner")
    assert lists.find("team-request@lists.test") is None and lists.find("team@other.test") is None
    assert team.list_id == "team.lists.test"
    assert bounces_owner((TEAM,), "team-bounces@LISTS.test") == "boss@owner.test"
    assert bounces_owner((TEAM,), "team@lists.test") is None


def test_list_fields_go_at_the_end_of_the_header_and_replace_their_names() -> None:
    [team] = Lists((TEAM,)).all
    message = (b"Received: by mx.test\r\n\tid X\r\nSubject: hi\r\nList-Id: <other.lists.test>\r\n"
               b"precedence: bulk\r\nList-Post:\r\n <mailto:other@lists.test>\r\n\r\nbody\r\nList-Id: kept\r\n")
    assert add_list_fields(message, team) == (
        b"Received: by mx.test\r\n\tid X\r\nSubject: hi\r\n"
        b"List-Id: <team.lists.test>\r\nList-Post: <mailto:Team@Lists.test>\r\n"
        b"List-Owner: <mailto:team-owner@lists.test>\r\n"
        b"List-Unsubscribe: <mailto:team-owner@lists.test?subject=unsubscribe>\r\nPrecedence: list\r\n"
        b"\r\nbody\r\nList-Id: kept\r\n")
    assert add_list_fields(b"Subject: no body\r\n", team).endswith(b"Subject: no body\r\nList-Id: <team.lists.test>"
                                                                   b"\r\nList-Post: <mailto:Team@Lists.test>\r\n"
                                                                   b"List-Owner: <mailto:team-owner@lists.test>\r\n"
                                                                   b"List-Unsubscribe: <mailto:team-owner@lists."
                                                                   b"test?subject=unsubscribe>\r\nPrecedence: list\r\n")


def test_the_loop_check_reads_list_id_fields_only() -> None:
    assert carries_list_id(b"Subject: x\r\nList-ID: The Team\r\n <TEAM.lists.test>\r\n\r\nb\r\n", "team.lists.test")
    assert not carries_list_id(b"Subject: x\r\nList-Id: <other.lists.test>\r\n\r\nb\r\n", "team.lists.test")
    assert not carries_list_id(b"Subject: x\r\n\r\nList-Id: <team.lists.test>\r\n", "team.lists.test")


@pytest.mark.parametrize(("table", "error"), [
    ({"address": "team@else.test", "members_file": "m", "owner": "o@x.test"}, "local_domains"),
    ({"address": "team", "members_file": "m", "owner": "o@x.test"}, "address: must be an address"),
    ({"address": "team@lists.test", "owner": "o@x.test"}, "members_file: required"),
    ({"address": "team@lists.test", "members_file": "m"}, "owner: must be the address"),
    ({"address": "team@lists.test", "members_file": "m", "owner": "team-owner@lists.test"}, "a person's"),
    ({"address": "team@lists.test", "members_file": "m", "owner": "o@x.test", "posting": "open"}, "posting: must be"),
    ({"address": "team@lists.test", "members_file": "m", "owner": "o@x.test", "moderator": "x"}, "unknown key"),
])
def test_list_tables_are_checked(table: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse({"relay": {"local_domains": ["lists.test"]}, "list": [table]})


def test_two_lists_cannot_own_one_address() -> None:
    tables = [{"address": "team-owner@lists.test", "members_file": "m", "owner": "o@x.test"},
              {"address": "team@lists.test", "members_file": "m", "owner": "o@x.test"}]
    with pytest.raises(ConfigError, match=r"\[\[list\]\] #2 address: team-owner@lists.test is already"):
        parse({"relay": {"local_domains": ["lists.test"]}, "list": tables})
    config = parse({"relay": {"local_domains": ["lists.test"]}, "list": tables[1:]})
    assert config.list == (ListConfig("team@lists.test", "m", "o@x.test", "members"),)
