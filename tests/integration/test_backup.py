"""`mta queue backup` while a real server takes mail over SMTP, then `mta queue restore` on a
fresh spool: every message acknowledged before the backup began is in the restored spool
exactly once, none acknowledged after it ended is, the spool's indexes and counts are
exact, and a server starts on it. And what backup and restore refuse, leaving the spool
as it was."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

import lmdb
import pytest

from tests.integration.conftest import REPO_ROOT, SmtpClient, _env, queued_id, spool_snapshot
from tests.mta.queuefill import message, spool

pytestmark = pytest.mark.integration

PREFILL = 20000  # held messages already queued: the copy takes a while, mail arrives meanwhile
TOKEN = re.compile(rb"X-Token: (\w+)")


async def send_until(port: int, stop: asyncio.Event, acked: list[tuple[float, str, str]], client_no: int) -> None:
    client = await SmtpClient.connect(port)
    try:
        n = 0
        while not stop.is_set():
            token = f"c{client_no}n{n}"
            reply = await client.send_mail("a@client.test", [f"u{n}@local.test"],
                                           f"X-Token: {token}\r\nSubject: load\r\n\r\nbody {n}\r\n".encode())
            msgid = queued_id(reply)
            assert msgid is not None, reply
            acked.append((time.monotonic(), msgid, token))
            n += 1
    finally:
        await client.close()


async def backup_under_load(port: int, config: Path, out: Path) -> tuple[float, float, list[tuple[float, str, str]], bytes]:
    acked: list[tuple[float, str, str]] = []
    stop = asyncio.Event()
    senders = [asyncio.create_task(send_until(port, stop, acked, i)) for i in range(3)]
    while len(acked) < 30:  # mail is flowing
        await asyncio.sleep(0.05)
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mta", "queue", "backup", str(out), "-c", str(config), cwd=REPO_ROOT, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    ended = time.monotonic()
    assert proc.returncode == 0, output
    acked_at_end = len(acked)
    while len(acked) < acked_at_end + 30:  # and goes on after it
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*senders)
    return began, ended, acked, output


def test_backup_under_load_then_restore_on_a_fresh_spool(mta_server, tmp_path: Path) -> None:
    server = mta_server(start=False)
    now = time.time()
    spool(server.spool, (message(now - 3600 + i / 1000, i, [("h@held.test", "held")]) for i in range(PREFILL))).close()
    server.start()
    out = tmp_path / "queue.backup"
    began, ended, acked, output = asyncio.run(backup_under_load(server.port, server.config_path, out))
    assert re.search(rb"backup: .*queue\.backup: \d+ message\(s\)", output), output
    assert not (tmp_path / "queue.backup.tmp").exists()
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    before = {msgid: token for at, msgid, token in acked if at < began}
    after = {msgid for at, msgid, _token in acked if at > ended}
    assert before and after
    server.mta("queue", "hold", "--all")  # (the source keeps running; nothing to do with the copy)

    fresh = mta_server(start=False)
    done = fresh.mta("queue", "restore", str(out))
    assert b"restored" in done.stdout, done
    snap = spool_snapshot(fresh.spool)
    assert snap.problems() == []  # indexes, counts and byte totals exact
    restored = set(snap.envelopes)
    assert set(before) <= restored  # every message acknowledged before the backup
    assert not after & restored  # none acknowledged after it
    tokens = [m.group(1).decode() for body in snap.bodies.values() if (m := TOKEN.search(body))]
    assert sorted(tokens) == sorted(set(tokens))  # each once
    assert set(before.values()) <= set(tokens)
    assert len(restored) - len(tokens) == PREFILL

    fresh.start()  # mta serve takes the restored spool: its start check passes, the list shows every message
    assert fresh.mta("queue", "check").returncode == 0
    shape = fresh.mta("queue", "shape", "--json").stdout
    assert str(len(restored)).encode() in shape


def test_backup_and_restore_refusals(mta_server, tmp_path: Path) -> None:
    server = mta_server()
    ids = asyncio.run(send_two(server.port))
    out = tmp_path / "q.backup"
    assert b"2 message(s)" in server.mta("queue", "backup", str(out)).stdout
    again = server.mta("queue", "backup", str(out), check=False)
    assert again.returncode == 1 and b"exists: pass --force" in again.stderr
    assert server.mta("queue", "backup", str(out), "--force").returncode == 0

    running = server.mta("queue", "restore", str(out), check=False)
    assert running.returncode == 1 and b"needs the server stopped" in running.stderr
    server.stop()
    full = server.mta("queue", "restore", str(out), check=False)
    assert full.returncode == 1 and b"holds 2 message(s)" in full.stderr and b"--force" in full.stderr

    server.mta("queue", "delete", ids[0])  # the spool now differs from the backup
    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(out.read_bytes()[: os.path.getsize(out) // 2])
    refused = server.mta("queue", "restore", str(damaged), "--force", check=False)
    assert refused.returncode == 1 and b"damaged" in refused.stderr, refused
    text = tmp_path / "text.backup"
    text.write_bytes(b"not a spool\n" * 2000)
    assert server.mta("queue", "restore", str(text), "--force", check=False).returncode == 1
    missing = server.mta("queue", "restore", str(tmp_path / "nothing"), "--force", check=False)
    assert missing.returncode == 1 and b"no backup file" in missing.stderr

    holder = lmdb.open(str(server.spool), readonly=True, max_dbs=8)  # a process with the spool open
    try:
        busy = server.mta("queue", "restore", str(out), "--force", check=False)
        assert busy.returncode == 1 and b"still has the spool" in busy.stderr, busy
    finally:
        holder.close()
    assert set(spool_snapshot(server.spool).envelopes) == {ids[1]}  # every refusal left it as it was
    assert not (server.spool / "restore.tmp").exists()

    assert server.mta("queue", "restore", str(out), "--force").returncode == 0
    assert set(spool_snapshot(server.spool).envelopes) == set(ids)
    server.start()
    assert {e["id"] for e in server.queue_list()} == set(ids)


async def send_two(port: int) -> list[str]:
    client = await SmtpClient.connect(port)
    try:
        ids = []
        for n in range(2):
            reply = await client.send_mail("a@client.test", [f"u{n}@local.test"], f"Subject: {n}\r\n\r\nbody\r\n".encode())
            msgid = queued_id(reply)
            assert msgid is not None, reply
            ids.append(msgid)
        return ids
    finally:
        await client.close()
