"""The master loop: accept, hand each connection to the least-loaded worker, supervise.

One thread, no event loop, no LMDB: a selector over the listeners, the children's
channels and the signal wake-up pipe. Signal handlers only record the signal.

- Handoff (dispatch.py): every accepted socket goes to the READY inbound worker of the
  serving generation with the lowest load over its SEQPACKET channel (SCM_RIGHTS; one
  frame for the sockets of one accept burst). The
  master keeps its copy until the worker acknowledges; if the worker dies first, or its
  channel fails, the connection goes to another worker. Beyond the session caps the
  master answers 421 itself (admission.py). With no READY worker the listeners are left
  alone (the kernel backlog holds clients); when accept fails for want of descriptors
  they are left alone for a short back-off.
- Supervision: a dead worker is reaped and replaced; one that dies before it is READY
  or within CRASH_WINDOW_SECONDS of its start is replaced after a doubling back-off
  (never a halt). Such a slot is crash-looping until a child in it is READY again; the
  control process is told the crash-looping slots (a `Children` message on its
  channel, sent when the set changes), and its /readyz answers 503 meanwhile.
- Node drain: the control process relays `mta node drain|undrain` (NodeDrain); while
  drained every new connection gets 421 4.3.2 (dispatch.py), nothing else changes.
  A worker silent for heartbeat_timeout_seconds gets SIGABRT (faulthandler, which the
  bootstrap workers/process.py enables in every kind, prints its stack), then SIGKILL
  after KILL_GRACE_SECONDS.
- Channels carry mta/messages.py's messages; a frame from a child that is not one the
  master takes (a bug, or another build's Hello) is logged and the channel dropped: the
  child gets nothing more and is killed if it does not exit.
- SIGHUP: re-read the config; an invalid one is logged and the old one kept. A new
  generation starts; once all its workers are READY it serves, and the old generation
  gets SIGUSR1 (finish sessions, then exit). Listeners stay open throughout.
- SIGTERM/SIGINT: close the listeners, SIGTERM every worker (idle sessions get 421
  4.3.2, transactions finish), exit 0 when all are gone. A second signal: SIGKILL, exit 1.

Invariant: every accepted socket is owned by exactly one of: a Child's pending map,
the orphan queue, or a worker (after its acknowledgement); or it is refused or expired,
counted and logged (dispatch.py). None is dropped silently.
"""

from __future__ import annotations

import functools
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from mta import config as configmod
from mta import frames, logs, messages, metrics
from mta.config import Config, ConfigError
from mta.master.children import Child, ChildState, describe_status, set_title, spawn
from mta.master.dispatch import INBOUND, Dispatcher
from mta.master.listeners import ServeError
from mta.tls import TlsError, control_context, server_context

CRASH_WINDOW_SECONDS = 1.0  # dying before READY, or this soon after starting, is a crash at start
MAX_BACKOFF_SECONDS = 30.0
KILL_GRACE_SECONDS = 2.0
STARTUP_TIMEOUT_SECONDS = 30.0
RELOAD_READY_TIMEOUT_SECONDS = 30.0
ACCEPT_BATCH = 64
TICK_SECONDS = 0.25

WorkerBody = Callable[[Config, socket.socket, int, int], int]
# Kinds of children. Inbound workers come in generations (a reload replaces them);
# the others are restarted only when they die, and reload their config on SIGHUP.
CONTROL = "control"
GENERATIONLESS = ("scheduler", "delivery", CONTROL)
Binder = Callable[[Config, dict[str, socket.socket]], dict[str, socket.socket]]


