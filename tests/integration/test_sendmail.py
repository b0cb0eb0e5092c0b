"""sendmail and mailq as cron, PHP and scripts call them, against a real server and a real sink.

The command is run as installed: a console script (`mta-sendmail`) linked as `sendmail`
and `mailq`, with the server's configuration in MTA_CONFIG (/etc/mta/mta.toml on a host).
Mail goes through the maildrop, the pickup in inbound worker #1, the queue and a delivery
worker to an SMTP sink on 127.0.0.2.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mta import maildrop
from mtaqueue import Envelope, NewMessage, Recipient
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import new_id
from tests.integration.conftest import REPO_ROOT, MtaServer, free_port, server_config, toml_dumps, wait_until
from tests.integration.sink import SmtpSink, SinkMessage

pytestmark = pytest.mark.integration

CLI_SECONDS = 60


def relay_to(make: Callable[..., MtaServer], sink: SmtpSink, backoff_seconds: int = 1) -> MtaServer:
    """A server with one inbound worker (so #1 is the pickup) that delivers sink.test to `sink`."""
    return make(server={"inbound_workers": 1},
                delivery={"workers": 1, "min_backoff_seconds": backoff_seconds, "max_backoff_seconds": 2 * backoff_seconds},
                routes={"sink.test": f"{sink.address}:{sink.port}"})


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """The console script as pip installs it, linked as sendmail and mailq (as under /usr/sbin, /usr/bin)."""
    return make_bindir(tmp_path / "bin", sys.executable)


def make_bindir(where: Path, python: str) -> Path:
    where.mkdir()
    script = where / "mta-sendmail"
    script.write_text(f"#!{python}\nimport sys\nfrom mta.sendmail import main\nsys.exit(main())\n")
    script.chmod(0o755)
    for name in ("sendmail", "mailq"):
        (where / name).symlink_to(script)
    return where


def call(bindir: Path, name: str, server: MtaServer, *args: str, stdin: bytes = b"",
         pythonpath: str | None = None, config: Path | None = None, **user: object) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    env["PYTHONPATH"] = pythonpath or os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "queue")])
    env["MTA_CONFIG"] = str(config or server.config_path)
    return subprocess.run([str(bindir / name), *args], input=stdin, env=env, capture_output=True,
                          timeout=CLI_SECONDS, **user)  # type: ignore[call-overload]


def delivered(sink: SmtpSink) -> list[str]:
    return sorted(r for m in sink.messages for r in m.recipients)


def only_once(sink: SmtpSink, n: int, seconds: float = 2.0) -> list[SinkMessage]:
    """The n messages, and no more after `seconds` (a second copy would have come by then)."""
    got = sink.wait_for_messages(n, timeout=30)
    time.sleep(seconds)
    assert len(sink.messages) == n, [m.recipients for m in sink.messages]
    return got


def maildrop_of(server: MtaServer) -> Path:
    return Path(f"{server.spool}-maildrop")


def test_cron_s_t_i_with_a_bcc_reaches_each_recipient_once_and_the_bcc_field_never_leaves(
        mta_server: Callable[..., MtaServer], bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)
        cron = (b"From: root (Cron Daemon)\nTo: admin@sink.test\nBcc: auditor@sink.test\n"
                b"Subject: Cron <root@host> backup.sh\n\nbackup done\n.\nthe line above is a lone dot\n")
        done = call(bindir, "sendmail", server, "-t", "-i", stdin=cron)
        assert (done.returncode, done.stderr) == (0, b"")
        [got] = only_once(sink, 1)
        assert delivered(sink) == ["admin@sink.test", "auditor@sink.test"]
        assert got.sender == "root@mx.test"
        assert b"Bcc" not in got.data and b"auditor" not in got.data
        assert got.data.endswith(b"\r\n\r\nbackup done\r\n.\r\nthe line above is a lone dot\r\n")
        assert re.match(rb"Received: by mx\.test \(mta, from local uid 0\)\r\n\tid [0-9A-F]{21};", got.data)
        parsed = email.message_from_bytes(got.data, policy=email.policy.SMTP)
        assert parsed["Date"] and parsed["Message-ID"].endswith("@mx.test>")
        assert b"\r\nFrom: root (Cron Daemon)\r\n" in got.data
        assert list((maildrop_of(server) / "new").iterdir()) == [] and list((maildrop_of(server) / "pickup").iterdir()) == []


