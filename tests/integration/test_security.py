"""TLS, AUTH, lockout, rate limits and access lists against a real `mta serve`.

Clients are real: asyncio/ssl and smtplib verify the server certificate against a
CA made by the test; the untrusted client binds to 127.0.0.9 (mynetworks is empty
unless a test says otherwise).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from mta.users import User, hash_password, save_users
from tests.integration.conftest import (
    MtaServer, SmtpClient, free_port, queued_id, split_received, wait_until,
)
from tests.integration.dns_server import DnsServer
from tests.integration.test_metrics import get, sample
from tests.integration.tlscerts import Pki, make_pki

pytestmark = pytest.mark.integration
UNTRUSTED = "127.0.0.9"
MSG = b"Subject: t\r\n\r\nhello\r\n"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def users_file(tmp_path: Path, **passwords: str) -> Path:
    path = tmp_path / "users"
    save_users(str(path), {name: User(name, hash_password(pw), ()) for name, pw in passwords.items()})
    return path


def secure_server(mta_server, tmp_path: Path, pki: Pki, smtp_options: str = "",
                  **sections: Any) -> tuple[MtaServer, dict[str, int]]:
    """Listeners smtp (the fixture's port; `smtp_options`: extra TOML lines for it), submission and
    smtps, with [tls] and a users file."""
    ports = {"submission": free_port(), "smtps": free_port()}
    server = mta_server(start=False, **sections)
    listeners = [{"address": f"127.0.0.1:{server.port}", "extra": smtp_options},
                 {"address": f"127.0.0.1:{ports['submission']}", "mode": "submission"},
                 {"address": f"127.0.0.1:{ports['smtps']}", "mode": "smtps"}]
    text = server.config_path.read_text()
    text = text.replace(f'[[listener]]\naddress = "127.0.0.1:{server.port}"\n', "")
    extra = "".join(f'\n[[listener]]\naddress = "{lst["address"]}"\nmode = "{lst.get("mode", "smtp")}"\n'
                    f'{lst.get("extra", "")}' for lst in listeners)
    extra += f'\n[tls]\ncert_file = "{pki.cert}"\nkey_file = "{pki.key}"\n'
    if "auth" not in sections:
        extra += f'\n[auth]\nusers_file = "{users_file(tmp_path, alice="correct horse")}"\n'
    server.config_path.write_text(text + extra)
    server.start()
    wait_until(lambda: get(server, "/healthz")[0] == 200, 10, "the control process", server)
    return server, ports


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def drop(client: SmtpClient) -> None:
    """Close without QUIT (the server closed, or TLS failed), and wait: no transport left to GC."""
    client.writer.close()
    with contextlib.suppress(Exception):
        await client.writer.wait_closed()


# --- STARTTLS ------------------------------------------------------------------------

def test_starttls_is_verified_and_a_pipelined_injection_is_never_executed(mta_server, tmp_path, pki) -> None:
    server, _ = secure_server(mta_server, tmp_path, pki)

    async def session() -> tuple[str, str, str, str, str]:
        client = await SmtpClient.connect(server.port, helo=None, source=UNTRUSTED)
        ehlo = await client.command("EHLO client.test")
        # The attack: commands in the same packet as STARTTLS, in plaintext.
        client.writer.write(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@local.test>\r\n")
        ready = await client.read_reply()
        assert ready.code == 220, ready
        await client.writer.start_tls(pki.client_context(), server_hostname="mx.test")
        after = await client.command("EHLO client.test")
        rcpt = await client.command("RCPT TO:<victim@local.test>")  # would be 250 had MAIL run
        again = await client.command("STARTTLS")
        reply = await client.send_mail("a@x.test", ["b@local.test"], MSG)
        await client.close()
        return ehlo.text, after.text, str(rcpt), str(again), str(reply)

    ehlo, after, rcpt, again, queued = run(session())
    assert "STARTTLS" in ehlo.splitlines()
    assert "STARTTLS" not in after.splitlines()  # not offered twice
    assert rcpt.startswith("503 5.5.1"), rcpt  # the injected MAIL never ran
    assert again.startswith("554 5.5.1"), again
    msgid = queued.rsplit(" ", 1)[-1]
    header, _ = split_received(server.queue_body(msgid))
    assert b"with ESMTPS id" in header and b"(using TLSv1.3 with cipher" in header, header
    # Only the one message sent under TLS was queued.
    assert [m["id"] for m in server.queue_list()] == [msgid]


def test_an_untrusted_certificate_fails_verification(mta_server, tmp_path, pki) -> None:
    server, _ = secure_server(mta_server, tmp_path, pki)
    stranger = make_pki(tmp_path / "other")  # a different CA: must not verify

    async def session() -> None:
        client = await SmtpClient.connect(server.port)
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.starttls(stranger.client_context())
        await drop(client)

    run(session())


def test_implicit_tls_on_smtps_offers_auth_and_no_starttls(mta_server, tmp_path, pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)

    async def session() -> tuple[str, str]:
        client = await SmtpClient.connect(ports["smtps"], helo=None, tls=pki.client_context())
        ehlo = await client.command("EHLO client.test")
        auth = await client.auth_plain("alice", "correct horse")
        await client.close()
        return ehlo.text, str(auth)

    ehlo, auth = run(session())
    assert "STARTTLS" not in ehlo.splitlines() and "AUTH PLAIN LOGIN" in ehlo.splitlines()
    assert auth.startswith("235 2.7.0"), auth


# --- AUTH ----------------------------------------------------------------------------

def test_auth_over_tls_relays_and_every_refusal_has_its_code(mta_server, tmp_path, pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)

    async def session() -> dict[str, str]:
        out: dict[str, str] = {}
        client = await SmtpClient.connect(ports["submission"], helo=None, source=UNTRUSTED)
        out["plain_ehlo"] = (await client.command("EHLO client.test")).text
        out["plaintext_auth"] = str(await client.auth_plain("alice", "correct horse"))
        out["mail_before_auth"] = str(await client.command("MAIL FROM:<alice@x.test>"))
        out["tls_ehlo"] = (await client.starttls(pki.client_context())).text
        out["bad_password"] = str(await client.auth_plain("alice", "wrong"))
        out["unknown_user"] = str(await client.auth_plain("mallory", "correct horse"))
        out["good"] = str(await client.auth_plain("alice", "correct horse"))
        out["twice"] = str(await client.auth_plain("alice", "correct horse"))
        out["relay"] = str(await client.send_mail("alice@x.test", ["bob@remote.test"], MSG))
        await client.close()
        # The same relay without AUTH, from the same address, on port 25: refused.
        anonymous = await SmtpClient.connect(server.port, source=UNTRUSTED)
        out["anonymous"] = str(await anonymous.send_mail("alice@x.test", ["bob@remote.test"], MSG))
        await anonymous.close()
        return out

    out = run(session())
    assert "AUTH" not in out["plain_ehlo"]  # not advertised without TLS
    assert out["plaintext_auth"].startswith("538 5.7.11"), out
    assert out["mail_before_auth"].startswith("530 5.7.0"), out
    assert "AUTH PLAIN LOGIN" in out["tls_ehlo"].splitlines()
    assert out["bad_password"].startswith("535 5.7.8") and out["unknown_user"].startswith("535 5.7.8"), out
    assert out["good"].startswith("235 2.7.0") and out["twice"].startswith("503 5.5.1"), out
    msgid = queued_id_from(out["relay"])
    assert out["anonymous"].startswith("554 5.7.1"), out
    header, _ = split_received(server.queue_body(msgid))
    assert b"with ESMTPSA id" in header
    assert b"correct horse" not in server.log_bytes() and b"wrong" not in server.log_bytes()
    attempts = get(server, "/metrics")[1]
    assert sample(attempts, "mta_auth_attempts_total", result="success") == 1
    assert sample(attempts, "mta_auth_attempts_total", result="failure") == 2
    assert sample(attempts, "mta_auth_attempts_total", result="no_tls") == 1


def queued_id_from(text: str) -> str:
    match = re.search(r"queued as ([0-9A-F]{21})", text)
    assert match, text
    return match.group(1)


def test_smtplib_logs_in_with_login_and_plain(mta_server, tmp_path, pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    for mechanism in ("LOGIN", "PLAIN"):
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as client:
            client.starttls(context=pki.client_context())
            client._host = "mx.test"  # noqa: SLF001 (smtplib verifies against the host it connected to)
            client.ehlo("client.test")
            client.user, client.password = "alice", "correct horse"
            code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            assert code == 235, (mechanism, code, text)
            refused = client.sendmail("alice@x.test", ["bob@remote.test"], MSG)
            assert refused == {}


def test_a_second_login_through_another_worker_hits_the_cache_and_a_new_password_invalidates_it(
        mta_server, tmp_path, pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki, server={"inbound_workers": 2})
    wait_until(lambda: sample(get(server, "/metrics")[1], "mta_master_children", kind="inbound", state="ready") == 2,
               10, "both inbound workers ready", server)
    # The start-up probe's session counted on one worker until that worker's next heartbeat
    # (1 s): let both report idle, so the master's least-loaded choice alternates.
    time.sleep(1.2)

    def counters() -> tuple[float, float]:
        text = get(server, "/metrics")[1]
        return sample(text, "mta_auth_cache_hits_total"), sample(text, "mta_auth_cache_misses_total")

    async def login(password: str, keep: list[SmtpClient]) -> str:
        client = await SmtpClient.connect(ports["smtps"], helo="client.test", tls=pki.client_context())
        reply = await client.auth_plain("alice", password)
        keep.append(client)  # stays open: the master hands the next connection to the other worker
        return str(reply)

    async def two_logins(password: str) -> list[str]:
        keep: list[SmtpClient] = []
        replies = [await login(password, keep), await login(password, keep)]
        for client in keep:
            await client.close()
        return replies

    assert run(two_logins("correct horse")) == ["235 2.7.0 Authentication successful"] * 2
    assert counters() == (1, 1)  # the first ran scrypt, the second did not
    pids = re.findall(rb"proc=inbound#\d+ pid=(\d+) event=auth client=", server.log_bytes())
    assert len(set(pids)) == 2, pids  # two different worker processes

    server.mta("users", "passwd", "alice", stdin=b"battery staple\n")

    async def after_change() -> list[str]:
        keep: list[SmtpClient] = []
        replies = [await login("correct horse", keep), await login("battery staple", keep)]
        for client in keep:
            await client.close()
        return replies

    old, new = run(after_change())
    assert old.startswith("535 5.7.8") and new.startswith("235 2.7.0")
    hits, misses = counters()
    assert hits == 1 and misses == 3  # the cached entry for the old password was not used


def test_ten_failures_lock_the_address_out_and_the_lockout_ends(mta_server, tmp_path, pki) -> None:
    lockout = 6.0
    server, ports = secure_server(mta_server, tmp_path, pki, auth={
        "users_file": str(users_file(tmp_path, alice="correct horse")),
        "slow_after_failures": 3, "failure_delay_seconds": 0.1, "max_failures": 10, "lockout_seconds": lockout})

    async def attack() -> tuple[list[str], list[float], float]:
        client = await SmtpClient.connect(ports["smtps"], tls=pki.client_context(), source=UNTRUSTED)
        replies, took = [], []
        first = time.monotonic()
        for i in range(10):
            started = time.monotonic()
            replies.append(str(await client.auth_plain("alice", f"guess{i}")))
            took.append(time.monotonic() - started)
        await drop(client)
        return replies, took, first

    replies, took, first = run(attack())
    assert all(r.startswith("535 5.7.8") for r in replies[:9]), replies
    assert replies[9].startswith("421 4.7.0"), replies  # the tenth: locked out, session closed
    assert took[8] > took[1] + 0.4, took  # replies slowed down after the third failure

    async def greeting(port: int, **kw: Any) -> str:
        client = await SmtpClient.connect(port, helo=None, **kw)
        text = str(client.greeting)
        await drop(client)
        return text

    locked = run(greeting(ports["submission"], source=UNTRUSTED))
    assert locked.startswith("421 4.7.0"), locked
    assert run(greeting(server.port, source=UNTRUSTED)).startswith("220")  # port 25 mail still flows
    assert run(greeting(ports["submission"])).startswith("220")  # another address is not affected
    time.sleep(max(0.0, first + lockout + 0.5 - time.monotonic()))
    assert run(greeting(ports["submission"], source=UNTRUSTED)).startswith("220")


# --- rate limits and access lists -------------------------------------------------------

def test_each_rate_limit_triggers_with_its_code_and_resets_after_its_window(mta_server) -> None:
    window = 3.0
    server = mta_server(relay={"relay_domains": ["local.test"], "mynetworks": ["127.0.0.1/32"]},
                        rate={"window_seconds": window, "connections_per_window": 3, "messages_per_window": 2,
                              "recipients_per_window": 3})

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        start = time.monotonic()
        client = await SmtpClient.connect(server.port, source=UNTRUSTED)  # connection 1
        out["m1"] = str(await client.send_mail("a@x.test", ["r1@local.test", "r2@local.test"], MSG))
        out["m2_rcpt3"] = str(await client.command("MAIL FROM:<a@x.test>"))
        out["r3"] = str(await client.command("RCPT TO:<r3@local.test>"))
        out["r4"] = str(await client.command("RCPT TO:<r4@local.test>"))
        await client.command("RSET")
        out["m3"] = str(await client.command("MAIL FROM:<a@x.test>"))
        await client.close()
        conns = []
        for _ in range(3):  # connections 2, 3 and 4
            c = await SmtpClient.connect(server.port, helo=None, source=UNTRUSTED)
            conns.append(str(c.greeting))
            await c.close()
        out["conns"] = conns
        trusted = await SmtpClient.connect(server.port)  # mynetworks: exempt from the windows
        out["trusted"] = str(await trusted.send_mail("a@x.test", ["r5@local.test"], MSG))
        await trusted.close()
        await asyncio.sleep(max(0.0, start + window + 0.3 - time.monotonic()))
        client = await SmtpClient.connect(server.port, source=UNTRUSTED)
        out["after"] = str(await client.send_mail("a@x.test", ["r6@local.test"], MSG))
        await client.close()
        return out

    out = run(scenario())
    assert out["m1"].startswith("250 2.0.0"), out
    assert out["m2_rcpt3"].startswith("250"), out
    assert out["r3"].startswith("250") and out["r4"].startswith("450 4.7.1"), out
    assert out["m3"].startswith("450 4.7.1"), out
    assert [c[:9] for c in out["conns"]] == ["220 mx.te", "220 mx.te", "421 4.7.0"], out
    assert out["trusted"].startswith("250 2.0.0"), out
    assert out["after"].startswith("250 2.0.0"), out


def test_access_lists_refuse_with_their_codes(mta_server) -> None:
    server = mta_server(policy={"client_deny": ["127.0.0.66/32"], "sender_deny": ["spam.test", "bad@x.test"],
                                "recipient_deny": ["closed@local.test"]})

    async def scenario() -> dict[str, str]:
        denied = await SmtpClient.connect(server.port, helo=None, source="127.0.0.66")
        out = {"client": str(denied.greeting)}
        await drop(denied)
        client = await SmtpClient.connect(server.port, helo="mx.test", source=UNTRUSTED)  # our own name: no trust
        out["domain"] = str(await client.command("MAIL FROM:<anyone@SPAM.test>"))
        out["address"] = str(await client.command("MAIL FROM:<Bad@X.test>"))
        out["ok"] = str(await client.command("MAIL FROM:<good@x.test>"))
        out["rcpt"] = str(await client.command("RCPT TO:<closed@local.test>"))
        out["relay"] = str(await client.command("RCPT TO:<u@remote.test>"))
        await client.close()
        return out

    out = run(scenario())
    assert out["client"].startswith("554 5.7.1"), out
    assert out["domain"].startswith("553 5.7.1") and out["address"].startswith("553 5.7.1"), out
    assert out["ok"].startswith("250"), out
    assert out["rcpt"].startswith("550 5.7.1") and out["relay"].startswith("554 5.7.1"), out


def test_a_dnsbl_listed_client_is_refused_at_mail_unless_authenticated(mta_server, tmp_path, pki) -> None:
    dns = DnsServer()
    dns.set("9.0.0.127.bl.test", "A", "127.0.0.2")
    try:
        server, ports = secure_server(mta_server, tmp_path, pki, policy={"dnsbl": ["bl.test"]},
                                      dns={"nameservers": [dns.nameserver], "timeout_seconds": 2})

        async def scenario() -> dict[str, str]:
            listed = await SmtpClient.connect(server.port, source=UNTRUSTED)
            out = {"listed": str(await listed.command("MAIL FROM:<a@x.test>"))}
            await listed.close()
            clean = await SmtpClient.connect(server.port, source="127.0.0.10")
            out["clean"] = str(await clean.command("MAIL FROM:<a@x.test>"))
            await clean.close()
            user = await SmtpClient.connect(ports["smtps"], tls=pki.client_context(), source=UNTRUSTED)
            await user.auth_plain("alice", "correct horse")
            out["authenticated"] = str(await user.command("MAIL FROM:<a@x.test>"))
            await user.close()
            return out

        out = run(scenario())
    finally:
        dns.close()
    assert out["listed"].startswith("554 5.7.1") and "bl.test" in out["listed"], out
    assert out["clean"].startswith("250"), out
    assert out["authenticated"].startswith("250"), out


def test_sighup_loads_a_renewed_certificate_and_keeps_the_old_one_when_broken(mta_server, tmp_path, pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki)
    renewed = make_pki(tmp_path / "renewed")  # another CA: clients of the old one cannot verify it

    async def handshake(port: int, context: ssl.SSLContext) -> str:
        client = await SmtpClient.connect(port, helo=None, tls=context)
        text = str(client.greeting)
        await client.close()
        return text

    def verifies(context: ssl.SSLContext) -> bool:
        try:
            return run(handshake(ports["smtps"], context)).startswith("220")
        except ssl.SSLCertVerificationError:
            return False

    assert verifies(pki.client_context()) and not verifies(renewed.client_context())
    pki.cert.write_bytes(renewed.cert.read_bytes())  # renewal in place, then reload
    pki.key.write_bytes(renewed.key.read_bytes())
    os.kill(server.master_pid, signal.SIGHUP)
    wait_until(lambda: verifies(renewed.client_context()), 15, "the renewed certificate", server)

    pki.key.write_bytes(b"not a key\n")  # a broken renewal: refused, the running one stays
    os.kill(server.master_pid, signal.SIGHUP)
    wait_until(lambda: b"event=reload_failed" in server.log_bytes(), 10, "the reload to be refused", server)
    assert b"[tls] cert_file" in server.log_bytes()
    assert verifies(renewed.client_context())


def test_concurrent_guesses_cannot_outrun_the_lockout(mta_server, tmp_path, pki) -> None:
    server, ports = secure_server(mta_server, tmp_path, pki, auth={
        "users_file": str(users_file(tmp_path, alice="correct horse")), "slow_after_failures": 100,
        "max_failures": 10, "lockout_seconds": 600})

    async def guess(i: int) -> str:
        client = await SmtpClient.connect(ports["smtps"], tls=pki.client_context(), source=UNTRUSTED)
        reply = str(await client.auth_plain("alice", f"guess{i}"))
        await drop(client)
        return reply

    async def attack() -> list[str]:
        return list(await asyncio.gather(*(guess(i) for i in range(25))))

    replies = run(attack())
    assert sum(r.startswith("535") for r in replies) <= 10, replies
    assert sum(r.startswith("421 4.7.0") for r in replies) >= 15, replies
    # Each guess is counted before scrypt runs: at most max_failures checks were made.
    assert sample(get(server, "/metrics")[1], "mta_auth_cache_misses_total") <= 10


def test_more_concurrent_good_logins_than_max_failures_all_succeed(mta_server, tmp_path, pki) -> None:
    # A webmail or app server behind one address: 30 logins of 10 users at once, max_failures
    # 5, no slowing down. The checks beyond the budget wait for a slot; none is refused (nor
    # counted as a failure).
    users = {f"user{i}": f"password {i}" for i in range(10)}
    server, ports = secure_server(mta_server, tmp_path, pki, auth={
        "users_file": str(users_file(tmp_path, **users)), "max_failures": 5,
        "slow_after_failures": 100, "lockout_seconds": 600})

    async def logins() -> list[str]:  # every TLS session first, then 30 AUTHs at once
        clients = await asyncio.gather(*(SmtpClient.connect(ports["smtps"], tls=pki.client_context(),
                                                            source=UNTRUSTED) for _ in range(30)))
        replies = await asyncio.gather(*(c.auth_plain(f"user{i % 10}", f"password {i % 10}")
                                         for i, c in enumerate(clients)))
        await asyncio.gather(*(drop(c) for c in clients))
        return [str(r) for r in replies]

    replies = run(logins())
    assert all(r.startswith("235 2.7.0") for r in replies), replies
    metrics = get(server, "/metrics")[1]
    assert sample(metrics, "mta_auth_attempts_total", result="success") == 30
    assert sample(metrics, "mta_auth_attempts_total", result="failure") == 0


def test_guesses_dropped_mid_check_still_count(mta_server, tmp_path, pki) -> None:
    # A guesser that sends AUTH and hangs up before the answer learns nothing, but its
    # scrypt runs on: each such check must count, or one address could keep the
    # scrypt threads busy forever without ever being locked out.
    server, ports = secure_server(mta_server, tmp_path, pki, auth={
        "users_file": str(users_file(tmp_path, alice="correct horse")), "max_failures": 6,
        "slow_after_failures": 100, "lockout_seconds": 600})

    async def guess_and_drop() -> None:
        clients = await asyncio.gather(*(SmtpClient.connect(ports["smtps"], tls=pki.client_context(),
                                                            source=UNTRUSTED) for _ in range(8)))
        for i, client in enumerate(clients):  # 8 distinct guesses: 8 scrypt runs on 2 threads
            token = base64.b64encode(f"\0alice\0guess {i}".encode()).decode()
            client.writer.write(f"AUTH PLAIN {token}\r\n".encode())
        await asyncio.sleep(0.03)  # every check admitted, a couple finished: drop the rest
        await asyncio.gather(*(drop(c) for c in clients))

    async def greeting() -> str:
        client = await SmtpClient.connect(ports["submission"], helo=None, source=UNTRUSTED)
        text = str(client.greeting)
        await drop(client)
        return text

    run(guess_and_drop())
    wait_until(lambda: run(greeting()).startswith("421 4.7.0"), 5, "the guessing address locked out", server)


def test_a_plaintext_login_does_not_survive_starttls(mta_server, tmp_path, pki) -> None:
    server, _ = secure_server(mta_server, tmp_path, pki, smtp_options="auth = true\nauth_plaintext = true\n")

    async def session() -> tuple[str, str, str]:
        client = await SmtpClient.connect(server.port, source=UNTRUSTED)
        login = str(await client.auth_plain("alice", "correct horse"))
        before = str(await client.command("MAIL FROM:<alice@x.test>"))
        await client.command("RSET")
        await client.starttls(pki.client_context())
        await client.command("MAIL FROM:<alice@x.test>")
        after = str(await client.command("RCPT TO:<bob@remote.test>"))
        await client.close()
        return login, before, after

    login, before, after = run(session())
    assert login.startswith("235") and before.startswith("250"), (login, before)
    assert after.startswith("554 5.7.1"), after  # the login before TLS no longer grants relaying


def test_spool_and_cache_are_private_under_umask_000(mta_server, tmp_path: Path) -> None:
    """Started with umask 000 (a careless shell or unit): nobody but mta's user can read the
    queued mail, the spool lock, the scheduler's socket or the cache."""
    import stat
    server = mta_server(wrapper=("sh", "-c", 'umask 000; exec "$@"', "sh"),
                        delivery={"workers": 1})
    wait_until(lambda: (server.spool / "scheduler.sock").exists(), 10, "the scheduler's socket", server)
    cache = server.spool.parent / f"{server.spool.name}-cache"
    for folder in (server.spool, cache):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()
                 if stat.S_IMODE(p.stat().st_mode) & 0o077}
        assert loose == {}, (folder, loose)
