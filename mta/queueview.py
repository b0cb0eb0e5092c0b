"""What operators see of the queue: envelopes as JSON and as text, the in-flight overlay,
the per-domain summary.

Shared by the `mta queue` commands and the control process's admin API, so both show
the same thing. A listing is written piece by piece (json_array, text_lines) so that
neither side ever holds the whole queue: json_array's pieces joined are exactly
json.dumps(list, indent=1), the form `mta queue list --json` has always had.
Pure: callers read the spool and ask the scheduler.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
        "ret": e.ret, "envid": e.envid, "body": e.body_type, "smtputf8": e.smtputf8, "warned": e.warned,
        "client": e.client,
        "recipients": [{"address": r.address, "state": r.state, "attempts": r.attempts,
                        "last_reply": r.last_reply, "notify": list(r.notify) if r.notify else None,
                        "orcpt": r.orcpt} for r in e.recipients],
    }


def json_array(items: Iterable[Any]) -> Iterator[str]:
    """json.dumps(list(items), indent=1), one piece per item (then the closing bracket)."""
    first = True
    for item in items:
        yield ("[\n " if first else ",\n ") + json.dumps(item, indent=1).replace("\n", "\n ")
        first = False
    yield "[]" if first else "\n]"


TEXT_HEADER = f"{'ID':21}  {'ARRIVAL (UTC)':19}  {'SIZE':>9}  SENDER / RECIPIENTS"


def text_lines(e: Mapping[str, Any]) -> list[str]:
    """One message of the text listing, from its envelope_json form (times are ISO strings)."""
    deferred = any(r["state"] == "deferred" for r in e["recipients"])
    retry = f"  next attempt {e['next_attempt'][:19]}" if deferred else ""
    lines = [f"{e['id']:21}  {e['arrival'][:19]:19}  {e['size']:>9}  <{e['sender']}>{retry}"]
    for r in e["recipients"]:
        lines.append(f"{'':55}  {r['state']:9} <{r['address']}>  attempts={r['attempts']}")
        if r["last_reply"]:
            lines.append(f"{'':66}{r['last_reply']}")
    return lines


def domain_summary(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Queued recipients per destination domain and state (the spool's counts: ready,
    deferred, held), states with none left out, domains in name order."""
    summary = {dest: {state: n for state, n in states.items() if n} for dest, states in counts.items()}
    return {dest: states for dest, states in sorted(summary.items()) if states}
