"""`mta users`: the real command in a subprocess, passwords on stdin, never in the file or the output."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path

from mta.users import load_users, verify_password

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Tr0ub4dor&3 with spaces "  # the trailing space is part of it


def mta(*args: str, stdin: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "queue")])
    return subprocess.run([sys.executable, "-m", "mta", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)


def test_add_stores_a_hash_never_the_password(tmp_path: Path) -> None:
    users = tmp_path / "users"
    done = mta("users", "add", "alice@example.com", "--file", str(users), "--sender", "@example.com",
               "--sender", "news@example.org", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "alice@example.com" in done.stderr and done.stderr.count("\n") == 1
    assert PASSWORD.strip() not in users.read_text() + done.stdout + done.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    user = load_users(str(users))["alice@example.com"]
    assert user.senders == ("@example.com", "news@example.org")
    assert verify_password(PASSWORD, user.hash)
    assert not verify_password(PASSWORD.strip(), user.hash)  # only the newline was stripped


def test_the_config_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text('[auth]\nusers_file = "users"\n')
    done = mta("users", "add", "bob", "-c", str(config), stdin="pw\n", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list(load_users(str(tmp_path / "users"))) == ["bob"]


def test_passwd_changes_only_the_password(tmp_path: Path) -> None:
    users = str(tmp_path / "users")
    assert mta("users", "add", "app", "--file", users, "--sender", "@example.com", stdin="old\n").returncode == 0
    done = mta("users", "passwd", "app", "--file", users, stdin="new\n")
    assert done.returncode == 0, done.stderr
    user = load_users(users)["app"]
    assert verify_password("new", user.hash) and not verify_password("old", user.hash)
    assert user.senders == ("@example.com",)


def test_delete_and_list_without_hashes(tmp_path: Path) -> None:
    users = str(tmp_path / "users")
    for name in ("a@example.com", "b@example.com", "app"):
        assert mta("users", "add", name, "--file", users, stdin="pw\n").returncode == 0
    assert mta("users", "delete", "b@example.com", "--file", users).returncode == 0

    listed = mta("users", "list", "--file", users)
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == ["a@example.com  a@example.com", "app  (no sender address)"]
    as_json = mta("users", "list", "--json", "--file", users)
    assert json.loads(as_json.stdout) == [{"name": "a@example.com", "senders": []}, {"name": "app", "senders": []}]
    for output in (listed, as_json):
        assert "scrypt" not in output.stdout + output.stderr


def test_list_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    done = mta("users", "list", "--json", "--file", str(tmp_path / "users"))
    assert done.returncode == 0 and json.loads(done.stdout) == []


def test_no_users_file_is_a_usage_error(tmp_path: Path) -> None:
    for action in (["add", "a@example.com"], ["passwd", "a@example.com"], ["delete", "a@example.com"], ["list"]):
        done = mta("users", *action, stdin="pw\n", cwd=tmp_path)
        assert done.returncode == 2, done
        assert "[auth] users_file" in done.stderr and "--file" in done.stderr


def test_errors_exit_1_and_change_nothing(tmp_path: Path) -> None:
    users = tmp_path / "users"
    assert mta("users", "add", "a@example.com", "--file", str(users), stdin="pw\n").returncode == 0
    before = users.read_text()
    refusals = [
        (("add", "a@example.com"), "pw\n", "exists, use `mta users passwd"),
        (("passwd", "nobody@example.com"), "pw\n", "no user nobody@example.com"),
        (("delete", "nobody@example.com"), "", "no user nobody@example.com"),
        (("add", "new@example.com"), "", "must not be empty"),
        (("add", "new@example.com"), "\n", "must not be empty"),
        (("add", "bad name"), "pw\n", "white space"),
        (("add", "new@example.com", "--sender", "example.com"), "pw\n", '"@example.com"'),
    ]
    for args, stdin, why in refusals:
        done = mta("users", *args, "--file", str(users), stdin=stdin)
        assert done.returncode == 1, (args, done)
        assert why in done.stderr, (args, done.stderr)
    assert users.read_text() == before


def test_a_malformed_file_is_refused_with_its_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# users\nbroken\n")
    for args in (("list",), ("delete", "broken")):
        done = mta("users", *args, "--file", str(users))
        assert done.returncode == 1
        assert f"{users}:2:" in done.stderr
    assert users.read_text() == "# users\nbroken\n"


def on_terminal(args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run `mta ARGS` on a pseudo-terminal, typing `answers` at each prompt; (exit status, what it showed)."""
    env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "queue")])
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling tty, as for an operator
        os.execve(sys.executable, [sys.executable, "-m", "mta", *args], env)
    shown = b""
    for answer in answers:
        while not shown.rstrip().endswith(b":"):
            shown += os.read(fd, 1024)
        os.write(fd, answer.encode() + b"\n")
        shown += b"|"
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), shown.decode()


def test_a_terminal_is_asked_twice_without_echo(tmp_path: Path) -> None:
    users = str(tmp_path / "users")
    status, shown = on_terminal(["users", "add", "a@example.com", "--file", users], [PASSWORD, PASSWORD])
    assert status == 0, shown
    assert PASSWORD.strip() not in shown and "Again:" in shown
    assert verify_password(PASSWORD, load_users(users)["a@example.com"].hash)
    status, shown = on_terminal(["users", "passwd", "a@example.com", "--file", users], ["one", "two"])
    assert status == 1 and "the passwords differ" in shown
    assert verify_password(PASSWORD, load_users(users)["a@example.com"].hash)
