"""What operators see of the queue: envelopes as JSON, in-flight overlay, per-domain summary.

Shared by the `mta queue` commands and the control process's admin API, so both show
the same thing. Pure: callers read the spool and ask the scheduler.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mtaqueue.records import Envelope


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def mark_active(envelopes: Iterable[Envelope], active: Mapping[str, Sequence[int]]) -> None:
    """Recipients being delivered right now are only known to the running scheduler."""
    for e in envelopes:
        for i in active.get(e.id, []):
            if e.recipients[i].state == "ready":
                e.recipients[i].state = "active"


def envelope_json(e: Envelope) -> dict[str, Any]:
    return {
        "id": e.id, "sender": e.sender, "size": e.size, "arrival": iso(e.arrival),
        "next_attempt": iso(e.next_attempt), "attempts": e.attempts, "priority": e.priority,
        "ret": e.ret, "envid": e.envid, "body": e.body_type, "smtputf8": e.smtputf8,
        "client": e.client,
        "recipients": [{"address": r.address, "state": r.state, "attempts": r.attempts,
                        "last_reply": r.last_reply, "notify": list(r.notify) if r.notify else None,
                        "orcpt": r.orcpt} for r in e.recipients],
    }


def domain_summary(envelopes: Iterable[Envelope]) -> dict[str, dict[str, int]]:
    """Recipients per destination domain and state."""
    summary: dict[str, dict[str, int]] = {}
    for e in envelopes:
        for r in e.recipients:
            domain = r.address.rpartition("@")[2].lower() or "localhost"
            states = summary.setdefault(domain, {})
            states[r.state] = states.get(r.state, 0) + 1
    return dict(sorted(summary.items()))
