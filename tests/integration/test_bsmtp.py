"""Moving queued mail between real servers as batch SMTP: `mta queue export --bsmtp` on one,
`mta queue import --bsmtp` on another, delivered once at a sink; importing twice adds
nothing; a delivery under way at the export is not exported again; every envelope field
round-trips through real spools; a plain SMTP server takes the exported file as it is;
a hand-written BSMTP file imports."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mta import bsmtp
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from tests.integration.conftest import REPO_ROOT, MtaServer, SmtpClient, _env, queued_id, spool_snapshot, wait_until
from tests.integration.sink import SmtpSink

pytestmark = pytest.mark.integration

FAST_RETRY = {"min_backoff_seconds": 1, "max_backoff_seconds": 2}


def relay_to(mta_server, sink: SmtpSink | None, start: bool = True, **sections: Any) -> MtaServer:  # type: ignore[no-untyped-def]
    """A server relaying dest.test: to `sink` with one delivery worker, or (None) keeping it
    queued; parked.test goes where nothing listens (deferred again and again)."""
    delivery = {"workers": 1, **FAST_RETRY} if sink is not None else {"workers": 0}
    routes = {"dest.test": f"{sink.address}:{sink.port}", "parked.test": "127.0.0.3:9"} if sink is not None else {}
    return mta_server(start=start, server={"inbound_workers": 1},
                      relay={"relay_domains": ["dest.test", "parked.test"], "mynetworks": ["127.0.0.1/32"]},
                      delivery=delivery, routes=routes, **sections)


async def send_dsn_mail(port: int, count: int, domain: str = "dest.test") -> list[str]:
    """`count` messages, each to two recipients, with every DSN parameter."""
    client = await SmtpClient.connect(port)
    ids = []
    try:
        for n in range(count):
            for line in (f"MAIL FROM:<s{n}@client.test> RET=HDRS ENVID=env{n}+2Bx BODY=8BITMIME",
                         f"RCPT TO:<a{n}@{domain}> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;list{n}@{domain}",
                         f"RCPT TO:<b{n}@{domain}> NOTIFY=NEVER"):
                reply = await client.command(line)
                assert reply.code == 250, (line, reply)
            assert (await client.command("DATA")).code == 354
            client.writer.write(f"Subject: moved {n}\r\n\r\n.dot line {n}\r\n.\r\n".encode())
            reply = await client.read_reply()
            msgid = queued_id(reply)
            assert msgid is not None, reply
            ids.append(msgid)
    finally:
        await client.close()
    return ids


def test_a_queue_moves_to_another_server_and_is_delivered_once(mta_server, tmp_path: Path) -> None:
    out = tmp_path / "moved.bsmtp"
    with SmtpSink("127.0.0.2") as sink:
        source = relay_to(mta_server, None)
        ids = asyncio.run(send_dsn_mail(source.port, 10))
        bodies = {msgid: source.queue_body(msgid) for msgid in ids}
        moved = source.mta("queue", "export", "--bsmtp", str(out), "--all", "--delete")  # server running
        assert b"exported 10 message(s)" in moved.stdout and b"deleted 10" in moved.stdout, moved
        assert source.queue_list() == []

        target = relay_to(mta_server, sink)
        assert b"imported 10 message(s)" in target.mta("queue", "import", "--bsmtp", str(out)).stdout
        got = sink.wait_for_messages(10, timeout=30)
        wait_until(lambda: target.queue_list() == [], 15, "an empty queue", target)
        again = target.mta("queue", "import", "--bsmtp", str(out))
        assert b"imported 0 message(s)" in again.stdout and b"10 were there already" in again.stdout
        time.sleep(2.0)  # a message imported again would be out by now (due at once)
        assert len(sink.messages) == 10 and target.queue_list() == []
    by_sender = {m.sender: m for m in got}
    for n, msgid in enumerate(ids):
        m = by_sender[f"s{n}@client.test"]
        assert m.data == bodies[msgid]  # the stored message as the source had it, its Received header too
        assert m.data.startswith(b"Received: ") and msgid.encode() in m.data
        assert m.mail_params["RET"] == "HDRS" and m.mail_params["ENVID"] == f"env{n}+2Bx"
        assert m.recipients == [f"a{n}@dest.test", f"b{n}@dest.test"]
        assert m.rcpt_params == [{"NOTIFY": "SUCCESS,DELAY", "ORCPT": f"rfc822;list{n}@dest.test"},
                                 {"NOTIFY": "NEVER"}]


def test_export_delete_waits_for_a_delivery_under_way(mta_server, tmp_path: Path) -> None:
    """A message being delivered at the export is not in the file: the export held it and
    waited for the session; the target never sends it again. A message held by the
    operator goes over held."""
    out = tmp_path / "out.bsmtp"
    with SmtpSink("127.0.0.2", delay_seconds=3.0) as sink:
        source = relay_to(mta_server, sink)
        held = asyncio.run(send_dsn_mail(source.port, 1, "parked.test"))[0]
        source.mta("queue", "hold", held)
        flying = asyncio.run(send_dsn_mail(source.port, 1))[0]
        sink.wait_until(lambda: any(line == "DATA" for _conn, line in sink.commands), 10)
        moved = source.mta("queue", "export", "--bsmtp", str(out), "--all", "--delete")
        assert b"exported 1 message(s)" in moved.stdout and b"deleted 1" in moved.stdout, moved
        assert len(sink.messages) == 1  # the delivery under way finished, once
        with out.open("rb") as f:
            assert [m.record.id for m in bsmtp.read(f, 1 << 20) if isinstance(m, bsmtp.BatchMessage)
                    and m.record is not None] == [held], flying
        assert source.queue_list() == []
        target = relay_to(mta_server, None, start=True)
        assert b"imported 1 message(s)" in target.mta("queue", "import", "--bsmtp", str(out)).stdout
        [envelope] = target.queue_list()
        assert envelope["id"] == held and [r["state"] for r in envelope["recipients"]] == ["held", "held"]
        assert len(sink.messages) == 1


def test_an_interrupted_export_leaves_the_queue_as_it_was(mta_server, tmp_path: Path) -> None:
    """Ctrl-C while the export waits for a delivery under way: no file, nothing deleted, what
    it held is released, and a message the operator had held stays held."""
    out = tmp_path / "out.bsmtp"
    with SmtpSink("127.0.0.2", delay_seconds=4.0) as sink:
        source = relay_to(mta_server, sink)
        kept = asyncio.run(send_dsn_mail(source.port, 1, "parked.test"))[0]
        source.mta("queue", "hold", kept)
        parked = asyncio.run(send_dsn_mail(source.port, 1, "parked.test"))[0]
        wait_until(lambda: b"msgid=" + parked.encode() in source.log_bytes() and
                   any(r["state"] == "deferred" for e in source.queue_list() if e["id"] == parked
                       for r in e["recipients"]), 10, "a deferred message", source)
        flying = asyncio.run(send_dsn_mail(source.port, 1))[0]
        sink.wait_until(lambda: any(line == "DATA" for _conn, line in sink.commands), 10)
        export = subprocess.Popen([sys.executable, "-m", "mta", "queue", "export", "--bsmtp", str(out), "--all",
                                   "--delete", "-c", str(source.config_path)], cwd=REPO_ROOT, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: re.search(rb"event=hold msgid=" + flying.encode() + rb".*by=operator",
                                         source.log_bytes()), 10, "the export's hold", source)
            export.send_signal(signal.SIGINT)
            _out, err = export.communicate(timeout=30)
        finally:
            if export.poll() is None:
                export.kill()
                export.wait()
        assert export.returncode == 130, err
        assert b"released the 2 message(s)" in err and kept.encode() in err and b"stay held" in err, err
        assert not out.exists() and not Path(str(out) + ".tmp").exists()
        sink.wait_for_messages(1, timeout=10)
        wait_until(lambda: {e["id"] for e in source.queue_list()} == {kept, parked}, 10, "the delivery", source)
        states = {e["id"]: {r["state"] for r in e["recipients"]} for e in source.queue_list()}
        assert states[kept] == {"held"} and "held" not in states[parked], states


def every_field(now: float) -> list[NewMessage]:
    def new(n: int, body: bytes, **fields: Any) -> NewMessage:
        base: dict[str, Any] = dict(id=MessageId(f"{int((now - 600 + n) * 1e6):013X}{n:08X}"), sender="s@client.test",
                                    recipients=[Recipient("a@x.test")], size=len(body), arrival=now - 600 + n,
                                    next_attempt=now + 3600 + n)
        return NewMessage(Envelope(**(base | fields)), body)
    return [
        new(1, b"Subject: a\r\n\r\n.dot\r\n", priority=7, attempts=3, ret="FULL", envid="e+1 x", body_type="8BITMIME",
            client={"ip": "192.0.2.9", "port": 25, "helo": "c.test", "listener": "0.0.0.0:25", "protocol": "ESMTPS"},
            recipients=[Recipient("a@x.test", ("SUCCESS", "FAILURE", "DELAY"), "rfc822;a+b@x.test", "deferred", 3,
                                  "451 4.7.1 greylisted"),
                        Recipient("b@y.test", ("NEVER",), None, "held"),
                        Recipient("c@y.test", None, None, "delivered", 1, "250 2.0.0 ok"),
                        Recipient("d@z.test", ("FAILURE",), "rfc822;d@z.test", "bounced", 1, "550 5.1.1 unknown")]),
        new(2, "Subject: ü\r\n\r\nü\r\n".encode(), sender="jöran@bücher.test", smtputf8=True, ret="HDRS",
            recipients=[Recipient("ñandú@exämple.test", ("SUCCESS",), None, "ready")]),
        new(3, b"bare LF\nno CRLF at the end", sender=""),
    ]


def test_every_envelope_field_round_trips_between_spools(mta_server, tmp_path: Path) -> None:
    source, target = relay_to(mta_server, None, start=False), relay_to(mta_server, None, start=False)
    sent = every_field(time.time())
    backend = LmdbBackend(str(source.spool), 64 << 20)
    backend.commit(sent)
    backend.close()
    LmdbBackend(str(target.spool), 64 << 20).close()
    out = tmp_path / "all.bsmtp"
    assert b"exported 3" in source.mta("queue", "export", "--bsmtp", str(out), "--all").stdout
    assert b"imported 3" in target.mta("queue", "import", "--bsmtp", str(out)).stdout
    snap = spool_snapshot(target.spool)
    assert snap.envelopes == {m.envelope.id: m.envelope for m in sent}
    assert snap.bodies == {m.envelope.id: m.body for m in sent}
    assert snap.problems() == []
    # by id and by domain; with --delete and the server stopped, the spool itself
    one = tmp_path / "one.bsmtp"
    assert b"exported 1" in source.mta("queue", "export", "--bsmtp", str(one), sent[1].envelope.id).stdout
    refused = source.mta("queue", "export", "--bsmtp", str(one), "--all", check=False)
    assert refused.returncode == 1 and b"exists: pass --force" in refused.stderr
    moved = source.mta("queue", "export", "--bsmtp", str(one), "--domain", "Y.test.", "--delete", "--force")
    assert b"exported 1" in moved.stdout and b"deleted 1" in moved.stdout
    assert set(spool_snapshot(source.spool).envelopes) == {sent[1].envelope.id, sent[2].envelope.id}


def test_a_message_that_cannot_be_written_stays_in_the_spool(mta_server, tmp_path: Path) -> None:
    source = relay_to(mta_server, None, start=False)
    good, bad = every_field(time.time())[1:3]
    bad.envelope.recipients = [Recipient("ctl\x01@x.test")]  # no RCPT can carry it (never from SMTP)
    backend = LmdbBackend(str(source.spool), 64 << 20)
    backend.commit([good, bad])
    backend.close()
    out = tmp_path / "out.bsmtp"
    done = source.mta("queue", "export", "--bsmtp", str(out), "--all", "--delete", check=False)
    assert done.returncode == 1 and b"exported 1 message(s)" in done.stdout and b"deleted 1" in done.stdout
    assert f"not exported: {bad.envelope.id}: control character".encode() in done.stderr, done.stderr
    assert set(spool_snapshot(source.spool).envelopes) == {bad.envelope.id}


def test_a_plain_smtp_server_takes_the_exported_file(mta_server, tmp_path: Path) -> None:
    """The NOOP lines carrying our envelope are plain SMTP: fed to an SMTP server command by
    command, every one gets 2xx/3xx and the message is queued with its DSN parameters."""
    source = relay_to(mta_server, None)
    [msgid] = asyncio.run(send_dsn_mail(source.port, 1))
    out = tmp_path / "one.bsmtp"
    source.mta("queue", "export", "--bsmtp", str(out), "--all")
    reader = relay_to(mta_server, None)
    codes = asyncio.run(feed(reader.port, out.read_bytes()))
    assert codes[-1] == 221 and all(200 <= code < 400 for code in codes), codes
    [queued] = reader.queue_list()
    assert queued["id"] != msgid and queued["sender"] == "s0@client.test"
    assert [(r["address"], r["notify"], r["orcpt"]) for r in queued["recipients"]] == [
        ("a0@dest.test", ["SUCCESS", "DELAY"], "rfc822;list0@dest.test"), ("b0@dest.test", ["NEVER"], None)]
    assert (queued["ret"], queued["envid"]) == ("HDRS", "env0+x")


async def feed(port: int, data: bytes) -> list[int]:
    """A batch SMTP processor in front of an SMTP server: each command sent and answered in
    turn, DATA's content sent after the 354. The reply codes."""
    client = await SmtpClient.connect(port, helo=None)
    lines = iter(data.split(b"\r\n")[:-1])
    codes = []
    for line in lines:
        client.writer.write(line + b"\r\n")
        if line == b"DATA" and (await client.read_reply()).code == 354:
            while (content := next(lines)) != b".":
                client.writer.write(content + b"\r\n")
            client.writer.write(b".\r\n")
        codes.append((await client.read_reply()).code)
    client.writer.close()
    return codes


