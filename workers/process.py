"""One worker process's life, the same for every kind: the bootstrap a forked child runs.

`run_worker(body, config, channel, name)` is what a kind's `run()` calls after the fork. It
names the process's log lines, enables faulthandler (the master's SIGABRT to a silent
worker prints every thread's stack to the log), runs a uvloop event loop, installs the
signals, keeps the master link (workers/link.py: heartbeats; the master gone = shut
down) and drains. A kind provides a WorkerBody; it never has its own copy of this loop.

  SIGTERM, SIGINT  shut down (`process.shutdown`): body.drain(deadline), where deadline =
                   now + [server] drain_timeout_seconds, then body.close()
  SIGUSR1          body.retire(): True = stop as a retirement (the same drain, but
                   `shutdown` stays False until a SIGTERM comes); False = the body took
                   note and runs on (control: /readyz answers 503)
  SIGHUP           kinds that reload in place (`reloads`: the generationless ones) read
                   the config file again; an invalid one is logged (reload_failed) and
                   the running one kept; a valid one goes to body.reload(). Other kinds
                   are replaced by generation (SIGHUP the master): logged, ignored.
  MTA_TEST_HOOKS=1 SIGUSR2 blocks the event loop (heartbeat supervision tests); a file
                   `crash-<kind>` in the spool (`crash-workers` for inbound) makes the
                   process exit 3 at start (spawn back-off tests).

Order: signals first (a SIGTERM while the body starts stops it once started; SIGUSR1
and SIGHUP then wait for the start), body.start(), then the link (the master sees
"ready" from the first heartbeat). On stop: the link stops reading (no new
connection), the heartbeats go on with state "retiring" while the body drains, then
body.close() and `stopped` is logged. Exit code 0, or what body.start() returned.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar

from mta import config as configmod
from mta import logs, messages
from mta.config import Config
from mta.messages import Message
from workers.link import MasterLink

CRASH_AT_START_EXIT = 3
_CRASH_FILES = {"inbound": "crash-workers"}  # the others: crash-<kind>


def test_hooks_on() -> bool:
    return os.environ.get("MTA_TEST_HOOKS") == "1"


class WorkerBody:
    """What one kind of worker gives the bootstrap. Subclasses override what they have;
    the defaults suit a kind with no master frames, no retirement and no drain."""

    kind: ClassVar[str]  # "inbound", "scheduler", "delivery", "control"
    reloads: ClassVar[bool] = True  # SIGHUP re-reads the config in place (else: by generation)
    report_drops: ClassVar[bool] = False  # the link reports a load drop within 0.1 s (inbound)

    async def start(self, process: WorkerProcess) -> int | None:
        """Open what the process needs (after the fork: LMDB, sockets) and begin serving.
        None: serving; a number: exit with it now (nothing opened is left behind)."""
        raise NotImplementedError

    def status(self) -> int:
        """The heartbeat's load besides the state: sessions (or connections) in progress."""
        return 0

    def on_frame(self, message: Message, fds: list[int]) -> None:
        """A message from the master; the body owns the descriptors that came with it.
        Raises messages.MessageError (before taking the descriptors) for a kind it does
        not take."""
        raise messages.unexpected(message, "from the master")

    def retire(self) -> bool:
        """SIGUSR1. True: stop as a retirement; False: noted, keep running."""
        return True

    def reload(self, config: Config) -> None:
        """SIGHUP with a valid config (only when `reloads`): new decisions use it. Raises
        ConfigError for one this kind cannot take (the running one is kept)."""

    async def drain(self, deadline: float) -> None:
        """Take nothing new; finish the work in progress, up to `deadline` (time.monotonic()).
        `process.shutdown` (it may turn True meanwhile): idle peers may be told to go now."""

    async def close(self) -> dict[str, Any]:
        """Release what start() opened; the fields of the `stopped` log line."""
        return {}


def run_worker(body: WorkerBody, config: Config, channel: socket.socket, name: str) -> int:
    """The whole life of a worker process; its exit code."""
    import uvloop  # imported in the child: the master never has an event loop

    logs.setup(name)
    crash_file = os.path.join(config.queue.path, _CRASH_FILES.get(body.kind, f"crash-{body.kind}"))
    if test_hooks_on() and os.path.exists(crash_file):
        logs.event("test_hook", hook=os.path.basename(crash_file))  # lets tests exercise the spawn back-off
        return CRASH_AT_START_EXIT
    faulthandler.enable()  # SIGABRT from the master prints where the loop was stuck
    return uvloop.run(WorkerProcess(body, config, channel).serve())


class WorkerProcess:
    """The running process as its body sees it: the config, the master link, stop()."""

    def __init__(self, body: WorkerBody, config: Config, channel: socket.socket) -> None:
        self.body = body
        self.config = config
        self.state = "ready"  # "retiring" from the stop on
        self.shutdown = False  # the stop is a shutdown (not a retirement)
        self._stop = asyncio.Event()
        self._started = False
        self._after_start: list[Callable[[], None]] = []
        self.link = MasterLink(channel, self._status, lambda: self.stop(shutdown=True), body.on_frame,
                               report_drops=body.report_drops)

    async def serve(self) -> int:
        self._install_signals()
        code = await self.body.start(self)
        if code is not None:
            return code
        self.link.start()
        self._started = True
        for action in self._after_start:
            action()
        await self._stop.wait()
        self.link.stop_reading()
        deadline = time.monotonic() + self.config.server.drain_timeout_seconds
        await self.body.drain(deadline)
        logs.event("stopped", **await self.body.close())
        return 0

    def stop(self, shutdown: bool) -> None:
        """Stop taking work and drain; the master hears "retiring" at once."""
        self.shutdown = self.shutdown or shutdown
        if self.state == "retiring":
            return
        self.state = "retiring"
        self._stop.set()
        if self._started:
            self.link.send_status()

    def _status(self) -> messages.Status:
        return messages.Status(self.state, self.body.status())

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop, True)
        loop.add_signal_handler(signal.SIGINT, self.stop, True)
        loop.add_signal_handler(signal.SIGUSR1, self._once_started, self._retire)
        loop.add_signal_handler(signal.SIGHUP, self._once_started, self._reload)
        if test_hooks_on():
            loop.add_signal_handler(signal.SIGUSR2, _block_loop_for_tests)

    def _once_started(self, action: Callable[[], None]) -> None:
        if self._started:
            action()
        else:
            self._after_start.append(action)

    def _retire(self) -> None:
        if self.body.retire():
            self.stop(shutdown=False)

    def _reload(self) -> None:
        if not self.body.reloads:
            logs.event("reload_ignored", reason="this kind is replaced by generation: SIGHUP the master")
            return
        try:  # (the master refused a reload that changes [queue] path: no SIGHUP came then)
            new = configmod.reload(self.config)
            self.body.reload(new)
        except configmod.ConfigError as exc:
            logs.event("reload_failed", error=str(exc), action="kept the running configuration")
            return
        self.config = new
        logs.event("reload", config=new.source)


def _block_loop_for_tests() -> None:
    """MTA_TEST_HOOKS=1, SIGUSR2: the event loop stops here; the heartbeats stop, the
    master sends SIGABRT and faulthandler prints this frame."""
    time.sleep(3600)
