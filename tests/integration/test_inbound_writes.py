"""How replies leave the inbound worker, seen from the kernel: one write per group, at once
for a client that waits, and the close after QUIT.

The server runs under `strace -f`; three clients, one after another:
- a pipelined group that waits for the commit (MAIL, RCPT, BDAT LAST with its data, in
  one packet): its three replies, in order, in one write, after the commit;
- a client that does not pipeline (each command alone, waiting for its reply): each reply
  comes without the client sending more;
- QUIT, alone and followed by more input: the client reads 221 and the end of the
  connection, never a reset; after a QUIT alone the socket is closed at once (no
  half-close and wait for the client's EOF), after QUIT and more it lingers as before.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id
from tests.integration.test_fsync import Syscall, parse_strace

pytestmark = pytest.mark.integration

REPLY_SECONDS = 5.0  # a reply the client waits for comes long before this
CONTENT = b"Subject: chunked\r\n\r\none chunk\r\n"


def _socket_calls(calls: list[Syscall], marker: str) -> list[Syscall]:
    """The calls on the socket of the session whose replies include `marker` (by the socket's
    inode, strace -y: descriptor numbers are reused by later sessions)."""
    marked = next(c for c in calls if c.name in ("write", "writev") and marker in c.text)
    return [c for c in calls if c.path == marked.path]


async def _reply_within(client: SmtpClient, line: str) -> str:
    client.writer.write(line.encode() + b"\r\n")
    return str(await asyncio.wait_for(client.read_reply(), REPLY_SECONDS))


async def _sessions(port: int) -> dict[str, str]:
    found: dict[str, str] = {}
    pipelined = await SmtpClient.connect(port)
    pipelined.writer.write(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@local.test>\r\n"
                           + f"BDAT {len(CONTENT)} LAST\r\n".encode() + CONTENT)
    got = [await asyncio.wait_for(pipelined.read_reply(), REPLY_SECONDS) for _ in range(3)]
    assert [r.code for r in got] == [250, 250, 250], got
    assert got[0].text.startswith("2.1.0") and got[1].text.startswith("2.1.5"), got
    found["bdat"] = queued_id(got[2]) or ""
    assert found["bdat"], got
    assert (await _reply_within(pipelined, "QUIT")).startswith("221 ")
    assert await asyncio.wait_for(pipelined.reader.read(), REPLY_SECONDS) == b""  # closed, no reset
    pipelined.writer.close()

    waiting = await SmtpClient.connect(port)
    assert (await _reply_within(waiting, "MAIL FROM:<c@client.test>")).startswith("250 2.1.0")
    assert (await _reply_within(waiting, "RCPT TO:<d@local.test>")).startswith("250 2.1.5")
    assert (await _reply_within(waiting, "DATA")).startswith("354 ")
    last = await _reply_within(waiting, "Subject: one by one\r\n\r\nbody\r\n.")
    assert last.startswith("250 2.0.0 Ok: queued as "), last
    found["waiting"] = last.rsplit(" ", 1)[-1]
    waiting.writer.write(b"QUIT\r\nNOOP\r\n")  # more after QUIT: the server lingers, never resets
    assert str(await asyncio.wait_for(waiting.read_reply(), REPLY_SECONDS)).startswith("221 ")
    assert await asyncio.wait_for(waiting.reader.read(), REPLY_SECONDS) == b""
    waiting.writer.close()
    return found


def test_replies_leave_once_per_group_at_once_when_awaited_and_quit_closes_at_once(
        mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not on PATH (`make test-deps` installs it)")
    trace_path = tmp_path / "strace.txt"
    server = mta_server(wrapper=[strace, "-f", "-tt", "-y", "-s", "4096", "-e",
                                 "trace=write,writev,read,shutdown,close", "-o", str(trace_path)])
    ids = asyncio.run(_sessions(server.port))
    assert server.stop() == 0, server.log_tail()
    calls = parse_strace(trace_path.read_text(errors="replace"))

    bdat = _socket_calls(calls, f"queued as {ids['bdat']}")
    replies = [c for c in bdat if c.name in ("write", "writev")]
    group = next(c for c in replies if ids["bdat"] in c.text)
    assert group.text.index("250 2.1.0") < group.text.index("250 2.1.5") < group.text.index("250 2.0.0"), \
        f"the group's replies did not leave in one write: {[c.text[:90] for c in replies]}"
    assert len(replies) == 4, [c.text[:90] for c in replies]  # 220, EHLO, the group, 221
    assert not [c for c in bdat if c.name == "shutdown"], "a QUIT alone: closed at once, no half-close"
    assert [c for c in bdat if c.name == "close"], "the session's socket was never closed"

    waiting = _socket_calls(calls, f"queued as {ids['waiting']}")
    assert len([c for c in waiting if c.name in ("write", "writev")]) == 7  # 220, EHLO, MAIL, RCPT, DATA, 250, 221
    assert [c for c in waiting if c.name == "shutdown"], "QUIT and more: the linger (half-close) is gone"
