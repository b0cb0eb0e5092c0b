"""The scheduler process: owns the delivery plan and is the only writer of delivery outcomes.

This module is the process glue: the WorkerBody that workers/process.py runs (start,
reload, drain, close), the socket server on `<spool>/scheduler.sock` ([queue]
scheduler_socket) and its peers, and the periodic rescan and gauges. Messages are
mta/messages.py's, framed by mta/frames.py. Every connection starts with a Hello each
way (a peer of another build is refused), then:

  inbound workers   New(ids)                                after each durable commit
  delivery workers  (Hello with role "delivery" and its capacity), then per session:
                    scheduler: Open(sid, dest, job) / Job(sid, job) / Close(sid)
                    worker:    Done(sid, job_id, replies, remote, failed, skipped, handoff) / Closed(sid, ok)
  the CLI, control  QueueCommand(op: retry|hold|release|delete, ids|domain|all) -> CommandResult,
                    ActiveQuery -> ActiveJobs (after the pending outcomes are written), GaugeQuery -> DestinationGauges

The scheduler's concepts are one module each (cf. Postfix qmgr), mixins of Scheduler
over one state, each owning its part of it:
  tracking.py    the messages tracked, their timers, the running counts (tally.py)
  flush.py       outcomes applied in memory, written to the spool in batches
  dispatch.py    sessions and jobs: dispatch, parking, lookahead, Done/Closed
  leases.py      with [cluster] redis: per-destination session slots leased in Redis
  operations.py  the operator's hold/release/retry/delete (mta/queueops.py's rules)
  plan.py, outcome.py, tally.py: the pure rules they use.

The scheduler holds a bounded active set (tracking.py); the rest of the queue stays in
the spool. At start it loads the first due messages (up to [queue] active_limit) and
dispatches at once, whatever the queue's size. A pass over the due index from its start
every RESCAN_SECONDS catches messages whose New was lost (e.g. sent while this process
was restarting); it reads due entries only. The queue gauges are published every
GAUGE_SECONDS from the spool's counts and the running ones, O(destinations); the
per-destination snapshot (top TOP_DESTINATIONS + "other") is answered to the control
process's GaugeQuery. Invariant: `check_tally()` (tests only) holds after any event.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from typing import Any

from mta import frames, logs, messages
from mta.config import Config
from mta.spool import open_spool
from mtaqueue.ids import MessageId
from workers.process import WorkerBody, WorkerProcess, run_worker
from workers.scheduler.dispatch import WorkerLink
from workers.scheduler.leases import Leases
from workers.scheduler.operations import Operations
from workers.scheduler.tally import Tally, recount

RESCAN_SECONDS = 30.0
GAUGE_SECONDS = 2.0
DRAIN_GRACE_SECONDS = 2.0  # past the drain deadline: the delivery workers' last outcomes


def run(config: Config, channel: socket.socket, generation: int, index: int) -> int:
    return run_worker(Scheduler(config), config, channel, "scheduler")


class Scheduler(Operations, WorkerBody):
    kind = "scheduler"

    def __init__(self, config: Config) -> None:
        self.config = config
        self._init_tracking()
        self._init_outcomes()
        self._init_dispatch()
        self.leases = None  # start(): with [cluster] redis, fixed until restart
        self._peers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._draining = False  # nothing new is dispatched; outcomes still come (drain())
        self._stopping = False  # drained: peers are closed, the last flush runs

    # --- process -------------------------------------------------------------------

    async def start(self, process: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        logs.write_each_turn(loop)  # a line per outcome: one write() per turn, not per line
        self.backend = open_spool(self.config.queue)
        path = self.config.queue.scheduler_socket
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a dead scheduler
        self._server = await asyncio.start_unix_server(self._on_peer, path=path)
        os.chmod(path, 0o600)
        loaded = self._scan(b"")
        logs.event("ready", loaded=loaded, ready_jobs=self.plan.ready_jobs(), backlog=self.backlog or None)
        self._tasks = [loop.create_task(self._rescan_forever()), loop.create_task(self._gauges_forever()),
                       loop.create_task(self._expire_parked_forever())]
        if self.config.cluster.redis:
            self.plan.shared_start = 0  # no session before a lease
            for dest in self.plan.destinations.values():
                dest.shared = 0
            self.leases = Leases(self.config.cluster, self.plan.destinations.values, self._schedule_dispatch,
                                 lambda: (len(self.sessions), self.config.delivery.max_connections))
            self._tasks.append(loop.create_task(self.leases.run_forever()))
        self._schedule_dispatch()

    def status(self) -> int:
        return len(self.sessions)

    def reload(self, config: Config) -> None:
        self.config = config
        self._schedule_dispatch()

    async def drain(self, deadline: float) -> None:
        """The delivery workers drain too (SIGTERM reaches all at once): nothing new goes
        out; their outcomes are applied until no session is open (each one's "closed" or
        its worker gone) or the deadline + DRAIN_GRACE_SECONDS; close() writes them."""
        self._draining = True
        for session in list(self.sessions.values()):
            if not session.jobs:
                self._close(session)
        logs.event("draining", sessions=len(self.sessions) or None)
        until = deadline + DRAIN_GRACE_SECONDS
        while self.sessions and time.monotonic() < until:
            await asyncio.sleep(0.05)

    async def close(self) -> dict[str, Any]:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        self._server.close()
        # Close the peers' connections rather than cancel their tasks (a cancelled
        # stream handler task makes Python 3.11's asyncio log a spurious traceback); no
        # frame is handled once the spool is closed.
        for writer in self._peers.values():
            writer.close()
        await asyncio.gather(*self._tasks, *self._peers, return_exceptions=True)
        if self.leases is not None:
            await self.leases.release_all()
        await self.writes.flush_all()
        self.writes.close()
        self._publish_delivered()  # (the last turn's, should the loop not turn again)
        self.backend.close()
        logs.write_each_turn(None)  # the last lines out now; "stopped" goes at once
        return {"in_flight_sessions": len(self.sessions)}

    async def _gauges_forever(self) -> None:
        while True:
            self._update_gauges(time.time())
            await asyncio.sleep(GAUGE_SECONDS)

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_SECONDS)
            self._scan(b"")

    def check_tally(self) -> None:
        """Tests only (it walks everything): the running counts equal a recount, the carried
        recipients are exactly those of the sessions' jobs, the on-disk view is the
        tracked messages', and the active set is within its bound."""
        carried: dict[MessageId, Counter[int]] = {}
        for session in self.sessions.values():
            for job in session.jobs:
                carried.setdefault(job.msgid, Counter()).update(job.rcpts)
        assert carried == self.carried, (carried, self.carried)
        walked = recount(self.messages, self.carried)
        assert walked == self.tally, f"running {self.tally}\nwalked  {walked}"
        on_disk = Tally()
        for states in self.on_disk.values():
            for dest, state in states:
                on_disk.add(dest, state, +1)
        assert on_disk == self.spooled, f"running {self.spooled}\nwalked  {on_disk}"
        assert set(self.messages) <= set(self.on_disk), set(self.messages) - set(self.on_disk)

    # --- peers ---------------------------------------------------------------------------

    async def _on_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:
            writer.close()
            return
        self._peers[task] = writer
        link: WorkerLink | None = None
        hello: messages.Hello | None = None
        writer.write(frames.encode_stream_frame(messages.hello("scheduler")))  # the peer checks ours too
        try:
            hello = await frames.read_hello(reader)  # a peer of another build is refused here
            if hello is not None and hello.role == "delivery":
                link = WorkerLink(writer, hello.capacity, hello.pid)
                self.workers.append(link)
                logs.event("delivery_worker", worker_pid=link.pid, capacity=link.capacity)
                self._schedule_dispatch()
            incoming = frames.StreamFrameReader(reader)  # a burst of frames per await
            while hello is not None and (burst := await incoming.read()) is not None:
                for message in burst:
                    match message:
                        case messages.New(ids=ids):
                            self._on_new(ids)
                        case messages.Done() if link is not None:
                            self._on_done(message)
                        case messages.Closed(sid=sid, ok=ok) if link is not None:
                            self._on_closed(link, sid, ok)
                        case messages.QueueCommand():  # on disk before the answer; progress while it runs
                            answer = await self._command(message, lambda m: writer.write(frames.encode_stream_frame(m)))
                            writer.write(frames.encode_stream_frame(answer))
                        case messages.ActiveQuery():  # the outcomes already in are on disk before the answer:
                            await self.writes.flush_now()  # the asker (an export) reads the spool next
                            writer.write(frames.encode_stream_frame(self._query(message)))
                        case messages.GaugeQuery():
                            writer.write(frames.encode_stream_frame(self._query(message)))
                        case _:
                            raise messages.unexpected(message, f"from a {hello.role} peer")
        except messages.MessageError as exc:  # a bug, or a peer of another build: drop it
            logs.event(exc.event, peer=hello and hello.role, peer_pid=hello and hello.pid, error=str(exc))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logs.event("peer_error", error=str(exc))
        finally:
            self._peers.pop(task, None)
            if link is not None and not self._stopping:
                self._lost_worker(link)
            writer.close()
