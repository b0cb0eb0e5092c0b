"""Interoperability with a real Postfix, both directions: mta -> Postfix and Postfix -> mta.

Each test runs a private Postfix instance (its own config, queue and data directories
under one temporary root, chroot off, smtpd on a loopback high port, a verbose log of
its SMTP dialogues in a file) and routes every test domain by transport_maps to a
bracketed loopback next hop, so neither Postfix nor mta ever asks DNS or leaves
loopback: a catch-all `*` error transport refuses any other destination (550 at RCPT;
a bounce to an unrouted sender dies there), and mta's [dns] points at a dead loopback
port. One instance per test: exact counts in its queue and log, no cross-test state.

Postfix is installed by `make test` (test-deps); without it these tests skip, or fail
when CI is set. It needs root (its master drops to `mail_owner` itself).

Invariant: when a test ends, no process of its Postfix instance is alive.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import email
import email.policy
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MtaServer, free_port, greets_within
from tests.integration.sink import SinkMessage, SmtpSink

pytestmark = pytest.mark.integration

POSTFIX_HOSTNAME = "postfix.test"
SENDER = "a@client.test"
START_SECONDS = 30.0  # `postfix start` creates the queue directories first (~2 s)
STOP_SECONDS = 10.0
DELIVERY_SECONDS = 20.0
SETTLE_SECONDS = 1.0  # after everything arrived: time for a duplicate to show up
COMMAND_SECONDS = 30.0

PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


# --- the private Postfix instance ---------------------------------------------------------

def _postfix_binary(name: str) -> str:
    found = shutil.which(name, path=PATH)
    assert found is not None, f"{name} not found in {PATH}"
    return found


def require_postfix() -> None:
    """Skip (fail under CI) unless Postfix is installed and we may run it (root)."""
    problem = None
    if shutil.which("postfix", path=PATH) is None or shutil.which("postconf", path=PATH) is None:
        problem = "Postfix is not installed (`make test-deps` installs it)"
    elif os.geteuid() != 0:
        problem = "a private Postfix instance needs root (its master starts as root)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


MAIN_CF = """\
compatibility_level = 3.6
myhostname = {hostname}
mydomain = {hostname}
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = {relay_domains}
mynetworks = 127.0.0.0/8
inet_protocols = ipv4
inet_interfaces = 127.0.0.1
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-mtatest
smtpd_banner = $myhostname ESMTP
# Never DNS: next hops are bracketed IP literals; no reverse lookup of clients.
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
default_transport = smtp
relay_transport = smtp
relayhost =
transport_maps = inline:{{ {transport} }}
smtp_tls_security_level = none
smtpd_tls_security_level = none
# Relayed content passes unchanged: no header rewriting for SMTP clients.
local_header_rewrite_clients =
biff = no
append_dot_mydomain = no
# A deferral is retried within seconds, not minutes (the tests also fail on any).
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
smtp_connect_timeout = 5s
# Log both SMTP dialogues with loopback peers ("< client: MAIL FROM:<a> BODY=8BITMIME").
debug_peer_list = 127.0.0.1
"""

# The lines of a verbose maillog worth showing in a failure: the SMTP dialogue, queue events, trouble.
_NOTEWORTHY = re.compile(r"\]: (?:[<>] |[0-9A-F]{6,}: |NOQUEUE|warning|error|fatal|panic|(?:dis)?connect from|"
                         r"lost connection|timeout|daemon started|starting|stopping|terminating|reload)")


@dataclass
class Postfix:
    """One private instance: `root`/{etc,queue,data,maillog}; smtpd on 127.0.0.1:`port`."""

    root: Path
    port: int
    kept_log: Path | None = None  # where the fixture copies the maillog at teardown

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def configure(self, transport: dict[str, str], main_cf: dict[str, str] | None = None) -> None:
        """main.cf and master.cf; `transport` maps a domain to "host:port" (sent as smtp:[host]:port);
        `main_cf`: more parameters."""
        self.config_dir.mkdir(parents=True)
        (self.root / "queue").mkdir()
        data = self.root / "data"
        data.mkdir()
        shutil.chown(data, user="postfix")  # master.lock and the TLS caches live here
        entries = [f"{domain}=smtp:[{host}]:{port}"
                   for domain, (host, _, port) in ((d, t.rpartition(":")) for d, t in transport.items())]
        entries.append("{ * = error:5.7.1 no route to this destination in the test instance }")
        (self.config_dir / "main.cf").write_text(MAIN_CF.format(
            hostname=POSTFIX_HOSTNAME, root=self.root, relay_domains=", ".join(transport),
            transport=", ".join(entries)) + "".join(f"{k} = {v}\n" for k, v in (main_cf or {}).items()))
        shutil.copy("/etc/postfix/master.cf", self.config_dir / "master.cf")
        self.postconf("-MX", "smtp/inet")  # Debian's smtpd on port 25: not ours
        self.postconf("-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")  # Debian's chroot is populated by its init script only

    def postconf(self, *args: str) -> str:
        return self._run("postconf", "-c", str(self.config_dir), *args)

    def _run(self, tool: str, *args: str, stdin: bytes | None = None) -> str:
        done = subprocess.run([_postfix_binary(tool), *args], input=stdin, capture_output=True,
                              timeout=COMMAND_SECONDS, env={**os.environ, "PATH": PATH})
        if done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
                                 f"\n{self.log_tail()}")
        return done.stdout.decode("utf-8", "replace")

    def start(self) -> None:
        self._run("postfix", "-c", str(self.config_dir), "start")
        deadline = time.monotonic() + START_SECONDS
        while not greets_within(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix smtpd did not greet on 127.0.0.1:{self.port}\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """`postfix stop`, then wait until none of the instance's processes is left (SIGKILL by pid after
        STOP_SECONDS, and complain)."""
        if self.master_pid() is not None:
            with contextlib.suppress(AssertionError):
                self._run("postfix", "-c", str(self.config_dir), "stop")
        deadline = time.monotonic() + STOP_SECONDS
        while self.processes():
            if time.monotonic() > deadline:
                left = self.processes()
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"Postfix processes {left} outlived `postfix stop` (killed)\n{self.log_tail()}")
            time.sleep(0.05)

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        return None

    def processes(self) -> list[int]:
        """Our instance's processes: with chroot off every daemon works in our queue directory,
        and they all share the master's process group."""
        master = self.master_pid()
        queue = str(self.queue_dir)
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{name}/stat").read_bytes()
                fields = stat[stat.rindex(b")") + 2:].split()
                if fields[0] in (b"Z", b"X"):
                    continue
                if os.readlink(f"/proc/{name}/cwd") == queue or (master is not None and int(fields[2]) == master):
                    found.append(int(name))
        return found

    def queue(self) -> list[dict[str, Any]]:
        """`postqueue -j`: one JSON object per queued message (empty: nothing left)."""
        out = self._run("postqueue", "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def sendmail(self, sender: str, recipients: list[str], data: bytes) -> None:
        """Submit through Postfix's own sendmail (postdrop -> pickup); `-i`: a lone dot is content."""
        self._run("sendmail", "-C", str(self.config_dir), "-i", "-f", sender, "--", *recipients,
                  stdin=data.replace(b"\r\n", b"\n"))

    def log(self) -> str:
        try:
            return self.maillog.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        noteworthy = [line for line in self.log().splitlines() if _NOTEWORTHY.search(line)]
        where = self.kept_log or self.maillog
        return f"--- postfix maillog tail (all of it: {where}) ---\n" + "\n".join(noteworthy[-lines:])

    def mail_from_params(self) -> dict[bytes, str]:
        """Message-ID -> the MAIL FROM parameters our smtpd received with it (from the debug dialogue:
        per smtpd process, a MAIL FROM pairs with the next "queued as", whose cleanup logs the Message-ID)."""
        log = self.log()
        pending: dict[str, str] = {}
        params_of: dict[str, str] = {}
        for pid, params, qid in re.findall(r"/smtpd\[(\d+)\]: (?:< \S+: MAIL FROM:<[^>]*>(.*)|"
                                           r"> \S+: 250 2\.0\.0 Ok: queued as ([0-9A-F]+))$", log, re.MULTILINE):
            if qid:
                params_of[qid] = pending.pop(pid, "?")
            else:
                pending[pid] = params.strip()
        ids = dict(re.findall(r"/cleanup\[\d+\]: ([0-9A-F]+): message-id=(<[^>]*>)$", log, re.MULTILINE))
        return {ids[qid].encode(): params for qid, params in params_of.items() if qid in ids}


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[Callable[..., Postfix]]:
    """A factory: postfix({"domain": "host:port", ...}, port=None, main_cf=None) -> a started private
    instance relaying there, its smtpd on 127.0.0.1:port (default: a free port), `main_cf` added.

    The root is a fresh directory under /tmp, world-searchable: Postfix's daemons run as
    `postfix` and must reach their queue (pytest's tmp_path is 0700 root). At teardown each
    instance is stopped, its maillog copied to tmp_path/postfixN.maillog, its root removed."""
    require_postfix()
    made: list[Postfix] = []
    roots: list[Path] = []

    def make(transport: dict[str, str], port: int | None = None,
             main_cf: dict[str, str] | None = None) -> Postfix:
        root = Path(tempfile.mkdtemp(prefix="mta-postfix-"))
        roots.append(root)
        root.chmod(0o755)
        instance = Postfix(root, port or free_port(), kept_log=tmp_path / f"postfix{len(roots)}.maillog")
        instance.configure(transport, main_cf)
        made.append(instance)
        instance.start()
        return instance

    with contextlib.ExitStack() as stack:  # every instance stopped and removed, even if one stop fails
        yield make
        for root in roots:
            stack.callback(shutil.rmtree, root, True)
        for instance in made:
            stack.callback(_keep_log, instance)
            stack.callback(instance.stop)


def _keep_log(instance: Postfix) -> None:
    if instance.kept_log is not None and instance.maillog.exists():
        shutil.copy(instance.maillog, instance.kept_log)


# --- mta ------------------------------------------------------------------------------------

def relaying_mta(mta_server: Callable[..., MtaServer], tmp_path: Path, routes: dict[str, str], *,
                 relay_domains: Sequence[str], local_domains: Sequence[str] = (),
                 domains: dict[str, dict[str, Any]] | None = None) -> MtaServer:
    """mta with one delivery worker, `routes`, Maildir under tmp_path/mail, and a resolver
    that can only fail (a dead loopback port): a stray MX lookup never reaches real DNS."""
    mail = tmp_path / "mail"
    mail.mkdir(exist_ok=True)
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": list(local_domains), "relay_domains": list(relay_domains),
               "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, "min_backoff_seconds": 1, "max_backoff_seconds": 2,
                  "connect_timeout_seconds": 5},
        routes=routes,
        local={"maildir_root": str(mail)},
        dns={"nameservers": [f"127.0.0.1:{free_port()}"], "timeout_seconds": 1},
        cache={"path": str(tmp_path / "cache")},
        **({"domains": domains} if domains else {}),
    )


