"""The delivery plan: per-destination ready queues, windows, rate limits, fair choice.

A Job is one message's recipients for one destination domain. Each Destination keeps
its ready jobs ordered by (priority desc, arrival, sequence) and a Window: the number of
concurrent sessions allowed, which starts at `initial_concurrency`, grows by one per
successful session up to `concurrency`, halves on a session that could not be
established, and suspends the destination for a while when that happens at window 1
(cf. Postfix qmgr_feedback). An optional token bucket caps messages per second; with
a cluster lease the bucket is the cluster's, in Redis, and the local one only holds the
tokens fetched from it in batches.

`next_destination` picks, among destinations that may open a session now, the one whose
best job has the highest priority, and among equals the one served longest ago, so a
huge domain never starves a small one.

With [cluster] redis set, `shared` is the number of session slots this node holds in the
destination's cluster lease (leases.py): sessions open within it only; None: no lease
applies (no cluster, or Redis down with on_redis_down = "local").

Invariants: 0 <= in_flight <= limit for every destination with no pending shrink;
every queued job appears in exactly one destination heap. A Destination changes its own
counts: sessions are counted by `open_session` and `close_session` only (a close with
none open panics). Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from mtaqueue.ids import MessageId

SUSPEND_SECONDS = 60.0


@dataclass
class Job:
    id: int
    msgid: MessageId
    dest: str
    rcpts: tuple[int, ...]  # indices into the envelope's recipients
    priority: int
    arrival: float


@dataclass
class Limits:
    concurrency: int
    initial_concurrency: int
    max_messages_per_connection: int
    max_messages_per_second: float  # 0 = unlimited


@dataclass
class Destination:
    name: str
    limits: Limits
    window: float = 0.0
    in_flight: int = 0  # open sessions: changed by open_session/close_session only
    suspended_until: float = 0.0
    last_served: float = 0.0
    tokens: float = 0.0
    tokens_at: float = 0.0
    shared: int | None = None  # slots held in the cluster lease; None = none applies
    wants_tokens: bool = False  # out of the cluster's rate tokens: leases.py asks Redis for a batch
    _heap: list[tuple[int, float, int, Job]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.window = float(min(self.limits.initial_concurrency, self.limits.concurrency))
        self.tokens = max(1.0, self.limits.max_messages_per_second)

    @property
    def limit(self) -> int:
        return max(1, min(int(self.window), self.limits.concurrency))

    @property
    def cap(self) -> int:
        """Sessions allowed now: the window, within the cluster lease if one applies."""
        return self.limit if self.shared is None else min(self.limit, self.shared)

    def push(self, job: Job, seq: int) -> None:
        heapq.heappush(self._heap, (-job.priority, job.arrival, seq, job))

    def peek(self) -> Job | None:
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Job:
        return heapq.heappop(self._heap)[3]

    def remove(self, predicate) -> list[Job]:  # type: ignore[no-untyped-def]
        kept = [entry for entry in self._heap if not predicate(entry[3])]
        removed = [entry[3] for entry in self._heap if predicate(entry[3])]
        if removed:
            self._heap = kept
            heapq.heapify(self._heap)
        return removed

    def __len__(self) -> int:
        return len(self._heap)

    # --- sessions -------------------------------------------------------------------

    def open_session(self, now: float) -> None:
        """A session to this destination opens (with its first job)."""
        self.in_flight += 1
        self.last_served = now

    def close_session(self) -> None:
        """One of its sessions is gone (closed, or its worker lost)."""
        if self.in_flight <= 0:
            raise AssertionError(f"destination {self.name}: a session closed with none open")
        self.in_flight -= 1

    def served(self, now: float) -> None:
        """An open session was given one more job."""
        self.last_served = now

    # --- rate -------------------------------------------------------------------

    def take_token(self, now: float) -> bool:
        rate = self.limits.max_messages_per_second
        if rate <= 0:
            return True
        if self.shared is not None:  # the cluster's bucket: tokens come in batches from Redis (leases.py)
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            self.wants_tokens = True
            return False
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def token_wait(self, now: float) -> float:
        rate = self.limits.max_messages_per_second
        return 0.0 if rate <= 0 else max(0.0, (1.0 - self.tokens) / rate)

    def wait_for_token(self, now: float) -> float | None:
        """Out of tokens: no session opens until the next one (a pause, not a failure). The time
        it comes; None while a batch from the cluster's bucket is awaited: no timer, leases.py
        dispatches when Redis answers (a short poll here woke the scheduler ~5000 times a second)."""
        if self.wants_tokens:
            return None
        self.suspended_until = now + self.token_wait(now)
        return self.suspended_until

    # --- window feedback ------------------------------------------------------------

    def on_session_ok(self) -> None:
        self.window = min(float(self.limits.concurrency), self.window + 1.0)

    def on_session_failed(self, now: float) -> None:
        if self.window <= 1.0:
            self.suspended_until = now + SUSPEND_SECONDS
        self.window = max(1.0, self.window / 2.0)

    def may_open(self, now: float) -> bool:
        return (bool(self._heap) and self.in_flight < self.cap and now >= self.suspended_until
                and not self.wants_tokens)

    def short_of_lease(self, now: float) -> bool:
        """Ready, within its window, and only the cluster lease holds it back."""
        return self.wants_tokens or (self.shared is not None and bool(self._heap)
                                     and self.shared <= self.in_flight < self.limit and now >= self.suspended_until)


class Plan:
    def __init__(self) -> None:
        self.destinations: dict[str, Destination] = {}
        self._seq = itertools.count()
        self.shared_start: int | None = None  # a new destination's lease: 0 with [cluster] redis (ask first)
        self.short_of_lease = False  # set by next_destination: a destination waits for lease slots

    def destination(self, name: str, limits: Limits) -> Destination:
        dest = self.destinations.get(name)
        if dest is None:
            dest = self.destinations[name] = Destination(name, limits, shared=self.shared_start)
            if self.shared_start is not None:
                dest.tokens = 0.0  # no burst of the node's own: rate tokens come from the cluster's bucket
        else:
            dest.limits = limits  # a reload may have changed them
        return dest

    def add(self, job: Job, limits: Limits) -> None:
        self.destination(job.dest, limits).push(job, next(self._seq))

    def next_destination(self, now: float) -> Destination | None:
        best: Destination | None = None
        best_key: tuple[int, float] | None = None
        for dest in self.destinations.values():
            if not dest.may_open(now):
                self.short_of_lease = self.short_of_lease or dest.short_of_lease(now)
                continue
            top = dest.peek()
            assert top is not None
            key = (-top.priority, dest.last_served)
            if best_key is None or key < best_key:
                best, best_key = dest, key
        return best

    def ready_jobs(self) -> int:
        return sum(len(d) for d in self.destinations.values())

    def forget_idle(self) -> None:
        """Drop destinations with nothing queued or open (their windows restart from slow start)."""
        for name in [n for n, d in self.destinations.items() if not d and not d.in_flight
                     and d.suspended_until == 0.0 and not d.shared]:  # a lease is given back first
            del self.destinations[name]
