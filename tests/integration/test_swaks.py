"""swaks, a real SMTP client, against a real `mta serve`: STARTTLS, implicit TLS and AUTH.

Each case asserts what an operator running swaks would see: its exit status (see
EXIT CODES in `man swaks`: 0 ok, 23 MAIL refused, 28 AUTH failed, 29 TLS failed), the
server's replies in its transcript, and what the spool holds afterwards. The server is
test_security's `secure_server`: smtp, submission and smtps listeners, a certificate
for mx.test signed by a test CA, and a users file with alice / "correct horse".
mynetworks is empty, so relaying to remote.test needs AUTH; local.test is a relay
domain anyone may send to.

swaks 20201014's `--tls-verify` checks the chain against `--tls-ca-path` but not the
host name (Net::SSLeay with SSL_VERIFY_PEER only); the untrusted-CA case shows the
check is real. swaks sends AUTH only when the server advertises it, so it cannot be
made to try AUTH in plaintext (that 538 is covered by test_security's raw client).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, split_received
from tests.integration.test_security import pki, queued_id_from, secure_server  # noqa: F401 (pki: a fixture)
from tests.integration.tlscerts import Pki, make_pki

pytestmark = pytest.mark.integration

SWAKS_TIMEOUT_SECONDS = 60.0  # the whole swaks run; its own per-reply --timeout is shorter


def _swaks_missing() -> str | None:
    """Why swaks cannot run its TLS cases here, or None."""
    if shutil.which("swaks") is None:
        return "swaks is not on PATH"
    perl = subprocess.run(["perl", "-MNet::SSLeay", "-e1"], capture_output=True, timeout=30, check=False)
    if perl.returncode != 0:
        return "swaks cannot do TLS: the Perl module Net::SSLeay (libnet-ssleay-perl) is missing"
    return None


_MISSING = _swaks_missing()
if _MISSING is not None:
    if "CI" in os.environ:  # set at all (GitHub sets CI=true): a missing swaks is a broken CI image
        pytest.fail(f"{_MISSING}, and CI is set: CI must install it (`make test-deps` installs "
                    "swaks and libnet-ssleay-perl)", pytrace=False)
    pytest.skip(f"{_MISSING} (`make test-deps`, or apt-get install swaks libnet-ssleay-perl)",
                allow_module_level=True)


@dataclass(frozen=True)
class SwaksRun:
    status: int
    output: str  # stdout and stderr interleaved, as a terminal shows them

    def __str__(self) -> str:
        return f"swaks exited {self.status}\n{self.output}"


def swaks(*args: str, rcpt: str = "bob@remote.test", body: str = "sent by swaks") -> SwaksRun:
    """swaks to 127.0.0.1 with a fixed HELO, sender and recipient (no name lookups); ARGS add the rest."""
    command = ["swaks", "--server", "127.0.0.1", "--helo", "client.test", "--from", "alice@x.test",
               "--to", rcpt, "--body", body, "--timeout", "15", *args]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=SWAKS_TIMEOUT_SECONDS, check=False)
    return SwaksRun(done.returncode, done.stdout.decode("utf-8", "replace"))


def verified_tls(pki: Pki) -> list[str]:
    """Verify the server's chain against the test CA and ask for mx.test by SNI."""
    return ["--tls-verify", "--tls-ca-path", str(pki.ca), "--tls-sni", "mx.test"]


ALICE = ["--auth-user", "alice", "--auth-password", "correct horse"]


# swaks' transcript: `<-` server and ` ->` client in plaintext, `<~` / ` ~>` under TLS;
# `<**` / `<~*` a server reply swaks treats as an error; `===` and `***` are swaks' own notes.
SERVER_LINE = re.compile(r"<(-|~|\*\*|~\*) +(.*)")
PLAINTEXT_LINE = re.compile(r"(<-|<\*\*| ->|\*\*>) ")


def server_replies(run: SwaksRun) -> list[str]:
    """The server's reply lines, in order, as swaks printed them (without its markers)."""
    return [m.group(2) for m in map(SERVER_LINE.match, run.output.splitlines()) if m]


def the_one_stored(server: MtaServer, run: SwaksRun, rcpt: str) -> bytes:
    """The message swaks got `queued as` for: the only one in the queue, for `rcpt`; its bytes."""
    msgid = queued_id_from(run.output)
    queued = server.queue_list()
    assert [m["id"] for m in queued] == [msgid], queued
    assert [r["address"] for r in queued[0]["recipients"]] == [rcpt], queued
    return server.queue_body(msgid)


# --- submission: STARTTLS + AUTH ------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submission_with_starttls_and_auth_relays(mta_server, tmp_path: Path, pki: Pki, mechanism: str) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    run = swaks("--port", str(ports["submission"]), "--tls", *verified_tls(pki), "--auth", mechanism, *ALICE,
                body=f"via {mechanism}")
    assert run.status == 0, run
    replies = server_replies(run)
    assert "250 STARTTLS" in replies and "220 2.0.0 Ready to start TLS" in replies, run
    assert "TLS started with cipher TLSv1.3" in run.output, run
    assert "250 AUTH PLAIN LOGIN" in replies, run  # advertised only after STARTTLS
    assert any(r.startswith("235 2.7.0") for r in replies), run
    assert "queued as" in run.output, run
    stored = the_one_stored(server, run, "bob@remote.test")
    header, message = split_received(stored)
    assert b"with ESMTPSA id" in header and b"(using TLSv1.3 with cipher" in header, header
    assert f"via {mechanism}".encode() in message
    assert b"correct horse" not in server.log_bytes()


