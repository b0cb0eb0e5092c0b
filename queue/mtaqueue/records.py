"""Queue records: the envelope of one message with per-recipient state, and its codec.

Envelopes are stored as msgpack maps with short keys; `decode(encode(e)) == e`.
Recipient states: ready, active, deferred, held, delivered, bounced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from mtaqueue.ids import MessageId

RECIPIENT_STATES = ("ready", "active", "deferred", "held", "delivered", "bounced")


@dataclass(slots=True)
class Recipient:
    address: str
    notify: tuple[str, ...] | None = None  # DSN NOTIFY (RFC 3461)
    orcpt: str | None = None  # DSN ORCPT, "addr-type;address"
    state: str = "ready"
    attempts: int = 0
    last_reply: str | None = None


@dataclass(slots=True)
class Envelope:
    id: MessageId
    sender: str  # "" for the null sender
    recipients: list[Recipient]
    size: int  # octets of the stored body
    arrival: float  # unix seconds
    next_attempt: float
    priority: int = 0
    attempts: int = 0
    ret: str | None = None  # DSN RET: FULL | HDRS
    envid: str | None = None  # DSN ENVID
    body_type: str | None = None  # 7BIT | 8BITMIME
    smtputf8: bool = False
    client: dict[str, Any] = field(default_factory=dict)  # ip, port, helo, listener, protocol


@dataclass(slots=True)
class NewMessage:
    envelope: Envelope
    body: bytes


def encode(envelope: Envelope) -> bytes:
    return msgpack.packb({
        "i": envelope.id, "s": envelope.sender, "z": envelope.size, "a": envelope.arrival,
        "n": envelope.next_attempt, "p": envelope.priority, "t": envelope.attempts,
        "R": envelope.ret, "E": envelope.envid, "B": envelope.body_type, "U": envelope.smtputf8,
        "c": envelope.client,
        "r": [[r.address, list(r.notify) if r.notify is not None else None, r.orcpt,
               r.state, r.attempts, r.last_reply] for r in envelope.recipients],
    })


def decode(raw: bytes) -> Envelope:
    d = msgpack.unpackb(raw)
    return Envelope(
        id=MessageId(d["i"]), sender=d["s"], size=d["z"], arrival=d["a"], next_attempt=d["n"],
        priority=d["p"], attempts=d["t"], ret=d["R"], envid=d["E"], body_type=d["B"],
        smtputf8=d["U"], client=d["c"],
        recipients=[Recipient(a, tuple(n) if n is not None else None, o, s, t, lr)
                    for a, n, o, s, t, lr in d["r"]],
    )