# --- messages -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mail:
    name: str
    data: bytes  # CRLF lines, as injected
    mail_options: tuple[str, ...] = ()

    @property
    def message_id(self) -> bytes:
        return f"<{self.name}@client.test>".encode()


def _headers(name: str, to: str, extra: str = "") -> str:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: postfix interop {name}\r\n"
            f"Date: Sun, 29 Nov 2026 06:43:03 +0000\r\nMessage-ID: <{name}@client.test>\r\n{extra}\r\n")


def interop_mails(to: str, tag: str) -> list[Mail]:
    """Leading dots (a lone '.' line too, also last), 8-bit UTF-8 with BODY=8BITMIME, ~200 KiB."""
    dots = Mail(f"{tag}-dots", (_headers(f"{tag}-dots", to) +
                                ".\r\n..\r\n.leading dot\r\n...three dots\r\n \r\nmiddle\r\n.\r\n").encode())
    utf8 = Mail(f"{tag}-utf8", (_headers(f"{tag}-utf8", to, "MIME-Version: 1.0\r\n"
                                         "Content-Type: text/plain; charset=utf-8\r\n"
                                         "Content-Transfer-Encoding: 8bit\r\n") +
                                "Grüße aus Köln, naïve café, 東京, Ελληνικά, emoji \U0001F4EC\r\n"
                                ".ünïcode after a dot\r\n").encode("utf-8"), ("BODY=8BITMIME",))
    lines = [f"{'.' if n % 97 == 0 else ''}{n:06d} {'abcdefghijklmnopqrstuvwxyz0123456789' * 2}"
             for n in range(2530)]
    big = Mail(f"{tag}-big", (_headers(f"{tag}-big", to) + "\r\n".join(lines) + "\r\n").encode())
    assert 190 * 1024 < len(big.data) < 220 * 1024
    return [dots, utf8, big]


