"""The soak's load: a steady offered rate through loadgen.run_load, in a thread of its own.

One batch per BATCH_SECONDS: --rate messages split over the size mix (1/8/32/100 KiB:
55/25/15/5 %) and the two destinations (--defer-share to defer.test, the rest to
soak.test), fractional counts carried over as credit; --sessions connections per
batch, PER_SESSION messages each. At most MAX_BATCHES_IN_FLIGHT batches run at once:
when mta falls behind, later batches are skipped and counted, never queued up here.
The tallies are read under a lock (snapshot); a bug in the load thread stops it and
is reported, never swallowed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import evloop
from loadgen import run_load
from procs import HOST, log
from soak_mta import DEFER_DOMAIN, SINK_DOMAIN

SENDER: Final = "soak@client.test"
SIZE_MIX: Final = ((1024, 0.55), (8 * 1024, 0.25), (32 * 1024, 0.15), (100 * 1024, 0.05))
MEAN_SIZE_BYTES: Final = sum(size * share for size, share in SIZE_MIX)
BATCH_SECONDS: Final = 1.0
PER_SESSION: Final = 5
MAX_BATCHES_IN_FLIGHT: Final = 3
LOAD_TIMEOUT_SECONDS: Final = 30.0  # one run_load call, from first connect to last reply
IO_TIMEOUT_SECONDS: Final = 20.0


@dataclass
class LoadTally:
    offered: int = 0
    skipped: int = 0  # offered while MAX_BATCHES_IN_FLIGHT were still running
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    accepted_by_domain: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)  # rejected codes, error kinds
    first_errors: list[str] = field(default_factory=list)


class Churn:
    """Offers `rate` messages per second to mta until stopped; thread-safe tallies."""

    def __init__(self, port: int, rate: float, sessions: int, defer_share: float):
        self.port = port
        self.sessions = sessions
        self.tally = LoadTally()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.failure: BaseException | None = None
        self.started = self.stopped = 0.0  # time.monotonic() of the first and last batch
        # (size, rcpt) -> messages per batch, fractional; credit carries the remainder.
        self.classes = {}
        for size, share in SIZE_MIX:
            for domain, dshare in ((SINK_DOMAIN, 1 - defer_share), (DEFER_DOMAIN, defer_share)):
                if share * dshare > 0:
                    self.classes[(size, f"user@{domain}")] = rate * BATCH_SECONDS * share * dshare
        self.credit = dict.fromkeys(self.classes, 0.0)
        self.thread = threading.Thread(target=self._run, name="soak-churn", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop offering; wait (bounded) for the batches in flight."""
        self.stop_event.set()
        self.thread.join(LOAD_TIMEOUT_SECONDS + IO_TIMEOUT_SECONDS + 10)
        if self.thread.is_alive():
            log("the load thread did not finish in time; its sessions die with the process")

    def snapshot(self) -> LoadTally:
        with self.lock:
            return LoadTally(**{k: (v.copy() if hasattr(v, "copy") else v)
                                for k, v in vars(self.tally).items()})

    def _run(self) -> None:
        self.started = time.monotonic()
        try:
            evloop.run(self._pace())
        except BaseException as exc:  # a bug here: the main thread reports it and stops
            self.failure = exc
            self.stop_event.set()
        finally:
            self.stopped = time.monotonic()

    def _plan(self) -> list[tuple[int, str, int]]:
        plan = []
        for key, per_batch in self.classes.items():
            self.credit[key] += per_batch
            n = int(self.credit[key])
            self.credit[key] -= n
            if n:
                plan.append((*key, n))
        return plan

    async def _pace(self) -> None:
        in_flight: set[asyncio.Task] = set()
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            plan = self._plan()
            total = sum(n for _, _, n in plan)
            for task in [t for t in in_flight if t.done()]:
                in_flight.discard(task)
                task.result()  # a bug in a batch surfaces here
            with self.lock:
                self.tally.offered += total
                if len(in_flight) >= MAX_BATCHES_IN_FLIGHT:
                    self.tally.skipped += total
                    plan = []
            if plan:
                in_flight.add(asyncio.create_task(self._batch(plan, total)))
            next_at += BATCH_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if in_flight:
            # run_load bounds each call by LOAD_TIMEOUT_SECONDS; this is a second fence.
            done, pending = await asyncio.wait(in_flight, timeout=LOAD_TIMEOUT_SECONDS + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()

    async def _batch(self, plan: list[tuple[int, str, int]], total: int) -> None:
        calls = [run_load(HOST, self.port, max(1, min(n, round(self.sessions * n / total))),
                          n, size, PER_SESSION, sender=SENDER, rcpt=rcpt,
                          timeout_seconds=LOAD_TIMEOUT_SECONDS,
                          io_timeout_seconds=IO_TIMEOUT_SECONDS, ehlo_name="client.test")
                 for size, rcpt, n in plan]
        results = await asyncio.gather(*calls)
        with self.lock:
            t = self.tally
            for (_, rcpt, _), r in zip(plan, results):
                t.sent += r.sent
                t.accepted += r.accepted
                t.rejected += r.rejected
                t.errors += r.errors
                t.accepted_by_domain[rcpt.split("@", 1)[1]] += r.accepted
                t.problems.update(r.rejected_by_code)
                t.problems.update(r.errors_by_kind)
                t.first_errors.extend(r.first_errors[:max(0, 5 - len(t.first_errors))])
