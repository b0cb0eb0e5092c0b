"""`mta queue transfer` between two real `mta serve` nodes on loopback: node A cannot
reach dest.test (its messages are deferred), node B delivers it to a sink. Every message
arrives once with its DSN parameters; a transfer killed with -9 and run again loses
nothing, and B logs each copy it got twice."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    MtaServer,
    SmtpClient,
    _env,
    queued_id,
    wait_until,
)
from tests.integration.sink import SmtpSink
from tests.integration.test_bsmtp import FAST_RETRY, send_dsn_mail
from tests.integration.test_security import pki, secure_server  # noqa: F401 (fixture)
from tests.integration.tlscerts import Pki

pytestmark = pytest.mark.integration


def nodes(mta_server: Any, sink: SmtpSink) -> tuple[MtaServer, MtaServer]:
    """A: dest.test routed where nothing listens; B: dest.test to the sink. Both let
    127.0.0.1 relay (B: that is how A's transfer gets in)."""
    relay = {"relay_domains": ["dest.test"], "mynetworks": ["127.0.0.1/32"]}
    delivery = {"workers": 1, **FAST_RETRY}
    a = mta_server(server={"inbound_workers": 1, "hostname": "a.test"}, relay=relay, delivery=delivery,
                   routes={"dest.test": "127.0.0.3:9"})
    b = mta_server(server={"inbound_workers": 1, "hostname": "b.test"}, relay=relay, delivery=delivery,
                   routes={"dest.test": f"{sink.address}:{sink.port}"})
    return a, b


def deferred(server: MtaServer, count: int) -> None:
    def all_tried() -> bool:
        listed = server.queue_list()
        # the first attempts failed; the destination is down, so the others wait their turn
        return len(listed) == count and any(r["state"] == "deferred" for e in listed for r in e["recipients"])
    wait_until(all_tried, 30, f"{count} messages, deferred", server)


def test_transfer_moves_deferred_messages_with_their_dsn_parameters(mta_server) -> None:
    with SmtpSink("127.0.0.2") as sink:
        a, b = nodes(mta_server, sink)
        ids = asyncio.run(send_dsn_mail(a.port, 5))
        deferred(a, 5)
        bodies = {msgid: a.queue_body(msgid) for msgid in ids}
        moved = a.mta("queue", "transfer", "--to", f"127.0.0.1:{b.port}", "--all")
        assert b"transferred 5 message(s) to 127.0.0.1:" in moved.stdout, moved
        assert a.queue_list() == []
        got = sink.wait_for_messages(5, timeout=30)
        wait_until(lambda: b.queue_list() == [], 15, "B's queue empty", b)
        time.sleep(1.0)
        assert len(sink.messages) == 5
    by_sender = {m.sender: m for m in got}
    log = b.log_bytes().decode()
    for n, msgid in enumerate(ids):
        m = by_sender[f"s{n}@client.test"]
        # B's Received, then the content A stored, as it was: the transfer's field stopped at B
        assert m.data.endswith(b"\r\n" + bodies[msgid]) and b"X-Mta-Transfer" not in m.data, m.data
        assert m.data.count(b"Received:") == bodies[msgid].count(b"Received:") + 1
        assert m.mail_params["RET"] == "HDRS" and m.mail_params["ENVID"] == f"env{n}+2Bx"
        assert m.recipients == [f"a{n}@dest.test", f"b{n}@dest.test"]
        assert m.rcpt_params == [{"NOTIFY": "SUCCESS,DELAY", "ORCPT": f"rfc822;list{n}@dest.test"},
                                 {"NOTIFY": "NEVER"}]
        assert f"origin_id={msgid} origin=a.test" in log
    assert "event=transfer_duplicate" not in log


def transfer(a: MtaServer, b: MtaServer) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mta", "queue", "transfer", "-c", str(a.config_path),
                             "--to", f"127.0.0.1:{b.port}", "--all"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_transfer_killed_midway_then_run_again_delivers_every_message(mta_server) -> None:
    count = 40
    with SmtpSink("127.0.0.2") as sink:
        a, b = nodes(mta_server, sink)
        asyncio.run(send_dsn_mail(a.port, count))
        deferred(a, count)
        first = transfer(a, b)
        wait_until(lambda: b.log_bytes().count(b"event=transferred_in") >= 5, 30, "5 messages on B", b)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        assert 0 < len(a.queue_list()) < count  # it was stopped midway; the rest held on A
        again = a.mta("queue", "transfer", "--to", f"127.0.0.1:{b.port}", "--all")
        assert b"transferred" in again.stdout, again
        assert a.queue_list() == []
        wait_until(lambda: len({m.sender for m in sink.messages}) == count, 60, "every message at the sink")
        wait_until(lambda: b.queue_list() == [], 30, "B's queue empty", b)
        time.sleep(1.0)
        copies = collections.Counter(m.sender for m in sink.messages)
    duplicates = b.log_bytes().count(b"event=transfer_duplicate")
    assert sum(copies.values()) - count == duplicates <= 1, (copies, duplicates)


def test_a_refused_message_stays_here_and_is_released_the_rest_moves(mta_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mail" / "local.test").mkdir(parents=True)
    with SmtpSink("127.0.0.2") as sink:
        delivery = {"workers": 1, **FAST_RETRY}
        a = mta_server(server={"inbound_workers": 1, "hostname": "a.test"}, delivery=delivery,
                       relay={"relay_domains": ["dest.test", "local.test"], "mynetworks": ["127.0.0.1/32"]},
                       routes={"dest.test": "127.0.0.3:9", "local.test": "127.0.0.3:9"})
        b = mta_server(server={"inbound_workers": 1, "hostname": "b.test"}, delivery=delivery,
                       relay={"relay_domains": ["dest.test"], "local_domains": ["local.test"],
                              "mynetworks": ["127.0.0.1/32"]},
                       routes={"dest.test": f"{sink.address}:{sink.port}"}, local={"maildir_root": str(tmp_path / "mail")})
        moved = asyncio.run(send_dsn_mail(a.port, 2))
        [refused] = asyncio.run(send_dsn_mail(a.port, 1, domain="local.test"))  # no such mailbox on B
        deferred(a, 3)
        done = a.mta("queue", "transfer", "--to", f"127.0.0.1:{b.port}", "--all", check=False)
        assert done.returncode == 1, done
        assert b"transferred 2 message(s)" in done.stdout and b"1 left here" in done.stdout, done
        assert f"left here: {refused}: 127.0.0.1:{b.port} refused RCPT: 550".encode() in done.stderr, done.stderr
        [left] = a.queue_list()
        assert left["id"] == refused and all(r["state"] != "held" for r in left["recipients"])  # released
        assert {m.sender for m in sink.wait_for_messages(2, timeout=30)} == {"s0@client.test", "s1@client.test"}
        assert not set(moved) & {e["id"] for e in a.queue_list()}


def test_transfer_from_a_stopped_server_takes_the_spool_lock(mta_server) -> None:
    with SmtpSink("127.0.0.2") as sink:
        a, b = nodes(mta_server, sink)
        asyncio.run(send_dsn_mail(a.port, 3))
        deferred(a, 3)
        a.stop()
        moved = a.mta("queue", "transfer", "--to", f"127.0.0.1:{b.port}", "--all")
        assert b"transferred 3 message(s)" in moved.stdout, moved
        assert a.queue_list() == []
        assert len(sink.wait_for_messages(3, timeout=30)) == 3


def test_the_receiving_node_logs_a_second_copy_of_a_transferred_message(mta_server) -> None:
    """What a transfer killed between B's 250 and A's delete sends again: B recognises it."""
    with SmtpSink("127.0.0.2") as sink:
        _a, b = nodes(mta_server, sink)
        content = b"X-Mta-Transfer: id=66204F527A796350D850A; from=a.test\r\nSubject: once\r\n\r\nbody\r\n"

        async def send_twice() -> list[str | None]:
            client = await SmtpClient.connect(b.port)
            ids = [queued_id(await client.send_mail("s@client.test", ["x@dest.test"], content)) for _ in range(2)]
            await client.close()
            return ids

        first, second = asyncio.run(send_twice())
        got = sink.wait_for_messages(2, timeout=30)  # both delivered: a header anyone can write never drops mail
    assert all(b"X-Mta-Transfer" not in m.data and m.data.endswith(b"\r\nSubject: once\r\n\r\nbody\r\n")
               for m in got)
    log = b.log_bytes().decode()
    assert f"event=transferred_in msgid={first} origin_id=66204F527A796350D850A origin=a.test" in log
    assert (f"event=transfer_duplicate msgid={second} origin_id=66204F527A796350D850A origin=a.test copies=2"
            in log), b.log_tail()


def test_a_message_whose_reply_never_came_stays_held_and_is_named(mta_server) -> None:
    """The other end took the content and dropped the connection without a reply: it may
    have the message, so it is neither deleted nor released here (no silent duplicate)."""
    with SmtpSink("127.0.0.2") as parked, SmtpSink("127.0.0.4", drop_after_data=True) as other:
        a, _b = nodes(mta_server, parked)
        ids = asyncio.run(send_dsn_mail(a.port, 3))
        deferred(a, 3)
        done = a.mta("queue", "transfer", "--to", f"{other.address}:{other.port}", "--all", check=False)
        assert done.returncode == 1, done
        assert b"after the content of" in done.stderr and b"stays held here" in done.stderr, done.stderr
        listed = {e["id"]: {r["state"] for r in e["recipients"]} for e in a.queue_list()}
        assert set(listed) == set(ids)  # nothing deleted
        uncertain = [msgid for msgid, states in listed.items() if states == {"held"}]
        assert len(uncertain) == 1 and uncertain[0].encode() in done.stderr
        assert all("held" not in states for msgid, states in listed.items() if msgid != uncertain[0])  # released


def test_transfer_to_a_node_that_relays_only_for_its_users_over_tls(mta_server, tmp_path: Path, pki: Pki) -> None:
    """B's submission listener: AUTH after STARTTLS only, and A is not in B's mynetworks."""
    with SmtpSink("127.0.0.2") as sink:
        a, _b = nodes(mta_server, sink)
        b, ports = secure_server(mta_server, tmp_path, pki, server={"inbound_workers": 1, "hostname": "b.test"},
                                 relay={"relay_domains": ["dest.test"]}, delivery={"workers": 1, **FAST_RETRY},
                                 routes={"dest.test": f"{sink.address}:{sink.port}"})
        ids = asyncio.run(send_dsn_mail(a.port, 3))
        deferred(a, 3)
        to = f"127.0.0.1:{ports['submission']}"
        password = tmp_path / "b.password"
        password.write_text("correct horse\n")

        plain = a.mta("queue", "transfer", "--to", to, "--all", check=False)
        assert plain.returncode == 1 and b"transferred 0 message(s)" in plain.stdout, plain
        assert b"refused MAIL: 530" in plain.stderr, plain.stderr  # what the operator sees: AUTH needed
        untrusted = a.mta("queue", "transfer", "--to", to, "--all", "--starttls", "--user", "alice",
                          "--password-file", str(password), check=False)
        assert untrusted.returncode == 1 and b"give the CA that signed it with --ca-file" in untrusted.stderr, untrusted
        wrong = tmp_path / "wrong.password"
        wrong.write_text("battery staple\n")
        refused = a.mta("queue", "transfer", "--to", to, "--all", "--starttls", "--ca-file", str(pki.ca),
                        "--user", "alice", "--password-file", str(wrong), check=False)
        assert refused.returncode == 1 and b"refused the login of 'alice': 535" in refused.stderr, refused
        assert sorted(e["id"] for e in a.queue_list()) == sorted(ids)  # nothing moved so far

        moved = a.mta("queue", "transfer", "--to", to, "--all", "--starttls", "--ca-file", str(pki.ca),
                      "--user", "alice", "--password-file", str(password))
        assert b"transferred 3 message(s)" in moved.stdout, moved
        got = sink.wait_for_messages(3, timeout=30)
        assert a.queue_list() == []
    assert sorted(m.sender for m in got) == [f"s{n}@client.test" for n in range(3)]
    assert all(b"X-Mta-Transfer" not in m.data and m.mail_params["ENVID"].startswith("env") for m in got)
    log = b.log_bytes().decode()
    assert all(f"origin_id={msgid} origin=a.test" in log for msgid in ids)
    assert "with ESMTPSA" in got[0].data.decode()  # B's Received: over TLS, authenticated
