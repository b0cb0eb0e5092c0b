"""A private Dovecot 2.3 on loopback over mta's Maildirs: IMAP, POP3, LMTP, ManageSieve, maildir quota, Sieve.

    with mail_user() as vmail, start_dovecot(tmp_path, vmail, {"alice@example.test": DovecotUser("pw")}) as dc:
        # mta: [local] maildir_root = dc.mail_root, or [routes] "example.test" = dc.lmtp_route
        imap = imaplib.IMAP4("127.0.0.1", dc.imap_port); imap.login("alice@example.test", "pw")

Its own dovecot.conf, base_dir, state_dir, log and mail root in a fresh world-searchable
directory in /tmp (the login processes run as dovenull and chroot into base_dir, and the
mail user must reach the mail root: pytest's 0700 tmp_path would shut both out); nothing
under /etc/dovecot or /run/dovecot is read or written, no system service is involved.
Users are a passwd-file (passdb and userdb, the quota_rule from its userdb fields);
mail_location is mta's layout, `maildir:<root>/%Ld/%Ln` (INBOX is the mailbox directory
itself, folders are Maildir++ `.Folder`) and home the same directory, so Pigeonhole's
active script is `<mailbox>/.dovecot.sieve`, where mta looks too. Mail is accessed as
`mail_user`: Dovecot refuses uid 0, so as root mail_user() makes a system user.
At exit the master gets SIGTERM, then its process group SIGKILL; the log is copied to
tmp_path/dovecot.log and the directory removed.

Invariant: when start_dovecot's context exits, no process of that Dovecot is alive.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, group_alive

DOVECOT = "/usr/sbin/dovecot"
# package -> a file it installs that these tests need (Makefile TEST_DEBS has the same pairs)
PACKAGES = {"dovecot-core": DOVECOT, "dovecot-imapd": "/usr/lib/dovecot/imap",
            "dovecot-pop3d": "/usr/lib/dovecot/pop3", "dovecot-lmtpd": "/usr/lib/dovecot/lmtp",
            "dovecot-sieve": "/usr/bin/sievec", "dovecot-managesieved": "/usr/lib/dovecot/managesieve"}
START_SECONDS = 30.0
STOP_SECONDS = 10.0

_CONF = """\
# A private Dovecot for mta's tests: nothing outside {base} is written.
base_dir = {base}/run
state_dir = {base}/state
instance_name = mta-test-{imap_port}
log_path = {base}/dovecot.log
protocols = imap pop3 lmtp sieve
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
{privileges}
first_valid_uid = {first_valid_uid}
mail_uid = {mail_uid}
mail_gid = {mail_gid}
mail_location = maildir:{mail_root}/%Ld/%Ln
# only directories are folders: not the .dovecot.sieve link, nor mta's files in the mailbox
maildir_stat_dirs = yes
mail_plugins = $mail_plugins quota

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {base}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {base}/users
  default_fields = uid={mail_uid} gid={mail_gid} home={mail_root}/%Ld/%Ln
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    address = 127.0.0.1
    port = {managesieve_port}
  }}
}}

protocol imap {{
  mail_plugins = $mail_plugins imap_quota
}}
# fileinto a folder that does not exist yet creates it (as mta's own Sieve does)
lda_mailbox_autocreate = yes
lda_mailbox_autosubscribe = yes
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
  postmaster_address = postmaster@{postmaster_domain}
}}
plugin {{
  quota = maildir:User quota
  sieve = file:~/sieve;active=~/.dovecot.sieve
  # ManageSieve takes only what mta's own Sieve runs (docs/mailboxes.md)
  sieve_extensions = fileinto reject envelope vacation mailbox
}}
"""


@dataclass(frozen=True)
class DovecotUser:
    """One passwd-file line: the password, and the quota Dovecot's userdb returns (0: none)."""

    password: str
    quota_bytes: int = 0
    quota_messages: int = 0

    def line(self, address: str) -> str:
        rule = ":".join(part for part in (f"storage={self.quota_bytes}B" if self.quota_bytes else "",
                                          f"messages={self.quota_messages}" if self.quota_messages else "")
                        if part)
        extra = f"userdb_quota_rule=*:{rule}" if rule else ""
        return f"{address}:{self.password}::::::{extra}\n"


@dataclass(frozen=True)
class Dovecot:
    """A running private Dovecot: its loopback ports and its directory."""

    imap_port: int
    pop3_port: int
    lmtp_port: int
    managesieve_port: int
    base: Path

    @property
    def lmtp_route(self) -> str:
        """mta's [routes] value that delivers to this Dovecot's LMTP."""
        return f"lmtp:127.0.0.1:{self.lmtp_port}"

    @property
    def mail_root(self) -> Path:
        """The Maildir root Dovecot reads: `<root>/<domain>/<user>/` (mta's maildir_root)."""
        return self.base / "mail"

    def log(self) -> str:
        path = self.base / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def start_dovecot(tmp_path: Path, mail_user: str, users: Mapping[str, DovecotUser], *,
                  postmaster_domain: str = "mx.test") -> Iterator[Dovecot]:
    """Dovecot for `users` (address -> DovecotUser), mail accessed as `mail_user` (see mail_user()),
    over its own mail root: give mta `dovecot.mail_root` as its maildir_root."""
    for package, path in PACKAGES.items():
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: run `make test-deps` (Debian package {package})")
    account = pwd.getpwnam(mail_user)
    base = Path(tempfile.mkdtemp(prefix="mta-dovecot-"))
    try:
        base.chmod(0o755)
        (base / "users").write_text("".join(user.line(address) for address, user in users.items()))
        dovecot = Dovecot(*(free_port() for _ in range(4)), base)
        dovecot.mail_root.mkdir(mode=0o755)
        conf = base / "dovecot.conf"
        conf.write_text(_CONF.format(
            base=base, imap_port=dovecot.imap_port, pop3_port=dovecot.pop3_port, lmtp_port=dovecot.lmtp_port,
            managesieve_port=dovecot.managesieve_port,
            privileges=_privileges(), first_valid_uid=min(account.pw_uid, 500), mail_uid=account.pw_uid,
            mail_gid=account.pw_gid, mail_root=dovecot.mail_root, postmaster_domain=postmaster_domain))
        with open(base / "dovecot.out", "wb") as out:
            proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_listening(proc, dovecot)
            yield dovecot
        finally:
            _stop(proc)
    finally:
        kept = [base / name for name in ("dovecot.out", "dovecot.log") if (base / name).exists()]
        (tmp_path / "dovecot.log").write_bytes(b"".join(path.read_bytes() for path in kept))
        shutil.rmtree(base, ignore_errors=True)


