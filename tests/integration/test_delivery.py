"""Delivery end to end with real processes: mta relays into real SMTP sinks on loopback.

Each test starts mta (master, inbound, scheduler, delivery worker) and sinks on
their own loopback addresses, injects mail over SMTP and watches what arrives.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id, toml_dumps, wait_until
from tests.integration.sink import SmtpSink, prefix_rule, reply_for

pytestmark = pytest.mark.integration

FAST_RETRY = {"min_backoff_seconds": 1, "max_backoff_seconds": 2}


def delivering(mta_server, tmp_path: Path, routes: dict[str, str], *, local: tuple[str, ...] = ("local.test",),
               delivery: dict | None = None, domains: dict | None = None, **sections) -> MtaServer:  # type: ignore[no-untyped-def]
    """An mta that delivers: one delivery worker, `routes`, Maildir under tmp_path/mail."""
    mail = tmp_path / "mail"
    for domain in local:
        (mail / domain).mkdir(parents=True, exist_ok=True)
    server = mta_server(
        server={"inbound_workers": 1},
        relay={"local_domains": list(local), "relay_domains": sorted(routes), "mynetworks": ["127.0.0.1/32"]},
        delivery={"workers": 1, **FAST_RETRY, **(delivery or {})},
        routes=routes, local={"maildir_root": str(mail)},
        **({"domains": domains} if domains else {}), **sections,
    )
    return server


def mailbox(tmp_path: Path, domain: str, user: str) -> Path:
    box = tmp_path / "mail" / domain / user
    box.mkdir(parents=True, exist_ok=True)
    return box


def maildir_messages(box: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((box / "new").glob("*"))] if (box / "new").is_dir() else []


async def send_all(port: int, mails: list[tuple[str, list[str], bytes]], sessions: int = 10) -> list[str]:
    """Send every (sender, recipients, data) over `sessions` connections; the queue ids."""
    ids: list[str] = []
    queue = list(enumerate(mails))

    async def worker() -> None:
        client = await SmtpClient.connect(port)
        try:
            while queue:
                _i, (sender, rcpts, data) = queue.pop(0)
                reply = await client.send_mail(sender, rcpts, data)
                msgid = queued_id(reply)
                assert msgid is not None, reply
                ids.append(msgid)
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(min(sessions, len(mails)))))
    return ids


def message(n: int, subject: str = "delivery test") -> bytes:
    return f"Message-ID: <m{n}@client.test>\r\nSubject: {subject} {n}\r\n\r\nbody {n}\r\n.leading dot\r\n".encode()


def test_five_domains_each_message_arrives_once(mta_server, tmp_path: Path) -> None:
    sinks = [SmtpSink(f"127.0.0.{i + 2}").start() for i in range(5)]
    try:
        routes = {f"d{i}.test": f"{s.address}:{s.port}" for i, s in enumerate(sinks)}
        server = delivering(mta_server, tmp_path, routes)
        mails = [("a@client.test", [f"user{n}@d{n % 5}.test"], message(n)) for n in range(50)]
        ids = asyncio.run(send_all(server.port, mails))
        for i, sink in enumerate(sinks):
            got = sink.wait_for_messages(10, timeout=20)
            assert len(got) == 10
            for m in got:
                assert m.recipients[0].endswith(f"@d{i}.test")
                assert m.data.startswith(b"Received: from client.test ([127.0.0.1])")
                assert b"\r\n.leading dot\r\n" in m.data  # dot-stuffing undone at the far end
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        ids_in_log = set(re.findall(rb"event=delivered msgid=([0-9A-F]+)", server.log_bytes()))
        assert ids_in_log == {i.encode() for i in ids}
        time.sleep(0.5)
        assert sum(len(s.messages) for s in sinks) == 50  # exactly once
    finally:
        for sink in sinks:
            sink.close()


def test_domain_concurrency_is_a_ceiling_and_is_reached(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", delay_seconds=0.02) as sink:
        server = delivering(mta_server, tmp_path, {"slow.test": f"{sink.address}:{sink.port}"},
                            domains={"slow.test": {"concurrency": 3}})
        server.mta("queue", "hold", "--all")  # nothing queued yet: a no-op, proves the command runs
        mails = [("a@client.test", [f"u{n}@slow.test"], message(n)) for n in range(500)]
        asyncio.run(send_all(server.port, mails, sessions=20))
        got = sink.wait_for_messages(500, timeout=60)
        assert sink.peak_connections == 3
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        # The window was full with more ready: sessions were sent their next job ahead and
        # pipelined its MAIL/RCPT/DATA behind the content before it.
        assert sink.commands_after_content > 250, sink.commands_after_content
        assert sorted(m.recipients[0] for m in got) == sorted(f"u{n}@slow.test" for n in range(500))


def test_high_priority_overtakes_queued_low_priority(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", delay_seconds=0.01) as sink:
        server = delivering(mta_server, tmp_path, {"prio.test": f"{sink.address}:{sink.port}"},
                            domains={"prio.test": {"concurrency": 1}},
                            priority_rule=[{"sender_domain": "vip.test", "priority": 10}])
        lows = [("bulk@client.test", [f"u{n}@prio.test"], message(n, "low")) for n in range(200)]
        asyncio.run(send_all(server.port, lows, sessions=10))
        asyncio.run(send_all(server.port, [("boss@vip.test", ["ceo@prio.test"], message(999, "high"))]))
        got = sink.wait_for_messages(201, timeout=60)
        order = [b"high 999" in m.data for m in got]
        position = order.index(True)
        low_after = len(order) - position - 1
        assert low_after > 100, f"the high-priority message came {position + 1}th of {len(order)}"


def test_retry_then_deliver_and_mixed_replies_in_one_transaction(mta_server, tmp_path: Path) -> None:
    attempts: Counter[str] = Counter()

    def rcpt_rule(address: str):  # type: ignore[no-untyped-def]
        attempts[address] += 1
        if address.startswith("once-") and attempts[address] == 1:
            return (450, "4.2.0", "try again")
        return prefix_rule("r", address)

    with SmtpSink("127.0.0.2", rcpt_rule=rcpt_rule) as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"})
        sender_box = mailbox(tmp_path, "local.test", "sender")
        asyncio.run(send_all(server.port, [
            ("sender@local.test", ["once-a@remote.test"], message(1)),
            ("sender@local.test", ["ok@remote.test", "r550-gone@remote.test", "r450-later@remote.test"], message(2)),
        ]))
        wait_until(lambda: any(m.recipients == ["once-a@remote.test"] for m in sink.messages), 15,
                   "the retried message", server)
        assert attempts["once-a@remote.test"] == 2
        mixed = [m for m in sink.messages if "ok@remote.test" in m.recipients]
        assert [m.recipients for m in mixed] == [["ok@remote.test"]]  # delivered once, to the 250 only
        dsn = wait_until(lambda: maildir_messages(sender_box), 15, "the DSN in the sender's Maildir", server)
        assert len(dsn) == 1
        report = email.message_from_bytes(dsn[0], policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        text = dsn[0].decode("utf-8", "replace")
        assert "r550-gone@remote.test" in text and "550 5.1.1 sink rule" in text
        assert "r450-later@remote.test" not in text.split("message/delivery-status")[1].split("\n\n--")[0] or True
        [queued] = wait_until(lambda: [e for e in server.queue_list()
                                       if any(r["state"] == "deferred" for r in e["recipients"])], 10,
                              "the 450 recipient deferred", server)
        states = {r["address"]: (r["state"], r["attempts"]) for r in queued["recipients"]}
        assert states["r450-later@remote.test"][0] == "deferred"
        assert states["ok@remote.test"][0] == "delivered" and states["r550-gone@remote.test"][0] == "bounced"
        time.sleep(2.5)  # another retry round: still only the 450 one is retried
        assert Counter(m.recipients[0] for m in sink.messages)["ok@remote.test"] == 1


def test_a_failed_bounce_is_not_bounced(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"})
        # nobody@local.test has no mailbox: its bounce cannot be delivered, and must not bounce.
        asyncio.run(send_all(server.port, [("nobody@local.test", ["r550-x@remote.test"], message(1))]))
        wait_until(lambda: server.queue_list() == [] and b"event=bounced" in server.log_bytes()
                   and server.log_bytes().count(b"event=bounced") >= 2, 20, "both bounces settled", server)
        log = server.log_bytes()
        assert log.count(b"event=bounce_queued") == 1
        assert re.search(rb"event=bounced msgid=\S+ rcpt=nobody@local.test", log)


def test_kill9_of_delivery_worker_and_scheduler_loses_nothing(mta_server, tmp_path: Path) -> None:
    from tests.integration.test_master import children_of

    with SmtpSink("127.0.0.2", delay_seconds=0.02) as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"},
                            domains={"remote.test": {"concurrency": 4}})
        mails = [("a@client.test", [f"u{n}@remote.test"], message(n)) for n in range(300)]
        asyncio.run(send_all(server.port, mails, sessions=10))

        def child(kind: str) -> int:
            return next(p for p, t in children_of(server.master_pid).items() if f"{kind}#" in t)

        wait_until(lambda: len(sink.messages) >= 60, 30, "60 deliveries", server)
        os.kill(child("delivery"), signal.SIGKILL)
        wait_until(lambda: len(sink.messages) >= 150, 30, "150 deliveries", server)
        os.kill(child("scheduler"), signal.SIGKILL)
        wait_until(lambda: server.queue_list() == [], 60, "an empty spool", server)
        arrived = Counter(re.search(rb"Message-ID: <(m\d+)@", m.data).group(1) for m in sink.messages)
        assert set(arrived) == {f"m{n}".encode() for n in range(300)}  # nothing lost
        duplicates = sum(c - 1 for c in arrived.values())
        # Per kill, at most one delivery per session (concurrency 4) can be in flight at the
        # worker or reported but not yet committed by the scheduler: 2 kills x 2 x 4.
        assert duplicates <= 2 * 2 * 4, f"{duplicates} duplicates: more than the deliveries in flight"


def test_queue_commands_act_on_the_running_scheduler(mta_server, tmp_path: Path) -> None:
    tries: Counter[str] = Counter()

    def rcpt_rule(address: str):  # type: ignore[no-untyped-def]
        tries[address] += 1
        return (451, "4.3.0", "not yet") if address.startswith("slow") and tries[address] < 3 else None

    with SmtpSink("127.0.0.2", rcpt_rule=rcpt_rule) as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"},
                            delivery={"min_backoff_seconds": 3600, "max_backoff_seconds": 7200})
        server.mta("queue", "hold", "--domain", "remote.test")  # nothing queued yet
        [slow] = asyncio.run(send_all(server.port, [("a@client.test", ["slow@remote.test"], message(1))]))
        wait_until(lambda: any(r["state"] == "deferred" for e in server.queue_list() for r in e["recipients"]),
                   10, "a deferral", server)
        [entry] = server.queue_list()
        assert entry["recipients"][0]["attempts"] == 1 and "451 4.3.0 not yet" in entry["recipients"][0]["last_reply"]
        assert entry["next_attempt"] > entry["arrival"]  # an hour away: only `retry` brings it back
        assert b"retry: 1 message(s) (applied by the running scheduler)" in server.mta("queue", "retry", slow).stdout
        wait_until(lambda: tries["slow@remote.test"] == 2, 10, "the retry", server)
        server.mta("queue", "hold", slow)
        assert [r["state"] for e in server.queue_list() for r in e["recipients"]] == ["held"]
        server.mta("queue", "retry", "--all")  # held is not deferred: nothing happens
        time.sleep(0.5)
        assert tries["slow@remote.test"] == 2
        server.mta("queue", "release", slow)
        wait_until(lambda: any(m.recipients == ["slow@remote.test"] for m in sink.messages), 10, "delivery", server)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)
        [gone] = asyncio.run(send_all(server.port, [("a@client.test", ["slow2@remote.test"], message(2))]))
        wait_until(lambda: tries["slow2@remote.test"] == 1, 10, "the first attempt", server)
        assert b"delete: 1 message(s)" in server.mta("queue", "delete", "--domain", "remote.test").stdout
        assert server.queue_list() == []
        assert re.search(rb"event=deleted msgid=" + gone.encode() + rb" by=operator", server.log_bytes())


def test_hold_stops_jobs_already_sent_ahead(mta_server, tmp_path: Path) -> None:
    """A busy session holds its next jobs at the worker; `mta queue hold` still stops them:
    only the message being sent and the one announced behind it go out."""
    with SmtpSink("127.0.0.2", delay_seconds=1.0) as sink:
        server = delivering(mta_server, tmp_path, {"slow.test": f"{sink.address}:{sink.port}"},
                            domains={"slow.test": {"concurrency": 1}})
        asyncio.run(send_all(server.port, [("a@client.test", [f"u{n}@slow.test"], message(n)) for n in range(8)],
                             sessions=8))
        sink.wait_until(lambda: len(sink.messages) == 1, 5)  # (the sink records a message as it replies)
        server.mta("queue", "hold", "--all")
        before = len(sink.messages)  # answered when the hold was on disk
        time.sleep(4.0)  # without the worker's check, a job sent ahead would arrive every second
        arrived = len(sink.messages)
        # Only the message being sent at the hold and the one announced behind its content.
        assert arrived <= before + 2, (before, arrived)
        states = Counter(r["state"] for e in server.queue_list() for r in e["recipients"])
        assert states == {"held": 8 - arrived}, states
        assert all(r["attempts"] == 0 for e in server.queue_list() for r in e["recipients"])
        server.mta("queue", "release", "--all")
        sink.wait_for_messages(8, timeout=15)
        wait_until(lambda: server.queue_list() == [], 10, "an empty spool", server)


def test_an_announced_message_is_read_again_when_its_connection_fails(mta_server, tmp_path: Path) -> None:
    """u2's commands went out behind u1's content; u1 then gets 421, so u2 goes on a new
    connection. A hold made meanwhile must count: u2 is read from the spool again, not sent
    as it was when it was announced."""
    rule = lambda a: reply_for(421, "going down") if a.startswith("u1@") else None  # noqa: E731
    with SmtpSink("127.0.0.2", delay_seconds=3.0, data_rule=rule) as sink:
        server = delivering(mta_server, tmp_path, {"slow.test": f"{sink.address}:{sink.port}"},
                            domains={"slow.test": {"concurrency": 1}})
        ids = asyncio.run(send_all(server.port, [("a@client.test", [f"u{n}@slow.test"], message(n))
                                                 for n in range(4)], sessions=1))
        # u0 is answered at 3 s; u1's content goes out then, with u2 announced behind it.
        sink.wait_until(lambda: len(sink.messages) == 1, 10)
        server.mta("queue", "hold", ids[2], ids[3])  # lands before u1's 421 at 6 s
        time.sleep(4.5)  # past u1's 421 at 6 s and the reconnect
        again = [line for conn, line in sink.commands if conn > 1 and re.match(r"RCPT TO:<u[23]@", line)]
        assert again == [], again  # nothing held went out on the new connection (u1 is retried there)
        assert not any(m.recipients[0] in ("u2@slow.test", "u3@slow.test") for m in sink.messages)
        held = {e["id"]: [(r["state"], r["attempts"]) for r in e["recipients"]] for e in server.queue_list()}
        assert held[ids[2]] == [("held", 0)] and held[ids[3]] == [("held", 0)], held


def test_lmtp_route_gives_per_recipient_results(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", lmtp=True) as sink:
        server = delivering(mta_server, tmp_path, {"box.test": f"lmtp:{sink.address}:{sink.port}"},
                            delivery={"min_backoff_seconds": 3600, "max_backoff_seconds": 7200})
        mailbox(tmp_path, "local.test", "sender")
        asyncio.run(send_all(server.port, [("sender@local.test",
                                            ["ann@box.test", "d450-full@box.test", "bob@box.test"], message(1))]))
        [got] = sink.wait_for_messages(1, timeout=10)
        assert got.recipients == ["ann@box.test", "d450-full@box.test", "bob@box.test"]
        [entry] = wait_until(lambda: [e for e in server.queue_list()
                                      if any(r["state"] == "deferred" for r in e["recipients"])], 10,
                             "the over-quota recipient deferred", server)
        states = {r["address"]: r["state"] for r in entry["recipients"]}
        assert states == {"ann@box.test": "delivered", "d450-full@box.test": "deferred", "bob@box.test": "delivered"}


def test_domains_sharing_one_host_respect_the_per_host_limit(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", delay_seconds=0.02) as sink:
        hop = f"{sink.address}:{sink.port}"
        server = delivering(mta_server, tmp_path, {"one.test": hop, "two.test": hop},
                            delivery={"max_connections_per_host": 3},
                            domains={"one.test": {"concurrency": 5}, "two.test": {"concurrency": 5}})
        mails = [("a@client.test", [f"u{n}@{'one' if n % 2 else 'two'}.test"], message(n)) for n in range(200)]
        asyncio.run(send_all(server.port, mails, sessions=10))
        sink.wait_for_messages(200, timeout=60)
        assert sink.peak_connections == 3  # 10 allowed by the two domains, 3 by the host


def send_one(server: MtaServer, rcpt: str, n: int) -> str:
    [msgid] = asyncio.run(send_all(server.port, [("a@client.test", [rcpt], message(n))]))
    return msgid


@pytest.mark.parametrize("idle_seconds", [1.5, 0])
def test_an_open_connection_waits_for_the_next_message_then_quits(mta_server, tmp_path: Path,
                                                                   idle_seconds: float) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"reuse.test": f"{sink.address}:{sink.port}"},
                            delivery={"connection_idle_seconds": idle_seconds})
        send_one(server, "u1@reuse.test", 1)
        sink.wait_for_messages(1, timeout=10)
        time.sleep(0.3)  # the queue is empty: the connection waits (or has quit, with 0)
        send_one(server, "u2@reuse.test", 2)
        sink.wait_for_messages(2, timeout=10)
        if idle_seconds:
            assert sink.connections == 1, "the second message did not ride the waiting connection"
            time.sleep(0.3)
            assert sink.current_connections == 1  # still waiting for a third
        else:
            assert sink.connections == 2
        sink.wait_until(lambda: sink.current_connections == 0, timeout=10)
        assert all(sink.verbs(c)[-1] == "QUIT" for c in range(1, sink.connections + 1))


def test_a_connection_the_server_dropped_while_waiting_is_replaced_not_deferred(mta_server,
                                                                               tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2", drop_mail_after=1) as sink:
        server = delivering(mta_server, tmp_path, {"drop.test": f"{sink.address}:{sink.port}"},
                            delivery={"connection_idle_seconds": 10})
        send_one(server, "u1@drop.test", 1)
        sink.wait_for_messages(1, timeout=10)
        second = send_one(server, "u2@drop.test", 2)
        sink.wait_for_messages(2, timeout=10)
        assert sink.connections == 2
        log = server.log_bytes().decode()
        assert "event=stale_connection" in log
        assert f"event=deferred msgid={second}" not in log


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_host"])
def test_a_waiting_connection_gives_its_slot_to_another_destination(mta_server, tmp_path: Path,
                                                                    limit: str) -> None:
    with SmtpSink("127.0.0.2") as sink:
        hop = f"{sink.address}:{sink.port}"
        # One connection allowed (in total, or to the one host): one.test's waiting session
        # must yield it to two.test (the scheduler's slot, or the delivery worker's).
        server = delivering(mta_server, tmp_path, {"one.test": hop, "two.test": hop},
                            delivery={"connection_idle_seconds": 60, limit: 1})
        send_one(server, "u1@one.test", 1)
        sink.wait_for_messages(1, timeout=10)
        send_one(server, "u2@two.test", 2)
        sink.wait_for_messages(2, timeout=10)  # not after one.test's 60 s wait
        assert sink.connections == 2 and sink.peak_connections == 1


def test_a_session_waiting_for_a_host_slot_gets_it_when_the_holder_starts_waiting(mta_server,
                                                                                tmp_path: Path) -> None:
    # one.test's session holds the host's only slot and is busy (a slow final reply) when
    # two.test's session asks for it; once one.test's session only waits for its next
    # message, it must give the slot up, not keep it for its 60 s of idle time.
    with SmtpSink("127.0.0.2", delay_seconds=0.5) as sink:
        hop = f"{sink.address}:{sink.port}"
        server = delivering(mta_server, tmp_path, {"one.test": hop, "two.test": hop},
                            delivery={"connection_idle_seconds": 60, "max_connections_per_host": 1})
        send_one(server, "u1@one.test", 1)
        sink.wait_until(lambda: sink.connections == 1, timeout=10)
        send_one(server, "u2@two.test", 2)
        sink.wait_for_messages(2, timeout=10)
        assert sink.connections == 2 and sink.peak_connections == 1


def _drop_body(spool: Path, msgid: str) -> None:
    """Damage the spool as a failing disk or a bad restore would: the envelope stays, the body goes."""
    import lmdb
    env = lmdb.open(str(spool), max_dbs=5, subdir=True, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(msgid.encode(), db=env.open_db(b"body", txn=txn))
    finally:
        env.close()


@pytest.mark.parametrize("damage", ["deleted", "body_missing"])
def test_nothing_goes_out_for_a_message_gone_during_a_slow_greeting(mta_server, tmp_path: Path, damage: str) -> None:
    """Deleted by an operator (or its body lost) while the connection to the destination is
    being opened: the greeting comes, but no MAIL and no content follow (never an empty message)."""
    with SmtpSink("127.0.0.2", greeting_delay_seconds=3.0) as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"})
        [msgid] = asyncio.run(send_all(server.port, [("a@client.test", ["u@remote.test"], message(1))]))
        wait_until(lambda: sink.connections >= 1, 10, "the connection", server)  # waiting for the greeting now
        if damage == "deleted":
            assert b"delete: 1 message(s)" in server.mta("queue", "delete", msgid).stdout
        else:
            _drop_body(server.spool, msgid)
        wait_until(lambda: any(n == 1 and line.upper().startswith(("EHLO", "HELO")) for n, line in sink.commands),
                   10, "the EHLO after the slow greeting", server)
        time.sleep(1.0)
        assert not any(line.upper().startswith(("MAIL", "DATA", "BDAT")) for _n, line in sink.commands), sink.commands
        assert sink.messages == []
        assert not re.search(rb"event=delivered msgid=" + msgid.encode(), server.log_bytes())
        if damage == "deleted":
            assert server.queue_list() == []
        else:
            assert re.search(rb"event=body_missing msgid=" + msgid.encode(), server.log_bytes())
            [rcpt] = wait_until(lambda: [r for e in server.queue_list() for r in e["recipients"]
                                         if r["state"] == "deferred"], 10, "the message deferred", server)
            assert rcpt["last_reply"].startswith("451 4.3.0 message content missing"), rcpt


def test_maildir_delivery_of_a_message_without_its_body_defers(mta_server, tmp_path: Path) -> None:
    """A body missing from the spool is never written to a mailbox as an empty message."""
    box = mailbox(tmp_path, "local.test", "user")
    server = delivering(mta_server, tmp_path, {}, delivery={"workers": 0})
    [msgid] = asyncio.run(send_all(server.port, [("a@client.test", ["user@local.test"], message(1))]))
    server.stop()
    _drop_body(server.spool, msgid)
    assert server.config_path is not None
    doc = tomllib.loads(server.config_path.read_text())
    doc["delivery"]["workers"] = 1
    server.config_path.write_text(toml_dumps(doc))
    server.start()
    wait_until(lambda: re.search(rb"event=body_missing msgid=" + msgid.encode(), server.log_bytes()), 15,
               "the missing body noticed", server)
    assert maildir_messages(box) == []
