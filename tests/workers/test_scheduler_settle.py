"""The scheduler's shortcut for the common outcome (every recipient of a job answered 2xx,
no success notice asked for: flush._settle_delivered) against the general path (settle()
and the recount), outcome by outcome: the envelope, the log lines, the counters, the
pending writes and the tally must be the same."""

from __future__ import annotations

import io
import re
import time
from typing import Any

import pytest
import uvloop
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient
from prometheus_client import REGISTRY

from mta import logs, messages
from tests.workers.test_scheduler_tally import FakeWriter, config, new_scheduler
from workers.scheduler import flush
from workers.scheduler.dispatch import WorkerLink

RELAY = "mx.test[127.0.0.9]:25"
OK = (250, "2.0.0", "ok")


def counters() -> dict[tuple[str, str], float]:
    return {(result, reply): REGISTRY.get_sample_value("mta_delivery_recipients_total",
                                                       {"result": result, "reply": reply}) or 0.0
            for result in ("delivered", "deferred", "bounced", "retried") for reply in ("2xx", "4xx", "5xx")}


def latency_count() -> float:
    return REGISTRY.get_sample_value("mta_delivery_latency_seconds_count") or 0.0


def run(recipients: list[Recipient], answers: dict[str, list[tuple[int, str, str]]], handoff: str,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A message to `recipients` committed and dispatched; each destination's job answered
    with its replies (in its recipients' order); what the scheduler holds and wrote after
    each outcome."""
    seen: dict[str, Any] = {"after": []}

    async def main() -> None:
        s = new_scheduler(config())
        s.workers.append(WorkerLink(FakeWriter(), 10, 1))  # type: ignore[arg-type]
        msgid = MessageId("0" * 20 + "1")
        now = time.time()
        s.backend.commit([NewMessage(Envelope(msgid, "s@client.test", recipients, 10, now - 5, now - 1), b"x")])
        s._on_new([msgid])
        s._dispatch()
        for dest, replies in answers.items():
            session = next(x for x in s.sessions.values() if x.job is not None and x.job.dest == dest)
            job = session.job
            s._on_done(messages.Done(session.sid, job.id, tuple((i, *r) for i, r in zip(job.rcpts, replies)),
                                     RELAY, handoff=handoff))  # type: ignore[arg-type]
            s.check_tally()
            envelope = s.messages.get(msgid)
            seen["after"].append({
                "tracked": envelope is not None and [(r.state, r.attempts, r.last_reply) for r in envelope.recipients],
                "attempts": envelope.attempts if envelope is not None else None,
                "update": [(r.state, r.attempts, r.last_reply) for r in s.writes.update[msgid].recipients]
                if msgid in s.writes.update else None,
                "delete": msgid in s.writes.delete, "notices": len(s.writes.add),
                "tally": (dict(s.tally.totals), {d: dict(c) for d, c in s.tally.by_dest.items()}),
            })
        await s.writes.flush_all()
        if s._wake is not None:
            s._wake.cancel()

    stream = io.StringIO()
    monkeypatch.setattr(logs, "_stream", stream)
    before, latencies = counters(), latency_count()
    uvloop.run(main())
    after = counters()
    seen["counted"] = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    seen["latencies"] = latency_count() - latencies
    # The lines without their time stamps and the message's age: the rest is the same bytes.
    # (A notice's id is new each run.)
    seen["lines"] = [re.sub(r"^ts=\S+ |( delay=)[0-9.]+|(_queued msgid=)\w+", r"\1\2", line)
                     for line in stream.getvalue().splitlines()
                     if " event=delivered " in line or " event=deferred " in line or "_queued " in line]
    return seen


def both_ways(monkeypatch: pytest.MonkeyPatch, *args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    taken: list[bool] = []
    shortcut = flush._delivered_only

    def watched(*a: Any) -> bool:
        taken.append(shortcut(*a))
        return taken[-1]

    with monkeypatch.context() as m:
        m.setattr(flush, "_delivered_only", watched)
        fast = run(*args, m)
    with monkeypatch.context() as m:
        m.setattr(flush, "_delivered_only", lambda *a: False)  # every outcome by settle()
        general = run(*args, m)
    fast["shortcut"] = taken
    return fast, general


def test_every_recipient_delivered_is_what_settle_makes_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two destinations: the first outcome leaves the message queued (an update), the second finishes it.
    rcpts = [Recipient("a@x.test"), Recipient("b@x.test"), Recipient("c@y.test")]
    fast, general = both_ways(monkeypatch, rcpts, {"x.test": [OK, (251, "2.1.5", "forwarded")], "y.test": [OK]},
                              "relayed")
    assert fast["shortcut"] == [True, True]
    assert fast["after"][0]["update"] == [("delivered", 1, "250 2.0.0 ok"), ("delivered", 1, "251 2.1.5 forwarded"),
                                          ("ready", 0, None)]
    assert fast["after"][1]["delete"] and fast["after"][1]["tracked"] is False
    assert fast["counted"] == {("delivered", "2xx"): 3.0} and fast["latencies"] == 3.0
    assert len(fast["lines"]) == 3 and "attempts=1" in fast["lines"][1]
    for key in ("after", "counted", "latencies", "lines"):
        assert fast[key] == general[key], key


@pytest.mark.parametrize("notify, handoff, notices", [
    (("SUCCESS",), "relayed", 1),  # asked for: the general path writes the success notice
    (("SUCCESS",), "passed", 0),  # the next hop reports success: the shortcut
    (("FAILURE",), "delivered", 0),  # given, without SUCCESS: no notice either way
])
def test_a_success_notice_is_never_skipped(monkeypatch: pytest.MonkeyPatch, notify: tuple[str, ...], handoff: str,
                                           notices: int) -> None:
    fast, general = both_ways(monkeypatch, [Recipient("a@x.test", notify=notify)], {"x.test": [OK]}, handoff)
    assert fast["after"][0]["notices"] == notices
    assert fast["shortcut"] == [handoff == "passed"]
    for key in ("after", "counted", "lines"):
        assert fast[key] == general[key], key


def test_a_job_with_any_other_reply_goes_the_general_way(monkeypatch: pytest.MonkeyPatch) -> None:
    rcpts = [Recipient("a@x.test"), Recipient("b@x.test")]
    fast, general = both_ways(monkeypatch, rcpts, {"x.test": [OK, (451, "4.3.0", "later")]}, "relayed")
    assert fast["shortcut"] == [False]
    assert fast["after"][0]["update"][1][0] == "deferred"
    assert fast["after"] == general["after"] and fast["lines"] == general["lines"]