def test_php_mail_s_minus_f_sets_the_envelope_sender(mta_server: Callable[..., MtaServer], bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)
        php = b"To: customer@sink.test\nSubject: Your order\nFrom: Shop <shop@example.com>\n\nThanks!\n"
        done = call(bindir, "sendmail", server, "-t", "-i", "-fbounces@example.com", stdin=php)
        assert done.returncode == 0, done.stderr
        [got] = only_once(sink, 1)
        assert (got.sender, got.recipients) == ("bounces@example.com", ["customer@sink.test"])
        assert b"\r\nFrom: Shop <shop@example.com>\r\n" in got.data


def test_a_bs_session_is_answered_like_smtp_and_its_dsn_parameters_travel(mta_server: Callable[..., MtaServer],
                                                                          bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)
        session = (b"EHLO localhost\r\nMAIL FROM:<app@example.com> ENVID=order-17\r\n"
                   b"RCPT TO:<one@sink.test> NOTIFY=FAILURE,DELAY\r\nRCPT TO:<bad address>\r\nDATA\r\n"
                   b"Subject: -bs\r\n\r\n..a stuffed dot\r\n.\r\nQUIT\r\n")
        done = call(bindir, "sendmail", server, "-bs", stdin=session)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.decode().split("\r\n")
        assert lines[0] == "220 mx.test ESMTP" and "250 DSN" in lines
        after_ehlo = lines[lines.index("250 DSN") + 1:]
        assert after_ehlo[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", after_ehlo[2]] and after_ehlo[2].startswith("501 ")
        assert after_ehlo[3] == "354 End data with <CR><LF>.<CR><LF>"
        assert re.fullmatch(r"250 2\.0\.0 Ok: queued as [0-9a-f]{32}", after_ehlo[4])
        assert after_ehlo[5:] == ["221 2.0.0 mx.test closing connection", ""]
        [got] = only_once(sink, 1)
        assert got.recipients == ["one@sink.test"] and got.data.endswith(b"\r\n\r\n.a stuffed dot\r\n")
        assert got.mail_params.get("ENVID") == "order-17" and got.rcpt_params[0].get("NOTIFY") == "FAILURE,DELAY"


def test_mailq_lists_the_queue_in_postfix_s_layout(mta_server: Callable[..., MtaServer], bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink, backoff_seconds=600)  # deferred once, then still while we look
        assert call(bindir, "mailq", server).stdout == b"Mail queue is empty\n"
        for rcpt in ("r450-later@sink.test", "r450-held@sink.test"):
            assert call(bindir, "sendmail", server, rcpt, stdin=b"Subject: q\n\nbody\n").returncode == 0
        entries = wait_until(lambda: e if len(e := server.queue_list()) == 2 and all(
            m["recipients"][0]["last_reply"] for m in e) else None, 20, "two deferred messages", server)
        held = next(e for e in entries if "held" in e["recipients"][0]["address"])
        server.mta("queue", "hold", held["id"])
        listing = call(bindir, "mailq", server)
        assert listing.returncode == 0, listing.stderr
        assert call(bindir, "sendmail", server, "-bp").stdout == listing.stdout
        lines = listing.stdout.decode().splitlines()
        assert lines[0] == "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
        blocks = "\n".join(lines[1:]).split("\n\n")
        assert blocks[-1] == f"-- {sum(e['size'] for e in entries) // 1024} Kbytes in 2 Requests."
        for block, e in zip(blocks[:2], sorted(entries, key=lambda e: e["id"])):
            first, reason, rcpt = block.split("\n")
            arrival = time.asctime(time.localtime(datetime.datetime.fromisoformat(e["arrival"]).timestamp()))[:20]
            mark = "!" if e is held else ""
            assert first == f"{e['id'] + mark:<11} {e['size']:>7} {arrival} root@mx.test"
            assert reason == f"{'(' + e['recipients'][0]['last_reply'] + ')':>78}" and reason.lstrip().startswith("(450 ")
            assert rcpt == " " * 41 + e["recipients"][0]["address"]
        server.mta("queue", "delete", "--all")
        assert call(bindir, "mailq", server).stdout == b"Mail queue is empty\n"


def test_mail_sent_while_the_server_is_down_is_delivered_once_it_starts(mta_server: Callable[..., MtaServer],
                                                                        bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)  # started once: it made the maildrop
        server.stop()
        for n in range(3):
            done = call(bindir, "sendmail", server, "-i", f"down{n}@sink.test", stdin=b"Subject: down\n\nbody\n")
            assert (done.returncode, done.stderr) == (0, b"")
        assert len(list((maildrop_of(server) / "new").iterdir())) == 3
        server.start()
        only_once(sink, 3)
        assert delivered(sink) == ["down0@sink.test", "down1@sink.test", "down2@sink.test"]


def test_a_pickup_killed_between_commit_and_finish_delivers_once(mta_server: Callable[..., MtaServer], bindir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTA_TEST_HOOKS", "1")  # crash-pickup: SIGKILL after the commit, before the files go
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)
        crash = server.spool / "crash-pickup"
        crash.touch()
        assert call(bindir, "sendmail", server, "once@sink.test", stdin=b"Subject: k\n\nbody\n").returncode == 0
        wait_until(lambda: b"hook=crash-pickup" in server.log_bytes(), 20, "the pickup's crash", server)
        crash.unlink()
        only_once(sink, 1, seconds=3.0)
        log = server.log_bytes()
        assert log.count(b"event=received ") == 1 and b"pickup_again" not in log
        assert list((maildrop_of(server) / "pickup").iterdir()) == []


def test_files_a_crash_left_are_settled_by_the_master_before_anything_delivers(
        mta_server: Callable[..., MtaServer], bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)
        server.stop()
        pickup = maildrop_of(server) / "pickup"
        long_ago = time.time() - 3600  # claimed an hour ago: a worker alone could not tell them apart
        committed, lost = new_id(long_ago), new_id(long_ago + 1)
        for msgid, rcpt in ((committed, "committed@sink.test"), (lost, "lost@sink.test")):
            drop = maildrop.Drop("a@example.com", (maildrop.DropRecipient(rcpt),))
            (pickup / msgid).write_bytes(maildrop.encode(drop, b"Subject: crash\r\n\r\nbody\r\n"))
        spool = LmdbBackend(str(server.spool), 64 * 1024 * 1024)
        body = b"Subject: crash\r\n\r\nbody\r\n"
        spool.commit([NewMessage(Envelope(committed, "a@example.com", [Recipient("committed@sink.test")], len(body),
                                          long_ago, long_ago + 60), body)])
        spool.close()
        server.start()
        only_once(sink, 2)
        assert delivered(sink) == ["committed@sink.test", "lost@sink.test"]
        log = server.log_bytes()
        assert re.search(rb"proc=master .*event=maildrop_settled finished=1 again=1", log), server.log_tail()
        assert b"pickup_again" not in log


def test_garbage_in_the_maildrop_is_set_aside_and_everything_else_delivered(mta_server: Callable[..., MtaServer],
                                                                            bindir: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relay_to(mta_server, sink)
        server.stop()
        new = maildrop_of(server) / "new"
        (new / "garbage").write_bytes(b"\x00\xffnot a maildrop file")
        (new / "shadow").symlink_to("/etc/shadow")
        os.mkfifo(new / "fifo")
        (new / "bad-address").write_bytes(maildrop.encode(
            maildrop.Drop("a@example.com", (maildrop.DropRecipient("no domain"),)), b"x\r\n"))
        assert call(bindir, "sendmail", server, "good@sink.test", stdin=b"Subject: ok\n\nbody\n").returncode == 0
        server.start()
        only_once(sink, 1)
        assert delivered(sink) == ["good@sink.test"]
        wait_until(lambda: len(list((maildrop_of(server) / "corrupt").iterdir())) == 4, 10, "4 files set aside", server)
        log = server.log_bytes()
        assert log.count(b"event=maildrop_corrupt") == 4 and b"pickup_crashed" not in log
        assert call(bindir, "sendmail", server, "after@sink.test", stdin=b"Subject: ok\n\nbody\n").returncode == 0
        only_once(sink, 2, seconds=0.5)  # the pickup still runs


# --- an unprivileged user ---------------------------------------------------------------------

USERS = ("mtatest-a", "mtatest-b")


@pytest.fixture
def local_users() -> Iterator[dict[str, tuple[int, int]]]:
    """Two ordinary users (the tests run as root), removed afterwards: name -> (uid, gid)."""
    import pwd
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make unprivileged users")
    made = []
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
            made.append(name)
    try:
        yield {name: (pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid) for name in USERS}
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)


def system_python() -> str:
    """A python3 >= 3.11 every user may run (ours may live under /root): the shim needs only the stdlib."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]).returncode == 0:
            return candidate
    pytest.skip("no python3 >= 3.11 outside /root for an unprivileged user")


def test_an_unprivileged_user_submits_and_cannot_read_another_users_file(local_users: dict[str, tuple[int, int]],
                                                                         tmp_path: Path) -> None:
    python = system_python()
    base = Path(tempfile.mkdtemp(prefix="mta-sendmail-", dir="/tmp"))  # reachable by every user, unlike tmp_path
    base.chmod(0o755)
    server = None
    try:
        shutil.copytree(REPO_ROOT / "mta", base / "lib" / "mta", ignore=shutil.ignore_patterns("__pycache__"))
        bindir = make_bindir(base / "bin", python)
        with SmtpSink("127.0.0.2") as sink:
            port = free_port()
            config = base / "mta.toml"
            config.write_text(toml_dumps(server_config(
                port, base / "spool", server={"inbound_workers": 1}, delivery={"workers": 1},
                routes={"sink.test": f"{sink.address}:{sink.port}"})))
            config.chmod(0o644)
            server = MtaServer(config, port, base / "spool", tmp_path / "mta.log").start()
            (uid_a, gid_a), (uid_b, gid_b) = local_users[USERS[0]], local_users[USERS[1]]
            as_a = {"user": uid_a, "group": gid_a, "extra_groups": [], "pythonpath": str(base / "lib")}
            private = base / "private.toml"
            private.write_text(config.read_text())
            private.chmod(0o600)
            done = call(bindir, "sendmail", server, "first@sink.test", stdin=b"body\n", config=private, **as_a)
            assert done.returncode == 78 and b"cannot read the configuration" in done.stderr, done.stderr
            done = call(bindir, "sendmail", server, "-t", "-i", stdin=b"To: first@sink.test\nSubject: a\n\nhi\n", **as_a)
            assert (done.returncode, done.stderr) == (0, b"")
            [got] = only_once(sink, 1, seconds=0.5)
            assert got.sender == f"{USERS[0]}@mx.test"
            assert re.match(rb"Received: by mx\.test \(mta, from local uid %d\)" % uid_a, got.data)

            server.stop()  # the next file stays in the maildrop
            done = call(bindir, "sendmail", server, "second@sink.test", stdin=b"Subject: b\n\nsecret\n", **as_a)
            assert done.returncode == 0, done.stderr
            new = base / "spool-maildrop" / "new"
            [path] = list(new.iterdir())
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_gid) == (uid_a, 0o640, new.stat().st_gid)
            snoop = ("import os, sys\n"
                     "for what, act in (('list', lambda: os.listdir(sys.argv[1])), ('read', lambda: open(sys.argv[2], 'rb').read())):\n"
                     "    try:\n        act(); print(what, 'allowed')\n"
                     "    except PermissionError:\n        print(what, 'denied')\n")
            for uid, gid in ((uid_b, gid_b), (uid_a, gid_a)):
                seen = subprocess.run([python, "-c", snoop, str(new), str(path)], user=uid, group=gid, extra_groups=[],
                                      capture_output=True, timeout=CLI_SECONDS)
                expected = "list denied\nread denied\n" if uid == uid_b else "list denied\nread allowed\n"
                assert seen.stdout.decode() == expected, seen.stderr

            server.start()
            only_once(sink, 2, seconds=0.5)
            assert delivered(sink) == ["first@sink.test", "second@sink.test"]
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_reload_that_moves_the_maildrop_is_refused(mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    import signal
    import tomllib
    server = mta_server()
    assert server.config_path is not None
    doc = tomllib.loads(server.config_path.read_text())
    doc["queue"]["maildrop"] = str(tmp_path / "elsewhere")
    server.config_path.write_text(toml_dumps(doc))
    os.kill(server.master_pid, signal.SIGHUP)
    wait_until(lambda: b"reload_failed error=\"[queue] path or maildrop changed" in server.log_bytes(), 10,
               "the refused reload", server)
    assert not (tmp_path / "elsewhere").exists()
