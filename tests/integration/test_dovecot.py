"""Dovecot over mta's mail store: IMAP and POP3 read what mta wrote, LMTP routes, quota, Sieve.

A real `mta serve` (one delivery worker) delivers into the Maildir root a private Dovecot
reads (tests/integration/dovecot.py); imaplib and poplib are the mail clients. mta runs
as root here and has no `[local] owner` yet: before Dovecot (as its own unprivileged mail
user) reads a mailbox, the test chowns it, as an operator would (hand_over).
"""

from __future__ import annotations

import imaplib
import math
import poplib
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO_ROOT, MtaServer, wait_until
from tests.integration.dovecot import (
    Dovecot,
    DovecotUser,
    ManageSieve,
    hand_over,
    mail_user,
    start_dovecot,
)
from tests.integration.tlscerts import make_pki

pytestmark = pytest.mark.integration

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
PASSWORD = "alice-secret"
QUOTA_BYTES = 200_000
QUOTA_MESSAGES = 50


@pytest.fixture(scope="module")
def vmail_user() -> Iterator[str]:
    with mail_user() as name:
        yield name


@pytest.fixture
def dovecot(tmp_path: Path, vmail_user: str) -> Iterator[Dovecot]:
    users = {ALICE: DovecotUser(PASSWORD, quota_bytes=QUOTA_BYTES, quota_messages=QUOTA_MESSAGES)}
    with start_dovecot(tmp_path, vmail_user, users) as running:
        yield running


def mta_over(mta_server, dovecot: Dovecot, *, routes: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
             local: dict[str, object] | None = None) -> MtaServer:
    """mta with example.test local: Maildir under Dovecot's root (`local`: more [local] keys),
    or `routes` (to Dovecot's LMTP)."""
    return mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": [DOMAIN], "relay_domains": [], "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, "min_backoff_seconds": 1, "max_backoff_seconds": 2},
        local={"maildir_root": str(dovecot.mail_root), **(local or {})},
        **({"routes": routes} if routes else {}))


def message(n: int, subject: str | None = None, body_lines: int = 3) -> bytes:
    """A message with a unique Message-ID and a line that needs dot-stuffing on the wire."""
    body = "".join(f"line {i} of message {n}\r\n" for i in range(body_lines))
    return (f"From: Bob <bob@sender.test>\r\nTo: Alice <{ALICE}>\r\nSubject: {subject or f'message {n}'}\r\n"
            f"Message-ID: <m{n}@sender.test>\r\n\r\n{body}.a line that began with a dot\r\n").encode()


def send(port: int, *messages: bytes, recipient: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for data in messages:
            client.sendmail("bob@sender.test", [recipient], data)


def mailbox(dovecot: Dovecot, user: str = "alice") -> Path:
    """Provision the mailbox mta delivers to (a mailbox exists when its directory does)."""
    box = dovecot.mail_root / DOMAIN / user
    box.mkdir(parents=True, exist_ok=True)
    return box


def stored(box: Path, count: int, server: MtaServer) -> list[Path]:
    """The `count` message files mta wrote in new/, once all are there."""
    return wait_until(lambda: len(files := sorted((box / "new").glob("*"))) == count and files, 20,
                      f"{count} messages in {box}/new", server)


def imap_login(dovecot: Dovecot) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=30)
    typ, _ = imap.login(ALICE, PASSWORD)
    assert typ == "OK"
    return imap


def fetch_all(imap: imaplib.IMAP4, folder: str = "INBOX") -> list[bytes]:
    typ, data = imap.select(folder)
    assert typ == "OK", data
    count = int(data[0])
    fetched = []
    for n in range(1, count + 1):
        typ, parts = imap.fetch(str(n), "(RFC822)")
        assert typ == "OK", parts
        fetched.append(parts[0][1])
    return fetched