def test_a_wrong_password_is_535_and_nothing_is_queued(mta_server, tmp_path: Path, pki: Pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    run = swaks("--port", str(ports["submission"]), "--tls", *verified_tls(pki), "--auth", "PLAIN",
                "--auth-user", "alice", "--auth-password", "wrong horse")
    assert run.status == 28, run  # swaks: error in AUTH transaction
    assert any(r.startswith("535 5.7.8") for r in server_replies(run)), run
    assert "MAIL FROM" not in run.output, run
    assert server.queue_list() == []


def test_auth_is_not_offered_without_tls_on_submission(mta_server, tmp_path: Path, pki: Pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    # --auth required: swaks sees no AUTH in EHLO and gives up before MAIL.
    required = swaks("--port", str(ports["submission"]), "--auth", "PLAIN", *ALICE)
    assert required.status == 28, required
    assert "did not advertise authentication" in required.output, required
    ehlo = [r for r in server_replies(required) if r.startswith("250")]
    assert any("STARTTLS" in r for r in ehlo) and not any("AUTH" in r for r in ehlo), required
    assert "AUTH PLAIN" not in required.output, required  # nothing was sent in plaintext
    # --auth-optional: swaks goes on without AUTH, and submission refuses MAIL.
    optional = swaks("--port", str(ports["submission"]), "--auth-optional", "PLAIN", *ALICE)
    assert optional.status == 23, optional  # swaks: error in MAIL transaction
    assert any(r.startswith("530 5.7.0") for r in server_replies(optional)), optional
    assert server.queue_list() == []


def test_an_untrusted_certificate_fails_swaks_verification(mta_server, tmp_path: Path, pki: Pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    stranger = make_pki(tmp_path / "other")  # a different CA: the server's chain does not verify
    run = swaks("--port", str(ports["submission"]), "--tls", *verified_tls(stranger), "--auth", "PLAIN", *ALICE)
    assert run.status == 29, run  # swaks: error in TLS transaction
    # OpenSSL 3 via Net::SSLeay words the cause oddly ("asn1 encoding routines::EVP lib"): match swaks' own line.
    assert "*** STARTTLS attempted but failed" in run.output, run
    assert "AUTH PLAIN" not in run.output and "MAIL FROM" not in run.output, run
    assert server.queue_list() == []
    # The control: the same CA without --tls-verify (swaks' default) gets through the handshake.
    unverified = swaks("--port", str(ports["submission"]), "--tls", "--tls-ca-path", str(stranger.ca),
                       "--quit-after", "TLS")
    assert unverified.status == 0 and "TLS started with cipher" in unverified.output, unverified


# --- smtps: implicit TLS + AUTH -------------------------------------------------------------

def test_implicit_tls_with_auth_relays(mta_server, tmp_path: Path, pki: Pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    run = swaks("--port", str(ports["smtps"]), "--tls-on-connect", *verified_tls(pki), "--auth", "PLAIN", *ALICE)
    assert run.status == 0, run
    replies = server_replies(run)
    assert replies[0].startswith("220 mx.test ESMTP"), run  # the greeting already came under TLS
    assert not any(PLAINTEXT_LINE.match(line) for line in run.output.splitlines()), run  # nothing in plaintext
    assert not any("STARTTLS" in r for r in replies), run
    assert any(r.startswith("235 2.7.0") for r in replies), run
    header, _ = split_received(the_one_stored(server, run, "bob@remote.test"))
    assert b"with ESMTPSA id" in header, header


# --- port 25: STARTTLS without AUTH --------------------------------------------------------

def test_starttls_on_port_25_without_auth_to_a_relay_domain(mta_server, tmp_path: Path, pki: Pki) -> None:
    server, _ = secure_server(mta_server, tmp_path, pki)
    run = swaks("--port", str(server.port), "--tls", *verified_tls(pki), rcpt="user@local.test")
    assert run.status == 0, run
    replies = server_replies(run)
    assert not any("AUTH" in r for r in replies), run  # the smtp listener does not offer AUTH
    assert "queued as" in run.output, run
    header, _ = split_received(the_one_stored(server, run, "user@local.test"))
    assert b"with ESMTPS id" in header and b"ESMTPSA" not in header, header
    # The same client may not relay elsewhere without AUTH (mynetworks is empty).
    refused = swaks("--port", str(server.port), "--tls", *verified_tls(pki))
    assert refused.status == 24, refused  # swaks: no RCPTs accepted
    assert any(r.startswith("554 5.7.1") for r in server_replies(refused)), refused
    assert len(server.queue_list()) == 1
