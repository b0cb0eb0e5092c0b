"""GET /api/overview: the live figures of the web UI, from what /metrics shows.

Series (pure): the per-minute history. The control process samples the merged counters
(messages accepted, recipients delivered, deferred, bounced) at most once a minute, at
the minute's start, and keeps MINUTES + 1 samples: a minute's figure is the next sample
less its own; the current, partial minute's is the totals now less its sample. A minute
with no sample (the process was busy or just started) has no row: its figures count in
the row before. A counter that went back (a restart of mta serve wipes them) counts 0.

figures(): the totals and gauges wanted, read from the merged metric families;
overview_json(): the reply, with the scheduler's per-destination snapshot (GaugeQuery)
and the health the control process knows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import Metric

from mta import messages

MINUTES: Final = 60
SERIES: Final = ("accepted", "delivered", "deferred", "bounced")
TOP: Final = 10  # destinations shown
QUEUE_STATES: Final = ("ready", "deferred", "held", "active")


@dataclass(frozen=True)
class Figures:
    totals: dict[str, float]  # SERIES -> the counter's total now
    queue: dict[str, int]  # messages, bytes, and recipients per QUEUE_STATES
    oldest_age_seconds: float | None
    sessions: dict[int, int]  # inbound worker pid -> open SMTP sessions


class Series:
    def __init__(self) -> None:
        self._samples: deque[tuple[int, dict[str, float]]] = deque(maxlen=MINUTES + 1)  # (minute start, totals)

    def record(self, now: float, totals: dict[str, float]) -> None:
        """A sample, unless this minute has one."""
        minute = int(now // 60 * 60)
        if not self._samples or self._samples[-1][0] < minute:
            self._samples.append((minute, dict(totals)))

    def minutes(self, now: float, totals: dict[str, float]) -> list[dict[str, int]]:
        """The last MINUTES rows, oldest first, the current partial one last."""
        ends = [*list(self._samples)[1:], (int(now // 60 * 60), totals)]
        rows = [dict(t=start, **{name: max(int(end.get(name, 0) - begin.get(name, 0)), 0) for name in SERIES})
                for (start, begin), (_, end) in zip(self._samples, ends)]
        return rows[-MINUTES:]


def figures(families: Iterable[Metric]) -> Figures:
    totals = dict.fromkeys(SERIES, 0.0)
    queue = dict.fromkeys(("messages", "bytes", *QUEUE_STATES), 0)
    oldest: float | None = None
    sessions: dict[int, int] = {}
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "mta_inbound_messages_total":
                totals["accepted"] += value
            elif name == "mta_delivery_recipients_total" and labels.get("result") in SERIES:
                totals[labels["result"]] += value
            elif name == "mta_queue_messages":
                queue["messages"] += int(value)
            elif name == "mta_queue_stored_bytes":
                queue["bytes"] += int(value)
            elif name == "mta_queue_recipients" and labels.get("state") in QUEUE_STATES:
                queue[labels["state"]] += int(value)
            elif name == "mta_queue_oldest_message_age_seconds":
                oldest = max(oldest or 0.0, value)
            elif name == "mta_inbound_active_sessions" and labels.get("pid", "").isdigit():
                sessions[int(labels["pid"])] = int(value)
    return Figures(totals, queue, oldest, sessions)


def overview_json(now: float, series: Series, seen: Figures, gauges: messages.Message | None,
                  names: dict[int, str], health: dict[str, Any]) -> dict[str, Any]:
    """The reply. `names`: a process's name by pid (its title): only inbound workers are
    listed (every process that imports mta.metrics reports the sessions gauge, at 0)."""
    top = gauges.top if isinstance(gauges, messages.DestinationGauges) else ()
    return {
        "now": now,
        "minutes": series.minutes(now, seen.totals),
        "queue": seen.queue,
        "oldest_age_seconds": seen.oldest_age_seconds if seen.queue["messages"] else None,
        "destinations": [{"domain": name, "recipients": ready + active + deferred, "connections": open_sessions,
                          "limit": window} for name, ready, active, deferred, open_sessions, window in top[:TOP]],
        "inbound": [{"worker": names[pid], "pid": pid, "sessions": count}
                    for pid, count in sorted(seen.sessions.items()) if names.get(pid, "").startswith("inbound")],
        "health": health,
    }


def worker_name(pid: int) -> str | None:
    """'inbound#2' from the process title `mta: inbound#2 gen3`; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read(200).split(b"\0")[0].decode("ascii", "replace")
    except OSError:
        return None
    words = title.split()
    return words[1] if len(words) >= 2 and words[0] == "mta:" else None
