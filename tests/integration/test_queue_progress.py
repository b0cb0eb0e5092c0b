"""A bulk operation on a running server reports its progress to the operator: the
scheduler's CommandProgress frames, printed by `mta queue` on stderr, whether the CLI
reaches the scheduler's socket itself or through the control process's admin API
(which relays them as NDJSON lines).

The scheduler that sends them in batches is workers/scheduler's; here a stand-in on the
real socket path speaks the real frames (mta/frames.py, mta/messages.py) with chosen
pauses, since the real one reports progress only on runs long enough to need it. The
control process is the real one (in this process, on its real port and spool), the CLI
a real subprocess.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
from pathlib import Path

import pytest
import uvloop

from mta import config as configmod
from mta import frames, messages
from mta.config import Config, split_hostport
from tests.integration.conftest import REPO_ROOT, _env, free_port, server_config, toml_dumps
from workers.control.main import Control

pytestmark = pytest.mark.integration

TOKEN = "progress-token-0123456789abcdef"
PROGRESS = [(0.3, messages.CommandProgress(1000, 2500)), (0.3, messages.CommandProgress(2000, 2500))]
DONE = [*PROGRESS, (0.3, messages.CommandResult(2500))]


class StandIn:
    """A scheduler's socket that answers every command with `script`: (pause, message) pairs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.script: list[tuple[float, messages.Message]] = DONE
        self.commands: list[messages.Message] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on_peer, self.path)

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _on_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await frames.read_hello(reader)
        writer.write(frames.encode_stream_frame(messages.hello("scheduler")))
        question = await frames.read_stream_frame(reader)
        assert question is not None
        self.commands.append(question)
        if isinstance(question, messages.ActiveQuery):
            writer.write(frames.encode_stream_frame(messages.ActiveJobs({})))
        else:
            for pause, answer in self.script:
                await asyncio.sleep(pause)
                writer.write(frames.encode_stream_frame(answer))
                await writer.drain()
        writer.close()


def configure(tmp_path: Path) -> tuple[Path, Config]:
    path = tmp_path / "mta.toml"
    path.write_text(toml_dumps(server_config(free_port(), tmp_path / "spool", control={"token": TOKEN})))
    (tmp_path / "spool").mkdir(mode=0o700)
    return path, configmod.load(str(path))


async def cli(config: Path, *args: str) -> tuple[int, str, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mta", "queue", *args, "-c", str(config), cwd=REPO_ROOT, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode().splitlines()


def test_the_cli_prints_the_schedulers_progress_from_its_socket(tmp_path: Path) -> None:
    config, cfg = configure(tmp_path)  # nothing listens on [control] listen: the CLI asks the socket

    async def main() -> None:
        scheduler = StandIn(cfg.queue.scheduler_socket)
        await scheduler.start()
        try:
            await one_then_another(scheduler)
        finally:
            await scheduler.close()

    async def one_then_another(scheduler: StandIn) -> None:
        assert await cli(config, "hold", "--domain", "Example.NET.") == (
            0, "hold: 2500 message(s) (applied by the running scheduler)\n", ["held 1000/2500", "held 2000/2500"])
        assert scheduler.commands == [messages.QueueCommand("hold", (), "example.net", False)]
        scheduler.script = PROGRESS  # then it breaks off
        code, out, err = await cli(config, "delete", "--all")
        assert (code, out, err[:2]) == (1, "", ["deleted 1000/2500", "deleted 2000/2500"])
        assert err[2].startswith(f"mta queue: the scheduler at {cfg.queue.scheduler_socket}: ")

    uvloop.run(main())


def test_the_admin_api_relays_the_schedulers_progress(tmp_path: Path) -> None:
    config, cfg = configure(tmp_path)

    def post(op: str, accept: str | None = None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(*split_hostport(cfg.control.listen), timeout=30)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request("POST", f"/api/queue/{op}", b'{"all": true}', headers | ({"Accept": accept} if accept else {}))
        response = conn.getresponse()
        try:
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            conn.close()

    async def main() -> None:
        control = Control(cfg)
        assert await control.start(None) is None  # type: ignore[arg-type]  # no process around it
        scheduler = StandIn(cfg.queue.scheduler_socket)
        await scheduler.start()
        try:
            assert await cli(config, "retry", "--all") == (
                0, "retry: 2500 message(s) (applied by the running scheduler)\n", ["retried 1000/2500", "retried 2000/2500"])
            assert await asyncio.to_thread(post, "hold") == (200, "application/json", b'{\n "op": "hold",\n "count": 2500\n}\n')
            status, kind, lines = await asyncio.to_thread(post, "hold", "application/x-ndjson")
            assert (status, kind) == (200, "application/x-ndjson")
            assert [json.loads(line) for line in lines.splitlines()] == [
                {"done": 1000, "total": 2500}, {"done": 2000, "total": 2500}, {"op": "hold", "count": 2500}]
            scheduler.script = PROGRESS  # then it breaks off
            status, _, body = await asyncio.to_thread(post, "release")
            assert status == 503 and "stopped answering before the end" in json.loads(body)["error"]
            code, out, err = await cli(config, "release", "--all")
            assert (code, out, err[:2]) == (1, "", ["released 1000/2500", "released 2000/2500"])
            assert "the scheduler stopped answering before the end" in err[2]
        finally:
            await control.close()
            await scheduler.close()

    uvloop.run(main())