def inject(port: int, rcpts: list[str], mail: Mail) -> str:
    """One message over SMTP with smtplib (it dot-stuffs); the server's final reply text."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(SENDER, list(mail.mail_options))
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = smtp.data(mail.data)
        assert code == 250, (code, text)
        return text.decode("utf-8", "replace")


def split_received(data: bytes, n: int) -> tuple[list[bytes], bytes]:
    """The first `n` header fields, each asserted to be a Received field, and the rest."""
    fields: list[bytes] = []
    rest = data
    for _ in range(n):
        assert rest.startswith(b"Received: "), f"expected Received field #{len(fields) + 1}: {rest[:200]!r}"
        end = rest.index(b"\n") + 1
        while rest[end:end + 1] in (b" ", b"\t"):
            end = rest.index(b"\n", end) + 1
        fields.append(rest[:end])
        rest = rest[end:]
    return fields, rest


def by_message_id(messages: list[SinkMessage]) -> dict[bytes, list[SinkMessage]]:
    found: dict[bytes, list[SinkMessage]] = {}
    for message in messages:
        match = re.search(rb"^Message-ID: (<[^>]+>)\r$", message.data, re.MULTILINE)
        found.setdefault(match.group(1) if match else b"?", []).append(message)
    return found


def wait_for(predicate: Callable[[], object], timeout: float, what: str, report: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{report()}")
        time.sleep(0.05)


def assert_postfix_clean(pf: Postfix, report: Callable[[], str], sent: int) -> None:
    """Postfix relayed `sent` deliveries with status=sent, none deferred or bounced, its queue empty.
    (postlogd writes the log asynchronously: wait for the lines.)"""
    wait_for(lambda: pf.queue() == [], 10, "Postfix's queue to empty", report)
    wait_for(lambda: len(re.findall(r", status=sent ", pf.log())) >= sent, 5, f"{sent} status=sent lines", report)
    log = pf.log()
    assert len(re.findall(r", status=sent ", log)) == sent, report()
    assert not re.search(r", status=(deferred|bounced|expired) ", log), report()


# --- mta -> Postfix -------------------------------------------------------------------------

def test_mta_relays_through_postfix_intact(mta_server: Callable[..., MtaServer], postfix: Callable[..., Postfix],
                                           tmp_path: Path) -> None:
    """client -> mta -> Postfix -> sink: dots, 8-bit and 200 KiB arrive byte for byte, once each."""
    with SmtpSink("127.0.0.2", hostname="sink.test") as sink:
        pf = postfix({"pf.test": f"{sink.host}:{sink.port}"})
        server = relaying_mta(mta_server, tmp_path, {"pf.test": f"127.0.0.1:{pf.port}"}, relay_domains=["pf.test"])

        def report() -> str:
            return f"{server.log_tail()}\n{pf.log_tail()}\nsink got {len(sink.messages)} message(s)"

        mails = interop_mails("rcpt@pf.test", "a")
        for mail in mails:
            inject(server.port, ["rcpt@pf.test"], mail)
        wait_for(lambda: len(sink.messages) >= len(mails), DELIVERY_SECONDS, "the sink to get every message",
                 report)
        wait_for(lambda: server.queue_list() == [], 10, "mta's spool to empty", report)
        assert_postfix_clean(pf, report, sent=len(mails))
        time.sleep(SETTLE_SECONDS)

        got = by_message_id(sink.messages)
        assert sorted(got) == sorted(m.message_id for m in mails), report()  # each once, nothing else
        for mail in mails:
            [message] = got[mail.message_id]
            assert message.sender == SENDER and message.recipients == ["rcpt@pf.test"]
            (theirs, ours), content = split_received(message.data, 2)
            assert content == mail.data, f"{mail.name}: content changed on the way"
            assert b"by postfix.test (Postfix) with ESMTP" in theirs and b"from mx.test " in theirs, theirs
            assert b"by mx.test (mta) with ESMTP" in ours and b"from client.test ([127.0.0.1])" in ours, ours
            if mail.mail_options:
                assert message.mail_params.get("BODY") == "8BITMIME", message.mail_params
        # What mta said to Postfix: SIZE always, BODY=8BITMIME for the 8-bit message only
        params = pf.mail_from_params()
        for mail in mails:
            sent = params.get(mail.message_id, "")
            assert ("BODY=8BITMIME" in sent.split()) == bool(mail.mail_options), (mail.name, sent, report())
            assert re.search(r"(^| )SIZE=\d+", sent), (mail.name, sent, report())


# --- Postfix -> mta -------------------------------------------------------------------------

def test_postfix_relays_into_mta_intact(mta_server: Callable[..., MtaServer], postfix: Callable[..., Postfix],
                                        tmp_path: Path) -> None:
    """client -> Postfix (smtpd, or sendmail/pickup) -> mta -> sink and Maildir: intact, once each."""
    with SmtpSink("127.0.0.2", hostname="sink.test") as sink:
        server = relaying_mta(mta_server, tmp_path, {"mta.test": f"{sink.host}:{sink.port}"},
                              relay_domains=["mta.test"], local_domains=["box.test"])
        box = tmp_path / "mail" / "box.test" / "user"
        box.mkdir(parents=True)
        target = f"127.0.0.1:{server.port}"
        pf = postfix({"mta.test": target, "box.test": target})

        def report() -> str:
            return f"{server.log_tail()}\n{pf.log_tail()}\nsink got {len(sink.messages)} message(s)"

        rcpts = ["rcpt@mta.test", "user@box.test"]  # one Postfix transaction, two mta destinations
        mails = interop_mails(", ".join(rcpts), "b")
        for mail in mails:
            inject(pf.port, rcpts, mail)
        picked = Mail("b-sendmail", (_headers("b-sendmail", rcpts[0]) + ".\r\nvia postdrop and pickup\r\n.\r\n")
                      .encode())
        pf.sendmail(SENDER, rcpts[:1], picked.data)

        def maildir() -> list[bytes]:
            return [p.read_bytes() for p in sorted((box / "new").glob("*"))] if (box / "new").is_dir() else []

        wait_for(lambda: len(sink.messages) >= len(mails) + 1 and len(maildir()) >= len(mails),
                 DELIVERY_SECONDS, "every message at the sink and in the Maildir", report)
        wait_for(lambda: server.queue_list() == [], 10, "mta's spool to empty", report)
        assert_postfix_clean(pf, report, sent=2 * len(mails) + 1)  # one line per recipient
        time.sleep(SETTLE_SECONDS)

        got = by_message_id(sink.messages)
        assert sorted(got) == sorted(m.message_id for m in [*mails, picked]), report()
        for mail in mails:
            [message] = got[mail.message_id]
            assert message.sender == SENDER and message.recipients == ["rcpt@mta.test"]
            (ours, theirs), content = split_received(message.data, 2)
            assert content == mail.data, f"{mail.name}: content changed on the way"
            assert b"from postfix.test ([127.0.0.1])" in ours and b"by mx.test (mta) with ESMTP" in ours, ours
            assert b"by postfix.test (Postfix) with ESMTP" in theirs and b"from client.test " in theirs, theirs
        [message] = got[picked.message_id]
        (ours, theirs), content = split_received(message.data, 2)  # pickup's Received only: no smtpd
        assert content == picked.data, "the sendmail-submitted message changed on the way"
        assert b"by postfix.test (Postfix, from userid 0)" in theirs, theirs

        stored = {re.search(rb"^Message-ID: (<[^>]+>)$", m, re.MULTILINE).group(1): m  # type: ignore[union-attr]
                  for m in maildir()}
        assert len(stored) == len(maildir()) == len(mails), report()  # exactly once each
        for mail in mails:
            lf = stored[mail.message_id]
            assert lf.startswith(f"Return-Path: <{SENDER}>\nDelivered-To: user@box.test\n".encode()), lf[:200]
            (ours, theirs), content = split_received(lf.split(b"\n", 2)[2], 2)
            assert content == mail.data.replace(b"\r\n", b"\n"), f"{mail.name}: Maildir content differs"
            assert b"by mx.test (mta)" in ours and b"by postfix.test (Postfix)" in theirs

        # Postfix saw mta's queue id in each 250 reply
        queued = re.findall(r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .* status=sent \(250 2\.0\.0 Ok: queued as "
                            r"([0-9A-F]{21})\)", pf.log())
        assert len(set(queued)) == len(mails) + 1, report()


# --- envelope extensions and bounces, both directions -----------------------------------------

def test_envelope_extensions_and_bounces_cross_both_ways(mta_server: Callable[..., MtaServer],
                                                         postfix: Callable[..., Postfix], tmp_path: Path) -> None:
    """SMTPUTF8 addresses and DSN parameters (RET, ENVID, NOTIFY, ORCPT) survive each hop, and each
    side's bounce (MAIL FROM:<>, multipart/report) crosses to the other."""
    with SmtpSink("127.0.0.2", hostname="sink.test") as sink:
        pf_port = free_port()
        to_postfix = f"127.0.0.1:{pf_port}"
        # reject.test: mta routes it to Postfix, which has no route for it (550 5.7.1 at RCPT)
        server = relaying_mta(mta_server, tmp_path, {"mta.test": f"{sink.host}:{sink.port}", "pf.test": to_postfix,
                                                     "reject.test": to_postfix},
                              relay_domains=["mta.test", "pf.test", "reject.test"])
        pf = postfix({"mta.test": f"127.0.0.1:{server.port}", "pf.test": f"{sink.host}:{sink.port}"}, port=pf_port)

        def report() -> str:
            return f"{server.log_tail()}\n{pf.log_tail()}\nsink got {len(sink.messages)} message(s)"

        def send(port: int, sender: str, rcpt: str, name: str, mail_options: list[str],
                 rcpt_options: tuple[str, ...] = ()) -> None:
            data = _headers(name, rcpt).encode() + f"body of {name}: ü\r\n".encode()
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
                smtp.ehlo()
                assert smtp.mail(sender, ["BODY=8BITMIME", *mail_options])[0] == 250
                code, text = smtp.rcpt(rcpt, list(rcpt_options))
                assert code == 250, (name, code, text)
                code, text = smtp.data(data)
                assert code == 250, (name, code, text)

        dsn_mail, dsn_rcpt = ["RET=HDRS", "ENVID=env-42"], ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;orig@x.test")
        send(server.port, "ü@client.test", "ü@pf.test", "c-utf8-out", ["SMTPUTF8"])
        send(server.port, SENDER, "dsn@pf.test", "c-dsn-out", dsn_mail, dsn_rcpt)
        send(pf.port, "ü@client.test", "ü@mta.test", "c-utf8-in", ["SMTPUTF8"])
        send(pf.port, SENDER, "dsn@mta.test", "c-dsn-in", dsn_mail, dsn_rcpt)
        send(pf.port, "pfb@mta.test", "r550-gone@pf.test", "c-postfix-bounces", [])  # the sink refuses it
        send(server.port, "mtab@mta.test", "nobody@reject.test", "c-mta-bounces", [])  # Postfix refuses it

        wait_for(lambda: len(sink.messages) >= 6, DELIVERY_SECONDS, "4 messages and 2 bounces at the sink", report)
        wait_for(lambda: server.queue_list() == [] and pf.queue() == [], 10, "both queues to empty", report)
        time.sleep(SETTLE_SECONDS)
        assert len(sink.messages) == 6, report()  # each exactly once

        got = by_message_id(sink.messages)
        for name, rcpt in [("c-utf8-out", "ü@pf.test"), ("c-utf8-in", "ü@mta.test")]:
            [message] = got[f"<{name}@client.test>".encode()]
            assert (message.sender, message.recipients) == ("ü@client.test", [rcpt])
            assert "SMTPUTF8" in message.mail_params, (name, message.mail_params)
        for name, rcpt in [("c-dsn-out", "dsn@pf.test"), ("c-dsn-in", "dsn@mta.test")]:
            [message] = got[f"<{name}@client.test>".encode()]
            assert message.recipients == [rcpt]
            assert {k: message.mail_params.get(k) for k in ("RET", "ENVID")} == {"RET": "HDRS", "ENVID": "env-42"}, \
                (name, message.mail_params)
            assert message.rcpt_params == [{"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;orig@x.test"}], \
                (name, message.rcpt_params)

        bounces = {m.recipients[0]: m for m in sink.messages if m.sender == ""}
        assert sorted(bounces) == ["mtab@mta.test", "pfb@mta.test"], report()
        from_postfix, from_mta = bounces["pfb@mta.test"].data, bounces["mtab@mta.test"].data
        for bounce in (from_postfix, from_mta):
            report_part = email.message_from_bytes(bounce, policy=email.policy.default)
            assert report_part.get_content_type() == "multipart/report", bounce[:2000]
            assert report_part.get_param("report-type") == "delivery-status", bounce[:2000]
        assert b"r550-gone@pf.test" in from_postfix and b"<c-postfix-bounces@client.test>" in from_postfix
        assert from_postfix.startswith(b"Received: from postfix.test ([127.0.0.1])"), from_postfix[:300]
        assert b"nobody@reject.test" in from_mta and b"5.7.1" in from_mta, from_mta[:3000]
        assert b"<c-mta-bounces@client.test>" in from_mta, from_mta[:3000]


