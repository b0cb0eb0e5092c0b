"""Child processes of the master: forking one, and what the master knows about each.

`spawn` forks; in the child it drops the master's signal handling and descriptors,
then runs the worker body and exits with its return code (never returning into the
master's loop). The master has no event loop, no threads and no LMDB handle, so a
fork is clean. A Child records the master's view: state, generation, heartbeat,
reported load, connections handed over but not yet acknowledged (some perhaps not sent
yet: they go out together at the end of the loop iteration), and whether its
channel still works (a child whose channel failed is never handed anything again).
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import setproctitle

from mta import frames


class ChildState(enum.Enum):
    STARTING = "starting"  # forked, no "ready" status yet
    READY = "ready"  # takes connections
    RETIRING = "retiring"  # finishing its sessions (old generation or drain)
    KILLING = "killing"  # heartbeat lost: SIGABRT sent, SIGKILL next


class Handoff(NamedTuple):
    """A connection for a worker, kept by the master until the worker acknowledges it."""

    listener: str  # the listener's configured address
    fd: int  # the accepted socket (a bare descriptor: socket.socket() would cost a getsockname)
    since: float  # monotonic time it was handed


@dataclass
class Child:
    pid: int
    kind: str
    index: int
    generation: int
    channel: socket.socket
    started: float
    state: ChildState = ChildState.STARTING
    last_seen: float = 0.0
    active: int = 0  # sessions the child reported
    pending: dict[int, Handoff] = field(default_factory=dict)  # by connection id: handed, unacknowledged
    unsent: list[int] = field(default_factory=list)  # ids in pending not sent yet (Dispatcher.flush)
    kill_sent: float = 0.0
    channel_lost_at: float = 0.0  # monotonic time its channel closed or a send to it failed
    replace: bool = True  # respawn when it dies (False once retired or draining)

    @property
    def load(self) -> int:
        return self.active + len(self.pending)

    def take_pending(self) -> list[tuple[str, int]]:
        """Its unacknowledged connections, for another worker: it is dead or dying."""
        taken = [(handoff.listener, handoff.fd) for handoff in self.pending.values()]
        self.pending.clear()
        self.unsent.clear()
        return taken

    def expire_pending(self, now: float, timeout: float) -> int:
        """Close the master's copy of handoffs unacknowledged for `timeout`; how many."""
        expired = [conn_id for conn_id, handoff in self.pending.items() if now - handoff.since > timeout]
        for conn_id in expired:
            os.close(self.pending.pop(conn_id).fd)
        return len(expired)

    @property
    def title(self) -> str:
        return f"{self.kind}#{self.index} gen{self.generation}"


def spawn(kind: str, index: int, generation: int, body: Callable[[socket.socket], int],
          close_in_child: Callable[[], None]) -> Child:
    """Fork a child running body(channel); returns the master's record of it."""
    parent_end, child_end = frames.channel_pair()
    pid = os.fork()
    if pid == 0:  # the child
        code = 70  # EX_SOFTWARE unless the body returns
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
                signal.signal(signum, signal.SIG_DFL)
            parent_end.close()
            close_in_child()
            set_title(f"mta: {kind}#{index} gen{generation}")
            code = body(child_end)
        except BaseException:  # the child must never return into the master's loop
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    child_end.close()
    now = time.monotonic()
    return Child(pid=pid, kind=kind, index=index, generation=generation, channel=parent_end,
                 started=now, last_seen=now)


def set_title(title: str) -> None:
    """Process title for ps/top (`mta: inbound#2 gen3`)."""
    setproctitle.setproctitle(title)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"
