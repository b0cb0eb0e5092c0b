"""`mta mailbox add|delete|list|quota`: the real command in a subprocess, on a real file and Maildir."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from mta.mailboxfile import Mailbox, load_mailboxes
from tests.mta.test_cli_users import mta


def setup(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "mail").mkdir()
    config = tmp_path / "mta.toml"
    config.write_text(f'[local]\nmaildir_root = "{tmp_path / "mail"}"\nmailboxes = "{tmp_path / "mailboxes"}"\n')
    return config, tmp_path / "mailboxes"


def test_add_list_quota_delete(tmp_path: Path) -> None:
    config, path = setup(tmp_path)
    done = mta("mailbox", "add", "-c", str(config), "Alice@A.test", "--quota-bytes", "1000",
               "--quota-messages", "10", "--aliases", "al@b.test, alice.smith@a.test")
    assert done.returncode == 0, done.stderr
    assert mta("mailbox", "add", "-c", str(config), "bob@a.test").returncode == 0
    assert load_mailboxes(str(path)).lookup("al@b.test") == Mailbox(
        "alice@a.test", 1000, 10, ("al@b.test", "alice.smith@a.test"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    box = tmp_path / "mail" / "a.test" / "alice"
    (box / "cur").mkdir(parents=True)
    (box / "cur" / "1.M1P1.h,S=300,W=310:2,S").write_bytes(b"x" * 300)
    (box / "maildirsize").write_text("1000S,10C\n300 1\n")
    quota = mta("mailbox", "quota", "-c", str(config), "AL@b.test")
    assert quota.returncode == 0, quota.stderr
    assert quota.stdout == "alice@a.test  300 of 1000 bytes, 1 of 10 messages (30.0% full)\n"
    listed = mta("mailbox", "list", "-c", str(config), "--json")
    rows = {row["address"]: row for row in json.loads(listed.stdout)}
    assert rows["alice@a.test"]["bytes"] == 300 and rows["alice@a.test"]["percent"] == 30.0
    assert rows["bob@a.test"] == {"address": "bob@a.test", "aliases": [], "quota_bytes": 0, "quota_messages": 0,
                                  "bytes": 0, "messages": 0, "percent": None}
    text = mta("mailbox", "list", "-c", str(config))
    assert "alice@a.test  300 of 1000 bytes" in text.stdout and "aliases: al@b.test,alice.smith@a.test" in text.stdout
    assert "-- 2 mailbox(es)" in text.stderr
    deleted = mta("mailbox", "delete", "-c", str(config), "alice@a.test")
    assert deleted.returncode == 0 and "is left as it is" in deleted.stderr
    assert (box / "maildirsize").exists()
    assert path.read_text() == "bob@a.test\n"


def test_refusals_say_why(tmp_path: Path) -> None:
    config, path = setup(tmp_path)
    assert mta("mailbox", "add", "-c", str(config), "alice@a.test", "--aliases", "al@b.test").returncode == 0
    again = mta("mailbox", "add", "-c", str(config), "al@b.test")
    assert again.returncode == 1 and "al@b.test is already an alias of alice@a.test" in again.stderr
    bad = mta("mailbox", "add", "-c", str(config), "carol")
    assert bad.returncode == 1 and "'carol' is not an address" in bad.stderr
    gone = mta("mailbox", "delete", "-c", str(config), "carol@a.test")
    assert gone.returncode == 1 and "no mailbox carol@a.test" in gone.stderr
    unknown = mta("mailbox", "quota", "-c", str(config), "carol@a.test")
    assert unknown.returncode == 1
    assert path.read_text() == "alice@a.test aliases=al@b.test\n"
    none = mta("mailbox", "list", "--file", "")
    assert none.returncode == 2 and "set [local] mailboxes" in none.stderr


def test_config_check_reads_the_file(tmp_path: Path) -> None:
    config, path = setup(tmp_path)
    path.write_text("alice@a.test\nbob@a.test quota_bytes=lots\n")
    bad = mta("config", "check", "-c", str(config))
    assert bad.returncode == 2 and f"[local] mailboxes: {path}:2: quota_bytes=lots" in bad.stderr
    path.write_text("alice@a.test\n")
    good = mta("config", "check", "-c", str(config))
    assert good.returncode == 0 and f"mailboxes OK: 1 in {path}" in good.stdout