def folders(imap: imaplib.IMAP4) -> list[str]:
    """The folder names LIST shows, sorted."""
    typ, listing = imap.list()
    assert typ == "OK", listing
    return sorted(line.decode().rsplit(" ", 1)[1].strip('"') for line in listing)


def by_message_id(messages: list[bytes]) -> dict[bytes, bytes]:
    found = {}
    for data in messages:
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                found[line.split(b":", 1)[1].strip()] = data
    return found


# --- mta writes the Maildir, Dovecot serves it -------------------------------------------------

def test_imap_fetches_every_message_mta_delivered_exactly_as_sent(mta_server, dovecot: Dovecot,
                                                                  vmail_user: str) -> None:
    box = mailbox(dovecot)
    server = mta_over(mta_server, dovecot)
    sent = [message(n, body_lines=n * 40) for n in range(1, 4)]
    send(server.port, *sent)
    stored(box, 3, server)
    hand_over(box, vmail_user)

    imap = imap_login(dovecot)
    try:
        fetched = by_message_id(fetch_all(imap))
    finally:
        imap.logout()
    assert sorted(fetched) == [f"<m{n}@sender.test>".encode() for n in range(1, 4)]
    for n, data in enumerate(sent, 1):
        got = fetched[f"<m{n}@sender.test>".encode()]
        # mta's trace headers first, then the message byte for byte (CRLF again over IMAP)
        assert got.startswith(b"Return-Path: <bob@sender.test>\r\nDelivered-To: alice@example.test\r\nReceived: ")
        assert got.endswith(b"\r\n\r\n" + data.split(b"\r\n\r\n", 1)[1]), got[-200:]
        assert data.split(b"\r\n\r\n", 1)[0] in got
    # Dovecot took the messages over: seen, moved to cur/, nothing left in new/
    assert not list((box / "new").iterdir())
    assert len(list((box / "cur").iterdir())) == 3


def test_pop3_retrieves_and_deletes_what_mta_delivered(mta_server, dovecot: Dovecot,
                                                       vmail_user: str) -> None:
    box = mailbox(dovecot)
    server = mta_over(mta_server, dovecot)
    sent = [message(n) for n in range(1, 3)]
    send(server.port, *sent)
    # POP3 sizes count CRLF line ends; mta stores LF (the local Unix form)
    crlf_octets = sum(len(data) + data.count(b"\n") for data in (f.read_bytes() for f in stored(box, 2, server)))
    hand_over(box, vmail_user)

    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=30)
    try:
        pop.user(ALICE)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        assert pop.stat() == (2, crlf_octets)
        retrieved = by_message_id([b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in (1, 2)])
        for n, data in enumerate(sent, 1):
            assert retrieved[f"<m{n}@sender.test>".encode()].endswith(data.split(b"\r\n\r\n", 1)[1])
        pop.dele(1)
        pop.dele(2)
    finally:
        pop.quit()
    assert not [p for sub in ("new", "cur") for p in (box / sub).iterdir()]


def test_getquotaroot_counts_what_mta_stored(mta_server, dovecot: Dovecot, vmail_user: str) -> None:
    box = mailbox(dovecot)
    server = mta_over(mta_server, dovecot)
    send(server.port, *(message(n, body_lines=100 * n) for n in range(1, 4)))
    files = stored(box, 3, server)
    hand_over(box, vmail_user)
    stored_bytes = sum(f.stat().st_size for f in files)

    imap = imap_login(dovecot)
    try:
        typ, (roots, quotas) = imap.getquotaroot("INBOX")
    finally:
        imap.logout()
    assert typ == "OK"
    assert roots[0] == b'INBOX "User quota"'
    # RFC 2087: STORAGE in units of 1024 octets (rounded up), the limits from the userdb
    assert quotas[0] == (f'"User quota" (STORAGE {math.ceil(stored_bytes / 1024)} {math.ceil(QUOTA_BYTES / 1024)} '
                         f'MESSAGE 3 {QUOTA_MESSAGES})').encode()
    # and Dovecot's Maildir++ maildirsize (it made one: mta does not yet) says the same in bytes
    limits, *deltas = (box / "maildirsize").read_text().splitlines()
    assert limits == f"{QUOTA_BYTES}S,{QUOTA_MESSAGES}C"
    assert [sum(int(line.split()[i]) for line in deltas) for i in (0, 1)] == [stored_bytes, 3]


