"""The content pipeline at end of data: the stages a listener runs, in order, and their verdict.

    pipeline = Pipeline(config)                       # once per worker (a reload starts new workers)
    stages = pipeline.for_listener("127.0.0.1:25")    # () when nothing applies: no cost at all
    verdict = await run(stages, work)                 # work.envelope / work.body changed in place

Order (issue 16): attachments and TNEF -> antivirus -> milters (in file order) -> footers
-> DKIM signing, so the signature covers every change before it. Each stage returns an
Outcome: a label for mta_content_decisions_total{stage,result} and the message's log
line, and, when the message must not be stored as it is, a refusal (a 4xx/5xx Decision:
the reply to end of data), a discard (250, nothing stored) or a quarantine reason (stored
with every recipient held). The first refusal or discard ends the run; a quarantine goes
on (later stages still sign it, a later reject still refuses it).

A stage never raises for its peer's failure: it turns it into its configured action
(tempfail, accept, reject) itself, so an accepted message is never lost and a reject
policy never lets one through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from mta import metrics
from mta.config import Config
from mtaqueue import Envelope
from workers.inbound.decision import Decision


@dataclass(frozen=True, slots=True)
class Facts:
    """The session's facts a stage may need (a milter's macros, the footer's sender)."""

    hostname: str
    listener: str
    client_ip: str = ""
    client_port: int = 0
    helo: str = ""
    user: str | None = None
    tls: str = ""  # "TLSv1.3 with cipher ..." when encrypted
    sender_args: tuple[str, ...] = ()  # MAIL's ESMTP parameters, "KEY=value"


@dataclass(slots=True)
class Work:
    """The message as the stages pass it on: envelope and stored bytes, changed in place."""

    envelope: Envelope
    body: bytes
    facts: Facts
    quarantine: str | None = None  # why, once a stage quarantined it
    signed: bool = False  # a [[dkim]] stage signed it (the first covering entry signs)
    notes: list[str] = field(default_factory=list)  # "stage:result", for the log line


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str  # the metric's result label: pass, changed, signed, reject, tempfail, ...
    refusal: Decision | None = None  # refuse the message with this reply
    discard: bool = False  # 250 and store nothing


@dataclass(frozen=True, slots=True)
class Verdict:
    refusal: Decision | None = None
    discard: bool = False


GO_ON = Verdict()


T = TypeVar("T")
INLINE_BYTES = 256 * 1024  # a pure stage over a bigger message runs on a thread: the loop keeps serving
LOCAL = "maildrop"  # the pseudo-listener of mail picked up from mta-sendmail


class Stage:
    """One configured stage: its metric name, the listeners it runs for, and what it does.
    `local` stages (they change a message, never refuse it) also run for picked-up mail."""

    name = ""
    local = False

    def __init__(self, listeners: Sequence[str]) -> None:
        self.listeners = frozenset(listeners)

    def applies(self, listener: str) -> bool:
        return not self.listeners or listener.lower() in self.listeners

    async def __call__(self, work: Work) -> Outcome:
        raise NotImplementedError


StageFactory = Callable[[Config], list[Stage]]


class Pipeline:
    """Every configured stage, in pipeline order, and each listener's selection of them."""

    def __init__(self, config: Config, factories: Sequence[StageFactory] = ()) -> None:
        self.stages: list[Stage] = [stage for make in factories for stage in make(config)]
        self._selected = {lst.address: tuple(s for s in self.stages if s.applies(lst.address))
                          for lst in config.listener}
        self._selected[LOCAL] = tuple(s for s in self.stages if s.local and s.applies(LOCAL))

    def for_listener(self, address: str) -> tuple[Stage, ...]:
        """The stages for mail on listener `address` (LOCAL: picked-up mail)."""
        return self._selected.get(address, ())


async def run(stages: Sequence[Stage], work: Work) -> Verdict:
    """Run `stages` over `work` in order; the first refusal or discard ends the run."""
    for stage in stages:
        started = time.perf_counter()
        outcome = await stage(work)
        metrics.CONTENT_STAGE_SECONDS.labels(stage.name).observe(time.perf_counter() - started)
        metrics.CONTENT_DECISIONS.labels(stage.name, outcome.result).inc()
        work.notes.append(f"{stage.name}:{outcome.result}")
        if outcome.refusal is not None or outcome.discard:
            return Verdict(outcome.refusal, outcome.discard)
    return GO_ON



async def off_loop(size: int, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` (a pure stage's work over `size` bytes): inline for a small message, on the
    loop's executor for a big one, so one 20 MiB message never stalls the worker's sessions."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