# --- many messages, reused connections ------------------------------------------------------

def test_busy_traffic_on_reused_connections_arrives_once(mta_server: Callable[..., MtaServer],
                                                         postfix: Callable[..., Postfix], tmp_path: Path) -> None:
    """100 messages each way over 10 sessions: Postfix reuses its connections to mta (its connection
    cache: RSET between transactions), mta reuses its own; every message arrives exactly once."""
    per_way, sessions = 100, 10
    with SmtpSink("127.0.0.2", hostname="sink.test") as sink:
        pf_port = free_port()
        server = relaying_mta(mta_server, tmp_path, {"mta.test": f"{sink.host}:{sink.port}",
                                                     "pf.test": f"127.0.0.1:{pf_port}"},
                              relay_domains=["mta.test", "pf.test"])
        pf = postfix({"mta.test": f"127.0.0.1:{server.port}", "pf.test": f"{sink.host}:{sink.port}"}, port=pf_port,
                     main_cf={"smtp_connection_cache_destinations": f"[127.0.0.1]:{server.port}"})

        def report() -> str:
            return f"{server.log_tail()}\n{pf.log_tail()}\nsink got {len(sink.messages)} message(s)"

        def session(port: int, rcpt: str, first: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
                for n in range(first, first + per_way // sessions):
                    smtp.sendmail(SENDER, [rcpt], _headers(f"d{n}-{rcpt}", rcpt).encode() + f"body {n}\r\n".encode())

        with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
            jobs = [pool.submit(session, port, rcpt, first)
                    for port, rcpt in [(pf.port, "in@mta.test"), (server.port, "out@pf.test")]
                    for first in range(0, per_way, per_way // sessions)]
            for job in jobs:
                job.result()
        wait_for(lambda: len(sink.messages) >= 2 * per_way, DELIVERY_SECONDS, "every message at the sink", report)
        wait_for(lambda: server.queue_list() == [], 10, "mta's spool to empty", report)
        assert_postfix_clean(pf, report, sent=2 * per_way)
        time.sleep(SETTLE_SECONDS)

        expected = {f"<d{n}-{rcpt}@client.test>".encode()
                    for n in range(per_way) for rcpt in ("in@mta.test", "out@pf.test")}
        assert set(by_message_id(sink.messages)) == expected, report()
        assert len(sink.messages) == 2 * per_way, report()  # exactly once each
        log = pf.log()
        to_mta_sessions = len(re.findall(r"/smtp\[\d+\]: > 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: EHLO ", log))
        from_mta_sessions = len(re.findall(r"/smtpd\[\d+\]: < \S+: EHLO mx\.test$", log, re.MULTILINE))
        assert 0 < to_mta_sessions < per_way, (to_mta_sessions, report())  # Postfix reused connections to mta
        assert 0 < from_mta_sessions < per_way, (from_mta_sessions, report())  # and mta its connections


def test_mta_pipelines_a_backlog_into_a_strict_postfix(mta_server: Callable[..., MtaServer],
                                                       postfix: Callable[..., Postfix], tmp_path: Path) -> None:
    """A backlog on one connection (concurrency 1): mta sends each next MAIL/RCPT/DATA with the
    content before it. Postfix, told to disconnect clients that break RFC 2920's pipelining
    rules (smtpd_forbid_unauth_pipelining), takes every message once."""
    from tests.integration.test_metrics import get, sample

    count = 40
    with SmtpSink("127.0.0.2", hostname="sink.test") as sink:
        pf = postfix({"pf.test": f"{sink.host}:{sink.port}"}, main_cf={"smtpd_forbid_unauth_pipelining": "yes"})
        server = relaying_mta(mta_server, tmp_path, {"pf.test": f"127.0.0.1:{pf.port}"}, relay_domains=["pf.test"],
                              domains={"pf.test": {"concurrency": 1}})

        def report() -> str:
            return f"{server.log_tail()}\n{pf.log_tail()}\nsink got {len(sink.messages)} message(s)"

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            list(pool.map(lambda n: inject(server.port, ["rcpt@pf.test"],
                                           Mail(f"p{n}", (_headers(f"p{n}", "rcpt@pf.test") + f"body {n}\r\n").encode())),
                          range(count)))
        wait_for(lambda: len(sink.messages) >= count, DELIVERY_SECONDS, "every message at the sink", report)
        wait_for(lambda: server.queue_list() == [], 10, "mta's spool to empty", report)
        assert_postfix_clean(pf, report, sent=count)
        time.sleep(SETTLE_SECONDS)
        assert sorted(by_message_id(sink.messages)) == sorted(f"<p{n}@client.test>".encode() for n in range(count))
        assert len(sink.messages) == count, report()
        log = pf.log()
        assert not re.search(r"improper command pipelining|SMTP protocol synchronization", log), report()
        pipelined = sample(get(server, "/metrics")[1], "mta_delivery_pipelined_messages_total")
        assert pipelined >= count // 4, (pipelined, report())