# --- LMTP routes: Dovecot delivers ------------------------------------------------------------

def test_an_lmtp_route_to_dovecot_lands_in_the_same_store(mta_server, dovecot: Dovecot,
                                                          vmail_user: str) -> None:
    domain = dovecot.mail_root / DOMAIN
    domain.mkdir()
    hand_over(domain, vmail_user)  # Dovecot makes the mailbox itself, as its mail user
    server = mta_over(mta_server, dovecot, routes={DOMAIN: dovecot.lmtp_route})
    sent = [message(n) for n in range(1, 3)]
    send(server.port, *sent)
    box = domain / "alice"
    wait_until(lambda: len(list((box / "new").glob("*"))) == 2 if (box / "new").is_dir() else False, 20,
               "two messages Dovecot's LMTP stored", server)

    imap = imap_login(dovecot)
    try:
        fetched = by_message_id(fetch_all(imap))
    finally:
        imap.logout()
    for n, data in enumerate(sent, 1):
        got = fetched[f"<m{n}@sender.test>".encode()]
        assert got.startswith(b"Return-Path: <bob@sender.test>\r\n")
        assert got.endswith(data.split(b"\r\n\r\n", 1)[1])
    assert server.queue_list() == []  # LMTP said 250 for each: delivered, nothing left to retry


def test_pigeonhole_runs_the_same_dovecot_sieve_on_an_lmtp_route(mta_server, dovecot: Dovecot,
                                                                 vmail_user: str) -> None:
    box = mailbox(dovecot)
    (box / ".dovecot.sieve").write_text(
        'require ["fileinto"];\nif header :contains "subject" "[lists]" {\n  fileinto "Lists";\n  stop;\n}\n')
    hand_over(dovecot.mail_root / DOMAIN, vmail_user)
    server = mta_over(mta_server, dovecot, routes={DOMAIN: dovecot.lmtp_route})
    send(server.port, message(1, subject="[lists] weekly digest"), message(2, subject="hello"))
    wait_until(lambda: (box / ".Lists" / "new").is_dir() and (box / "new").is_dir()
               and len(list((box / "new").iterdir())) == 1, 20, "one message in INBOX, one in .Lists", server)

    imap = imap_login(dovecot)
    try:
        assert folders(imap) == ["INBOX", "Lists"]
        assert list(by_message_id(fetch_all(imap, "Lists"))) == [b"<m1@sender.test>"]
        assert list(by_message_id(fetch_all(imap, "INBOX"))) == [b"<m2@sender.test>"]
    finally:
        imap.logout()



def test_a_full_mailbox_behind_an_lmtp_route_bounces_at_once_with_5_2_2(mta_server, tmp_path: Path,
                                                                         vmail_user: str) -> None:
    users = {ALICE: DovecotUser(PASSWORD, quota_bytes=2000), f"bob@{DOMAIN}": DovecotUser(PASSWORD)}
    with start_dovecot(tmp_path, vmail_user, users) as dovecot:
        (dovecot.mail_root / DOMAIN).mkdir()
        hand_over(dovecot.mail_root / DOMAIN, vmail_user)
        server = mta_over(mta_server, dovecot, routes={DOMAIN: dovecot.lmtp_route})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail(f"bob@{DOMAIN}", [ALICE], message(1, body_lines=200))  # ~6 KB > 2000 B + 10 %
        bob_inbox = dovecot.mail_root / DOMAIN / "bob" / "new"
        [bounce] = wait_until(lambda: bob_inbox.is_dir() and list(bob_inbox.iterdir()), 20,
                              "the bounce in bob's mailbox", server)
        text = bounce.read_text(errors="replace")
        assert "Return-Path: <>" in text
        assert "Status: 5.2.2" in text and f"Final-Recipient: rfc822; {ALICE}" in text
        assert "Quota exceeded" in text  # Dovecot's own words, passed on
        alice_inbox = dovecot.mail_root / DOMAIN / "alice" / "new"
        assert not alice_inbox.is_dir() or not any(alice_inbox.iterdir())
        assert server.queue_list() == []  # bounced at once: no retries left queued