def test_a_hand_written_bsmtp_file_imports_and_is_delivered(mta_server, tmp_path: Path) -> None:
    plain = tmp_path / "hand.bsmtp"
    plain.write_bytes(b"HELO old.example\n"
                      b"MAIL FROM:<ops@old.example> RET=FULL ENVID=hand+2B1\n"
                      b"RCPT TO:<x@dest.test> NOTIFY=SUCCESS\n"
                      b"DATA\nSubject: by hand\n\n..one dot\n.\n"
                      b"MAIL FROM:<>\nRCPT TO:<y@dest.test>\nDATA\nSubject: second\n\nbody\n.\n"
                      b"MAIL FROM:<ops@old.example>\nRCPT TO:<bad address>\nDATA\nSubject: refused\n\n.\n"
                      b"QUIT\n")
    with SmtpSink("127.0.0.2") as sink:
        target = relay_to(mta_server, sink)
        done = target.mta("queue", "import", "--bsmtp", str(plain), check=False)
        assert done.returncode == 1 and b"imported 2 message(s)" in done.stdout and b"1 not imported" in done.stdout
        assert b"line 17: 'RCPT TO:<bad address>': 501" in done.stderr, done.stderr
        got = sorted(sink.wait_for_messages(2, timeout=30), key=lambda m: m.sender)
    assert [(m.sender, m.recipients, m.data) for m in got] == [
        ("", ["y@dest.test"], b"Subject: second\r\n\r\nbody\r\n"),
        ("ops@old.example", ["x@dest.test"], b"Subject: by hand\r\n\r\n.one dot\r\n")]
    assert got[1].mail_params["RET"] == "FULL" and got[1].mail_params["ENVID"] == "hand+2B1"
    assert got[1].rcpt_params == [{"NOTIFY": "SUCCESS"}]
