"""`mta queue hold/release/retry/delete` gives the same queue whether a scheduler applies it or,
with no server running, the CLI edits the spool itself: both use mta/queueops.py's rules.

Two LMDB spools start with the same messages. The CLI (a real process) runs the same
operations against each: on one nothing listens, so it edits the spool; on the other a
real Scheduler (in this process, on its real socket and spool, no delivery workers)
answers. After every operation both spools hold the same recipient states, the same
messages are due now, and the CLI counted the same messages.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
import uvloop

from mta import config as configmod
from mta.spool import open_spool
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from tests.integration.conftest import REPO_ROOT, _env, free_port, server_config, toml_dumps
from workers.scheduler.main import Scheduler

pytestmark = pytest.mark.integration

BODY = b"Subject: t\r\n\r\nbody\r\n"
OPERATIONS = [
    ("hold", "1"),  # ready and deferred -> held
    ("retry", "--domain", "y.test"),  # only deferred recipients; the held one of message 1 stays
    ("release", "--all"),  # held -> ready, due now
    ("hold", "--domain", "Z.test"),  # the domain of a recipient at "Z.TEST.", in any case
    ("retry", "3"),  # held, not deferred: counted, nothing changes
    ("delete", "2", "2", "not-an-id"),  # an id twice, and one that is not an id
    ("hold", "9"),  # no such message: none
]


def msgid(n: int) -> MessageId:
    return MessageId(f"{n:021X}")


def messages(now: float) -> list[NewMessage]:
    later = now + 3600  # deferred ones wait: the scheduler's timers do not fire in the test
    rcpts = {
        1: [Recipient("a@x.test"), Recipient("b@y.test", state="deferred")],
        2: [Recipient("c@x.test", state="held")],
        3: [Recipient("d@Z.TEST.", state="deferred")],
        4: [Recipient("e@y.test", state="delivered"), Recipient("f@y.test", state="deferred")],
    }
    return [NewMessage(Envelope(msgid(n), "s@client.test", r, len(BODY), now - 60, later), BODY)
            for n, r in rcpts.items()]


def make(tmp: Path, name: str, now: float) -> Path:
    spool = tmp / name
    path = tmp / f"{name}.toml"
    path.write_text(toml_dumps(server_config(free_port(), spool)))
    backend = open_spool(configmod.load(str(path)).queue)
    backend.commit(messages(now))
    backend.close()
    return path


def view(backend, since: float) -> dict[str, tuple[list[tuple[str, str]], bool]]:  # type: ignore[no-untyped-def]
    """Per message: its recipients' (address, state), and whether it was made due now."""
    return {e.id: ([(r.address, r.state) for r in e.recipients], e.next_attempt >= since)
            for e in backend.envelopes()}


async def cli(config: Path, *args: str) -> tuple[int, str]:
    op, *which = args
    which = [str(msgid(int(w))) if w.isdigit() else w for w in which]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mta", "queue", op, *which, "-c", str(config), cwd=REPO_ROOT, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_the_cli_offline_and_a_running_scheduler_apply_the_same_rules(tmp_path: Path) -> None:
    now = time.time()
    offline, online = make(tmp_path, "offline", now), make(tmp_path, "online", now)

    async def main() -> None:
        scheduler = Scheduler(configmod.load(str(online)))
        await scheduler.start(None)  # type: ignore[arg-type]  # no process around it
        try:
            for args in OPERATIONS:
                since = time.time()
                code_off, out_off = await cli(offline, *args)
                code_on, out_on = await cli(online, *args)
                assert "server not running: applied to the spool" in out_off, out_off
                assert "applied by the running scheduler" in out_on, out_on
                assert (code_off, out_off.split("(")[0]) == (code_on, out_on.split("(")[0]), args
                backend = open_spool(configmod.load(str(offline)).queue)
                try:
                    edited = view(backend, since)
                finally:
                    backend.close()
                assert edited == view(scheduler.backend, since), args
        finally:
            await scheduler.close()

    uvloop.run(main())
    backend = open_spool(configmod.load(str(offline)).queue)
    final = view(backend, 0.0)
    backend.close()
    assert set(final) == {msgid(1), msgid(3), msgid(4)}  # 2 deleted
    assert final[msgid(1)][0] == [("a@x.test", "ready"), ("b@y.test", "ready")]
    assert final[msgid(3)][0] == [("d@Z.TEST.", "held")]
    assert final[msgid(4)][0] == [("e@y.test", "delivered"), ("f@y.test", "ready")]