# --- ManageSieve: the script a webmail's filter page writes is the one mta runs ----------------

ROUNDCUBE_SCRIPT = b"""require ["fileinto","vacation"];
# rule:[lists]
if header :contains "list-id" "announce.example.org"
{
\tfileinto "Lists";
\tstop;
}
# rule:[away]
vacation :days 1 :subject "Away" :addresses ["alice@example.test"] "Back on Monday.";
"""


def test_managesieve_makes_the_uploaded_script_the_mailboxs_dovecot_sieve(dovecot: Dovecot,
                                                                         vmail_user: str) -> None:
    box = mailbox(dovecot)
    hand_over(box, vmail_user)
    client = ManageSieve(dovecot.managesieve_port)
    try:
        client.login(ALICE, PASSWORD)
        client.activate("roundcube", ROUNDCUBE_SCRIPT)
        # a script mta's Sieve could not run is refused at upload, with the reason
        ok, text = client.command('PUTSCRIPT "dated"', b'require ["date"];\nkeep;\n')
        assert not ok and "date" in text, text
    finally:
        client.close()
    active = box / ".dovecot.sieve"
    assert active.is_symlink() and active.resolve() == (box / "sieve" / "roundcube.sieve").resolve()
    assert active.read_bytes() == ROUNDCUBE_SCRIPT
    assert not (box / "sieve" / "dated.sieve").exists()
    imap = imap_login(dovecot)
    try:
        assert folders(imap) == ["INBOX"]  # the link is no folder "dovecot.sieve"
    finally:
        imap.logout()


# --- docs/mailboxes.md ------------------------------------------------------------------------

def documented_dovecot_conf() -> str:
    """The dovecot.conf blocks of docs/mailboxes.md (each begins "# dovecot.conf"), in order."""
    blocks, current, fenced = [], [], False
    for line in (REPO_ROOT / "docs" / "mailboxes.md").read_text().splitlines():
        if line.startswith("```"):
            if fenced and current and current[0].startswith("# dovecot.conf"):
                blocks.append("\n".join(current))
            fenced, current = not fenced, []
        elif fenced:
            current.append(line)
    return "\n".join(blocks) + "\n"


def test_the_documented_dovecot_configuration_is_one_dovecot_accepts(tmp_path: Path) -> None:
    conf = documented_dovecot_conf()
    assert conf.count("# dovecot.conf") == 3, "the Maildir, ManageSieve and LMTP blocks"
    pki = make_pki(tmp_path / "pki")
    conf = (conf.replace("/etc/dovecot/private/mail.example.com.pem", str(pki.cert))
            .replace("/etc/dovecot/private/mail.example.com.key", str(pki.key)))
    (tmp_path / "dovecot.conf").write_text(conf)
    checked = subprocess.run(["doveconf", "-n", "-c", str(tmp_path / "dovecot.conf")],
                             check=False, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    settings = checked.stdout
    assert "mail_location = maildir:/var/vmail/%Ld/%Ln" in settings
    assert "protocols = imap pop3 sieve lmtp" in settings
    assert 'mail_plugins = " quota sieve"' in settings  # protocol lmtp
    assert "quota = maildir:User quota" in settings
    assert "quota_rule" not in settings  # the limits are the ones mta writes into maildirsize
