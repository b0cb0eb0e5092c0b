"""Local delivery of one job with Sieve (workers/delivery/localjob.py) over a real LMDB spool
and real Maildirs: what is committed and announced, what is stored, and in which order."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from mta import config as mta_config
from mta.smtp.transaction import Outbound, OutboundRecipient
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.committer import GroupCommitter
from workers.delivery.localbox import LocalDelivery
from workers.delivery.localjob import LocalJobs
from workers.delivery.vacationlog import VacationLog

MIB = 1024 * 1024
BODY = b"From: alice@client.test\r\nTo: bob@local.test\r\nSubject: hi\r\nMessage-ID: <m1@client.test>\r\n\r\nbody\r\n"


def deliver(tmp_path: Path, message: Outbound, max_size_bytes: int = 4 * MIB
            ) -> tuple[list[tuple[int, int, str, str]], list[list[str]], LmdbBackend]:
    config = mta_config.parse({"local": {"maildir_root": str(tmp_path / "mail")},
                               "relay": {"local_domains": ["local.test"]}, "server": {"hostname": "mx.test"}})
    spool = LmdbBackend(str(tmp_path / "spool"), max_size_bytes)
    announced: list[list[str]] = []

    async def run() -> list[tuple[int, int, str, str]]:
        committer = GroupCommitter(spool, asyncio.get_running_loop())
        try:
            delivery = LocalDelivery(config)
            local = LocalJobs(lambda: config, lambda: delivery, committer, announced.append)
            return await local.deliver(message, list(range(len(message.recipients))))
        finally:
            committer.close()

    return asyncio.run(run()), announced, spool


def box(tmp_path: Path, user: str, script: str | None = None) -> Path:
    path = tmp_path / "mail" / "local.test" / user
    path.mkdir(parents=True)
    if script is not None:
        (path / ".dovecot.sieve").write_text(script)
    return path


def stored(path: Path) -> list[Path]:
    return sorted((path / "new").iterdir()) if (path / "new").is_dir() else []


def test_redirect_and_vacation_are_committed_and_announced_with_the_original_sender(tmp_path: Path) -> None:
    bob = box(tmp_path, "bob", 'require "vacation"; redirect "carol@remote.test"; vacation "away"; keep;')
    message = Outbound("M1", "alice@client.test", [OutboundRecipient("bob@local.test", ("SUCCESS",))], BODY)
    replies, announced, spool = deliver(tmp_path, message)
    try:
        assert replies[0][:3] == (0, 250, "2.0.0")
        [ids] = announced
        redirect, reply = (spool.message(i) for i in ids)
        assert redirect[0] is not None and reply[0] is not None
        assert redirect[0].sender == "alice@client.test"
        assert [(r.address, r.notify, r.orcpt) for r in redirect[0].recipients] == [
            ("carol@remote.test", ("SUCCESS",), "rfc822;bob@local.test")]
        assert redirect[1] == b"Delivered-To: bob@local.test\r\n" + BODY
        assert reply[0].sender == "" and [r.address for r in reply[0].recipients] == ["alice@client.test"]
        assert b"Auto-Submitted: auto-replied" in (reply[1] or b"")
        assert len(stored(bob)) == 1
    finally:
        spool.close()


def test_a_full_queue_defers_the_recipient_and_stores_nothing_for_it(tmp_path: Path) -> None:
    bob = box(tmp_path, "bob", 'redirect "carol@remote.test"; keep;')
    carol = box(tmp_path, "carol")  # no script: stored whatever the queue says
    body = BODY + b"x" * (2 * MIB)
    message = Outbound("M1", "alice@client.test",
                       [OutboundRecipient("bob@local.test"), OutboundRecipient("carol@local.test")], body)
    replies, announced, spool = deliver(tmp_path, message, max_size_bytes=1 * MIB)
    spool.close()
    assert replies[0][:3] == (0, 452, "4.3.1") and "queue full" in replies[0][3]
    assert replies[1][:3] == (1, 250, "2.0.0")
    assert stored(bob) == [] and len(stored(carol)) == 1
    assert announced == []
    assert not (bob / ".mta-vacation").exists()


def test_a_job_cancelled_while_its_vacation_record_is_written_closes_the_record_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain's deadline cancels the job while the executor writes the vacation record:
    the record's descriptor (and lock) is closed only once that write is done."""
    bob = box(tmp_path, "bob", 'require "vacation"; vacation "away"; keep;')
    config = mta_config.parse({"local": {"maildir_root": str(tmp_path / "mail")},
                               "relay": {"local_domains": ["local.test"]}, "server": {"hostname": "mx.test"}})
    spool = LmdbBackend(str(tmp_path / "spool"), 4 * MIB)
    writing, closed_during_write = threading.Event(), []
    record = VacationLog.record

    def slow_record(self: VacationLog, *args: object) -> None:
        writing.set()
        time.sleep(0.5)  # the cancellation arrives meanwhile
        try:
            os.fstat(self._fd)
        except OSError:
            closed_during_write.append(True)
        record(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(VacationLog, "record", slow_record)
    message = Outbound("M1", "alice@client.test", [OutboundRecipient("bob@local.test")], BODY)

    async def run() -> bool:
        loop = asyncio.get_running_loop()
        committer = GroupCommitter(spool, loop)
        try:
            delivery = LocalDelivery(config)
            local = LocalJobs(lambda: config, lambda: delivery, committer, lambda ids: None)
            job = loop.create_task(local.deliver(message, [0]))
            await loop.run_in_executor(None, writing.wait, 10)
            job.cancel()
            await asyncio.wait({job})
            return job.cancelled()
        finally:
            committer.close()

    try:
        assert asyncio.run(run())
        assert closed_during_write == []  # written through a descriptor still open (and locked)
        assert len((bob / ".mta-vacation").read_text().splitlines()) == 1  # and the reply was recorded
    finally:
        spool.close()