class Arbiter:
    def __init__(self, config: Config, bodies: dict[str, WorkerBody], bind: Binder,
                 master_fds: tuple[int, ...] = ()) -> None:
        self.config = config
        self._master_fds = master_fds  # e.g. the spool lock: only the master holds it
        self._bodies = bodies
        self._bind = bind
        self._selector = selectors.DefaultSelector()
        self._listeners: dict[str, socket.socket] = {}
        self._listener_generation: dict[str, int] = {}
        self._children: dict[int, Child] = {}
        self._generation = 0
        self._serving_generation = 0
        self._reload_started = 0.0
        self._respawn_at: dict[tuple[str, int], float] = {}
        self._backoff: dict[tuple[str, int], float] = {}
        self._control_told: dict[int, tuple[list[str], bool]] = {}  # control pid -> slots, drained it was told
        self._dispatch = Dispatcher(self._children, lambda: self._serving_generation, self._wake)
        self._orphans = self._dispatch.orphans
        self._signals: list[int] = []
        # Housekeeping (reap, heartbeats, respawns, gauges...) runs once per tick, or at
        # once after a signal, a child's change of state or an orphaned connection: not
        # after every accepted connection.
        self._next_tick = 0.0
        self._urgent = True
        self._accepting = False
        self._draining = False
        self._drain_deadline = 0.0
        self._wakeup_r, self._wakeup_w = os.pipe()

    # --- main loop ---------------------------------------------------------------

    def run(self) -> int:
        set_title("mta: master")
        self._dispatch.admission.configure(self.config)
        self._install_signals()
        self._listeners = self._bind(self.config, {})
        self._generation = 1
        self._listener_generation = {address: 1 for address in self._listeners}
        self._spawn_generation()
        for kind in GENERATIONLESS:
            for index in range(1, self._count(kind) + 1):
                self._spawn(kind, index)
        while True:
            for key, _mask in self._selector.select(max(0.0, self._next_tick - time.monotonic())):
                key.data(key.fileobj)
            code = self._handle_signals()
            if code is not None:
                return code
            now = time.monotonic()
            if not (self._urgent or self._draining or now >= self._next_tick):
                continue
            self._urgent = False
            self._next_tick = now + TICK_SECONDS
            self._reap(now)
            self._check_heartbeats(now)
            self._dispatch.expire(now)
            self._respawn_due(now)
            self._advance_generation(now)
            self._dispatch.hand_orphans()
            self._update_accepting(now)
            self._update_gauges()
            self._tell_control()
            self._dispatch.admission.flush(now)
            if self._draining:
                if all(c.kind == CONTROL for c in self._children.values()):
                    for child in self._children.values():
                        if not child.kill_sent:
                            _signal(child.pid, signal.SIGTERM)
                            child.kill_sent = now
                if not self._children:
                    logs.event("stopped")
                    return 0
                if now > self._drain_deadline:
                    self._kill_all("drain timeout")

    # --- signals -----------------------------------------------------------------

    def _install_signals(self) -> None:
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)

    def _record_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _wake(self) -> None:
        self._urgent = True

    def _drain_wakeup(self, fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            return

    def _handle_signals(self) -> int | None:
        if self._signals:
            self._urgent = True
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self._draining:
                    self._kill_all(f"second {signal.Signals(signum).name}")
                    logs.event("stopped", forced=True)
                    return 1
                self._start_drain(signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self._draining:
                self._reload()
        return None

    # --- connections -------------------------------------------------------------

    def _on_listener(self, address: str, sock: socket.socket) -> None:
        # sock._accept() (what sock.accept() wraps) gives the bare descriptor: wrapping it in
        # a socket.socket would cost a getsockname per connection, and the master only
        # passes it on. The connections of one burst go out together (dispatch.flush).
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _peer = sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                break
            except ConnectionAbortedError:
                continue  # reset by the client before we took it: nothing to do
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: pause, never spin
                self._dispatch.accept_failed(address, exc)
                break
            self._dispatch.admission.backoff.accepted()
            self._dispatch.hand(address, fd)
        self._dispatch.flush()

    def _update_accepting(self, now: float) -> None:
        backoff = self._dispatch.admission.backoff
        paused = backoff.paused(now)
        if paused:  # wake up when the pause is over
            self._next_tick = min(self._next_tick, backoff.until)
        want = not (self._draining or paused) and self._dispatch.least_loaded() is not None
        for address, sock in self._listeners.items():
            usable = want and self._listener_generation[address] <= self._serving_generation
            registered = self._is_registered(sock)
            if usable and not registered:
                self._selector.register(sock, selectors.EVENT_READ, functools.partial(self._on_listener, address))
            elif not usable and registered:
                self._selector.unregister(sock)

    def _is_registered(self, fileobj: object) -> bool:
        try:
            self._selector.get_key(fileobj)
        except KeyError:
            return False
        return True

    # --- children ----------------------------------------------------------------

    def _count(self, kind: str) -> int:
        if kind == INBOUND:
            return self.config.server.inbound_workers
        if kind == "delivery":
            return self.config.delivery.workers
        return 1 if kind in self._bodies else 0

    def _spawn_generation(self) -> None:
        for index in range(1, self._count(INBOUND) + 1):
            self._spawn(INBOUND, index)

    def _spawn(self, kind: str, index: int) -> None:
        config, generation = self.config, self._generation if kind == INBOUND else 1
        body = self._bodies[kind]

        def run_child(channel: socket.socket) -> int:
            return body(config, channel, generation, index)

        child = spawn(kind, index, generation, run_child, self._close_in_child)
        self._children[child.pid] = child
        self._selector.register(child.channel, selectors.EVENT_READ, functools.partial(self._on_channel, child))
        logs.event("spawned", child=child.title, child_pid=child.pid)

    def _close_in_child(self) -> None:
        """In a freshly forked child: drop every descriptor that belongs to the master."""
        self._selector.close()
        for fd in self._master_fds:
            os.close(fd)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        for sock in self._listeners.values():
            sock.close()
        for child in self._children.values():
            child.channel.close()
            for handoff in child.pending.values():
                os.close(handoff.fd)
        for _address, fd in self._orphans:
            os.close(fd)

    def _on_channel(self, child: Child, channel: socket.socket) -> None:
        # One frame per readiness: a frame waiting rarely has another behind it (one Took
        # answers a burst of handoffs), so reading on to EAGAIN would cost a recvmsg per
        # frame; a second frame makes the next select return at once.
        try:
            got = frames.recv_frame(channel)
        except BlockingIOError:
            return
        except messages.MessageError as exc:
            self._bad_frame(child, channel, exc)
            return
        except OSError:
            got = None
        if got is None:  # the child closed its end: it is exiting; _reap handles it
            self._selector.unregister(channel)
            self._dispatch.channel_lost(child)
            return
        message, fds = got
        for fd in fds:
            os.close(fd)
        child.last_seen = time.monotonic()
        match message:
            case messages.Took() | messages.Refused():
                self._dispatch.on_answer(child, message)
            case messages.Status(state=state, active=active):
                child.active = active
                if child.state is ChildState.STARTING and state == "ready":
                    child.state = ChildState.READY
                    self._urgent = True
                    logs.event("ready", child=child.title, child_pid=child.pid)
            case messages.NodeDrain(drained=drained) if child.kind == CONTROL:
                self._dispatch.admission.drained = drained  # `mta node drain|undrain`
                logs.event("node_drain" if drained else "node_undrain")
                self._urgent = True  # tell the control process at once
            case messages.Hello():
                pass  # of this build: decode refuses another PROTOCOL_VERSION
            case _:
                self._bad_frame(child, channel, messages.unexpected(message, "from a child"))

    def _bad_frame(self, child: Child, channel: socket.socket, exc: messages.MessageError) -> None:
        """A bug, or a child of another build: it is never trusted again (channel_lost:
        nothing more is handed to it, and it is killed if it does not exit)."""
        logs.event(exc.event, child=child.title, child_pid=child.pid, error=str(exc))
        self._selector.unregister(channel)
        self._dispatch.channel_lost(child, "bad frame")

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                continue
            if self._is_registered(child.channel):
                self._selector.unregister(child.channel)
            child.channel.close()
            metrics.process_dead(pid)
            rehanded = child.take_pending()
            self._orphans.extend(rehanded)
            logs.event("exited", child=child.title, child_pid=pid, status=describe_status(status),
                       rehanded=len(rehanded) or None)
            if child.replace and not self._draining:
                slot = (child.kind, child.index)
                if child.state is ChildState.STARTING or now - child.started < CRASH_WINDOW_SECONDS:
                    delay = self._backoff.get(slot, 0.5) * 2
                    self._backoff[slot] = min(delay, MAX_BACKOFF_SECONDS)
                else:
                    self._backoff.pop(slot, None)
                    delay = 0.0
                delay = min(delay, MAX_BACKOFF_SECONDS)
                self._respawn_at[slot] = now + delay
                metrics.MASTER_RESTARTS.labels(child.kind).inc()
                logs.event("replacing", child=child.title, delay_seconds=round(delay, 1))

    def _respawn_due(self, now: float) -> None:
        for slot, when in list(self._respawn_at.items()):
            if now >= when:
                del self._respawn_at[slot]
                kind, index = slot
                if kind != INBOUND or index <= self._count(INBOUND):
                    self._spawn(kind, index)

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.config.server.heartbeat_timeout_seconds
        for child in list(self._children.values()):
            if child.channel_lost_at:  # it is exiting; or alive without a channel: unsupervisable
                if now - child.channel_lost_at > KILL_GRACE_SECONDS:
                    _signal(child.pid, signal.SIGKILL)
                continue
            if child.state is ChildState.KILLING:
                if child.kill_sent and now - child.kill_sent > KILL_GRACE_SECONDS:
                    _signal(child.pid, signal.SIGKILL)
                    child.kill_sent = 0.0
                continue
            limit = STARTUP_TIMEOUT_SECONDS if child.state is ChildState.STARTING else timeout
            if now - child.last_seen > limit:
                logs.event("heartbeat_lost", child=child.title, child_pid=child.pid,
                           silent_seconds=round(now - child.last_seen, 1))
                _signal(child.pid, signal.SIGABRT)
                child.state = ChildState.KILLING
                child.kill_sent = now
                self._orphans.extend(child.take_pending())

    # --- reload and drain --------------------------------------------------------

    def _reload(self) -> None:
        try:
            new = configmod.reload(self.config)
        except ConfigError as exc:
            metrics.MASTER_RELOADS.labels("failed").inc()
            logs.event("reload_failed", error=str(exc), action="kept the running configuration")
            return
        try:
            server_context(new.tls)  # a broken certificate must not reach the new workers
            control_context(new.control)
        except TlsError as exc:
            metrics.MASTER_RELOADS.labels("failed").inc()
            logs.event("reload_failed", error=str(exc), action="kept the running configuration")
            return
        if (new.queue.path, new.queue.maildrop_dir) != (self.config.queue.path, self.config.queue.maildrop_dir):
            logs.event("reload_failed", error="[queue] path or maildrop changed: that needs a restart",
                       action="kept the running configuration")
            return
        try:
            listeners = self._bind(new, self._listeners)
        except ServeError as exc:
            logs.event("reload_failed", error=str(exc), action="kept the running configuration")
            return
        for address, sock in self._listeners.items():
            if address not in listeners:
                if self._is_registered(sock):
                    self._selector.unregister(sock)
                sock.close()
                self._listener_generation.pop(address, None)
        self._generation += 1
        for address in listeners:
            self._listener_generation.setdefault(address, self._generation)
        self._listeners = listeners
        self.config = new
        self._dispatch.admission.configure(new)
        for slot in [s for s in self._respawn_at if s[0] == INBOUND]:
            del self._respawn_at[slot]
        self._reload_started = time.monotonic()
        metrics.MASTER_RELOADS.labels("ok").inc()
        logs.event("reload", generation=self._generation, config=new.source)
        self._spawn_generation()
        for child in self._children.values():
            if child.kind in GENERATIONLESS:
                _signal(child.pid, signal.SIGHUP)  # they re-read the (validated) config themselves

    def _advance_generation(self, now: float) -> None:
        if self._serving_generation == self._generation:
            return
        current = [c for c in self._children.values() if c.kind == INBOUND and c.generation == self._generation]
        ready = [c for c in current if c.state is ChildState.READY]
        all_ready = len(ready) == self.config.server.inbound_workers
        if not (all_ready or (ready and now - self._reload_started > RELOAD_READY_TIMEOUT_SECONDS)):
            return
        self._serving_generation = self._generation
        for child in self._children.values():
            if child.kind == INBOUND and child.generation < self._generation and child.state is ChildState.READY:
                child.state = ChildState.RETIRING
                child.replace = False
                _signal(child.pid, signal.SIGUSR1)
                logs.event("retiring", child=child.title, child_pid=child.pid)

    def _start_drain(self, reason: str) -> None:
        self._draining = True
        self._drain_deadline = time.monotonic() + self.config.server.drain_timeout_seconds + 5.0
        logs.event("drain", reason=reason, children=len(self._children))
        for child in self._children.values():  # /readyz turns false before the listeners close
            if child.kind == CONTROL:
                _signal(child.pid, signal.SIGUSR1)
        for sock in self._listeners.values():
            if self._is_registered(sock):
                self._selector.unregister(sock)
            sock.close()
        self._listeners.clear()
        while self._orphans:
            os.close(self._orphans.popleft()[1])
        for child in self._children.values():
            if child.state is not ChildState.KILLING:
                child.state = ChildState.RETIRING
            child.replace = False
            if child.kind != CONTROL:  # it answers /readyz = 503 until the others are gone
                _signal(child.pid, signal.SIGTERM)

    def _update_gauges(self) -> None:
        counts = {(kind, state.value): 0 for kind in (INBOUND, *GENERATIONLESS) for state in ChildState}
        for child in self._children.values():
            counts[(child.kind, child.state.value)] += 1
        for (kind, state), count in counts.items():
            metrics.CHILDREN.labels(kind, state).set(count)

    def _crash_looping(self) -> list[str]:
        """Required slots whose last child died at start and none is READY since."""
        ready = {(c.kind, c.index) for c in self._children.values() if c.state is ChildState.READY}
        return sorted(f"{kind}#{index}" for kind, index in self._backoff
                      if kind != CONTROL and index <= self._count(kind) and (kind, index) not in ready)

    def _tell_control(self) -> None:
        """The control process's /readyz needs the crash-looping slots and the node drain:
        frames on its channel when they change (or it is new). A full channel: next tick."""
        state = (self._crash_looping(), self._dispatch.admission.drained)
        for child in self._children.values():
            if child.kind != CONTROL or self._control_told.get(child.pid) == state:
                continue
            try:
                sent = (frames.send_frame(child.channel, messages.Children(tuple(state[0])))
                        and frames.send_frame(child.channel, messages.NodeDrain(state[1])))
            except OSError:  # it is exiting: _reap will see it
                sent = False
            if sent:
                self._control_told[child.pid] = state
        for pid in [p for p in self._control_told if p not in self._children]:
            del self._control_told[pid]

    def _kill_all(self, reason: str) -> None:
        logs.event("killing_children", reason=reason, children=len(self._children))
        for child in self._children.values():
            _signal(child.pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return  # already gone: _reap will see it