class ManageSieve:
    """The few RFC 5804 commands a webmail's filter page sends: AUTHENTICATE PLAIN, PUTSCRIPT, SETACTIVE."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._file = self._sock.makefile("rb")
        self._response()  # the capabilities, then OK

    def _response(self) -> tuple[bool, str]:
        """(OK?, the final line's text) after any untagged lines."""
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError("ManageSieve server closed the connection")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text.endswith("}") and "{" in text:  # a literal follows: read it into the text
                size = int(text[text.rindex("{") + 1:-1].rstrip("+"))
                text += self._file.read(size).decode("utf-8", "replace") + self._file.readline().decode().rstrip()
            if text.startswith(("OK", "NO", "BYE")):
                return text.startswith("OK"), text

    def command(self, line: str, literal: bytes | None = None) -> tuple[bool, str]:
        data = line.encode() + (f" {{{len(literal)}+}}\r\n".encode() + literal if literal is not None else b"")
        self._sock.sendall(data + b"\r\n")
        return self._response()

    def login(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        ok, text = self.command(f'AUTHENTICATE "PLAIN" "{token}"')
        assert ok, text

    def activate(self, name: str, script: bytes) -> None:
        """PUTSCRIPT then SETACTIVE, as a webmail saves a filter set; both must succeed."""
        for line, literal in ((f'PUTSCRIPT "{name}"', script), (f'SETACTIVE "{name}"', None)):
            ok, text = self.command(line, literal)
            assert ok, f"{line}: {text}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.command("LOGOUT")
        self._file.close()
        self._sock.close()


VMAIL = "mtatest-vmail"


@contextlib.contextmanager
def mail_user() -> Iterator[str]:
    """The user Dovecot accesses mail as: ours, unless we are root (Dovecot refuses uid 0 for
    mail); then a system user made for the purpose (a vmail of its own), removed after."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    made = False
    try:
        pwd.getpwnam(VMAIL)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.fail("useradd is missing: the Dovecot tests, run as root, need an unprivileged mail user")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", VMAIL],
                       check=True)
        made = True
    try:
        yield VMAIL
    finally:
        if made:
            subprocess.run(["userdel", VMAIL], check=False)


def hand_over(mailbox: Path, user: str) -> None:
    """Give what mta (as root, without `[local] owner`) wrote in `mailbox` to `user`, as an
    operator's chown would: Dovecot reads a Maildir only as its owner."""
    account = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(mailbox):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chown(name, account.pw_uid, account.pw_gid)


def _privileges() -> str:
    """As root, Dovecot's own unprivileged users; otherwise everything runs as us, unchrooted."""
    if os.geteuid() == 0:
        for user in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                pytest.fail(f"user {user} is missing: reinstall the Debian package dovecot-core")
        return "default_internal_user = dovecot\ndefault_login_user = dovenull"
    me = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return (f"default_internal_user = {me}\ndefault_internal_group = {group}\ndefault_login_user = {me}\n"
            "".join(f"service {login}-login {{\n  chroot =\n}}\n" for login in ("imap", "pop3", "managesieve")))


def _wait_listening(proc: subprocess.Popen[bytes], dovecot: Dovecot) -> None:
    """The master binds every listener before it forks a service: all of them, or fail with the log."""
    deadline = time.monotonic() + START_SECONDS
    ports = [dovecot.imap_port, dovecot.pop3_port, dovecot.lmtp_port, dovecot.managesieve_port]
    while ports:
        if proc.poll() is not None:
            raise RuntimeError(f"dovecot exited with {proc.returncode}:\n{_tail(dovecot.base)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"dovecot did not listen on 127.0.0.1:{ports} within {START_SECONDS} s:\n"
                               f"{_tail(dovecot.base)}")
        try:
            socket.create_connection(("127.0.0.1", ports[0]), timeout=1).close()
            ports.pop(0)
        except OSError:
            time.sleep(0.05)


def _tail(base: Path) -> str:
    text = "".join((base / name).read_text(errors="replace") for name in ("dovecot.out", "dovecot.log")
                   if (base / name).exists())
    return "\n".join(text.splitlines()[-30:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the master (it stops its services), then SIGKILL whatever of its group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(STOP_SECONDS)
    deadline = time.monotonic() + STOP_SECONDS
    while group_alive(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"dovecot processes of group {proc.pid} survived SIGKILL")
        time.sleep(0.01)
