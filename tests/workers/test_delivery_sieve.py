"""A mailbox's script run for one recipient (workers/delivery/sieve.py): the Plan that
local delivery carries out, over real script files and the real mta.sieve interpreter."""

from __future__ import annotations

import os
from pathlib import Path

from workers.delivery.sieve import MAX_REDIRECTS, SCRIPT_NAME, Plan, Scripts, plan

MESSAGE = (b"From: alice@client.test\r\nTo: bob@local.test\r\nSubject: weekly report\r\n"
           b"Message-ID: <m1@client.test>\r\n\r\nbody\r\n")
NOW = 1_800_000_000.0


def run(box: Path, script: str | None, body: bytes = MESSAGE, scripts: Scripts | None = None) -> Plan | None:
    if script is not None:
        (box / SCRIPT_NAME).write_text(script)
    return plan(scripts or Scripts(), str(box), sender="alice@client.test", recipient="bob@local.test",
                addresses=("bob@local.test",), body=body, hostname="mx.test", now=NOW)


def test_no_script_is_no_plan(tmp_path: Path) -> None:
    assert run(tmp_path, None) is None


def test_fileinto_names_map_to_one_folder_each(tmp_path: Path) -> None:
    result = run(tmp_path, 'require "fileinto"; fileinto "Work/Reports"; fileinto "Work.Reports"; keep;')
    assert result is not None and result.error is None
    assert result.folders == [".Work.Reports", ""]


def test_reject_stores_nothing_and_keeps_its_reason_on_one_line(tmp_path: Path) -> None:
    result = run(tmp_path, 'require "reject"; reject text:\r\nNot\r\n   here.\r\n.\r\n;')
    assert result is not None and result.error is None
    assert result.folders == [] and result.reject == "Not here."


def test_an_impossible_folder_fails_the_run_and_keeps(tmp_path: Path) -> None:
    result = run(tmp_path, 'require "fileinto"; fileinto "a//b"; redirect "c@remote.test";')
    assert result is not None
    assert result.folders == [""] and result.redirects == [] and "empty level" in (result.error or "")


def test_more_redirects_than_the_limit_fail_the_run(tmp_path: Path) -> None:
    script = "".join(f'redirect "r{n}@remote.test";' for n in range(MAX_REDIRECTS + 1))
    result = run(tmp_path, script)
    assert result is not None and result.folders == [""] and result.redirects == []
    assert f"more than {MAX_REDIRECTS} redirects" in (result.error or "")
    limit = run(tmp_path, "".join(f'redirect "r{n}@remote.test";' for n in range(MAX_REDIRECTS)))
    assert limit is not None and limit.error is None and len(limit.redirects) == MAX_REDIRECTS


def test_a_message_redirected_from_this_mailbox_before_is_not_redirected_again(tmp_path: Path) -> None:
    looped = b"Delivered-To: Bob@local.test\r\n" + MESSAGE
    result = run(tmp_path, 'redirect "dave@local.test";', body=looped)
    assert result is not None and result.folders == [""] and result.redirects == []
    assert "mail forwarding loop" in (result.error or "")
    body_mention = MESSAGE + b"Delivered-To: bob@local.test\r\n"  # in the body: not a header
    ok = run(tmp_path, 'redirect "dave@local.test";', body=body_mention)
    assert ok is not None and ok.redirects == ["dave@local.test"]


def test_a_broken_script_is_parsed_once_per_version(tmp_path: Path) -> None:
    scripts = Scripts()
    broken = run(tmp_path, "if true { keep;", scripts=scripts)
    assert broken is not None and broken.folders == [""] and "does not parse" in (broken.error or "")
    again = plan(scripts, str(tmp_path), sender="a@b.test", recipient="bob@local.test", addresses=(),
                 body=MESSAGE, hostname="mx.test", now=NOW)
    assert again is not None and again.error == broken.error
    (tmp_path / SCRIPT_NAME).write_text("discard;")
    os.utime(tmp_path / SCRIPT_NAME, ns=(1, 2))  # another version, whatever the clock's resolution
    fixed = plan(scripts, str(tmp_path), sender="a@b.test", recipient="bob@local.test", addresses=(),
                 body=MESSAGE, hostname="mx.test", now=NOW)
    assert fixed is not None and fixed.discarded and fixed.folders == []


def test_vacation_not_due_says_why(tmp_path: Path) -> None:
    listed = MESSAGE.replace(b"\r\n\r\n", b"\r\nList-Id: <news.client.test>\r\n\r\n", 1)
    result = run(tmp_path, 'require "vacation"; vacation "away";', body=listed)
    assert result is not None and result.vacation is None and result.folders == [""]
    assert result.actions[0] == "vacation:not-due" and "mailing list" in (result.vacation_skipped or "")
    due = run(tmp_path, 'require "vacation"; vacation "away";')
    assert due is not None and due.vacation is not None and due.vacation.to == "alice@client.test"
