"""Queue records: the envelope of one message with per-recipient state, and its codec.

Envelopes are stored as msgpack maps with short keys; `decode(encode(e)) == e`;
`decode_queued` reads only what the spool's indexes keep (a delete's read).
Recipient states: ready, active, deferred, held, delivered, bounced.
`destination_of` is the one rule for a recipient's destination (the spool's indexes,
the scheduler's queues and counts, the operator's --domain).
Bytes that are not an envelope of this form (damaged on disk) raise CorruptRecord,
whatever is wrong with them, so a caller handles one exception (the LMDB backend moves
the record to its corrupt table) and never gets an Envelope with fields of wrong types.
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mtaqueue.ids import MessageId

_unpackb = msgpack.unpackb
RECIPIENT_STATES = ("ready", "active", "deferred", "held", "delivered", "bounced")


@functools.lru_cache(maxsize=65536)
def destination_of(address: str) -> str:
    """The destination domain of a recipient address (lowercase, no trailing dot)."""
    return address.rpartition("@")[2].lower().rstrip(".") or "localhost"


class CorruptRecord(ValueError):
    """Stored bytes that do not decode to an envelope."""


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
    warned: bool = False  # the sender got its delay notice (NOTIFY=DELAY): one per message


@dataclass(slots=True)
class NewMessage:
    envelope: Envelope
    body: bytes


def encode(envelope: Envelope) -> bytes:
    return msgpack.packb({
        "i": envelope.id, "s": envelope.sender, "z": envelope.size, "a": envelope.arrival,
        "n": envelope.next_attempt, "p": envelope.priority, "t": envelope.attempts,
        "R": envelope.ret, "E": envelope.envid, "B": envelope.body_type, "U": envelope.smtputf8,
        "c": envelope.client, "W": envelope.warned,
        "r": [[r.address, list(r.notify) if r.notify is not None else None, r.orcpt,
               r.state, r.attempts, r.last_reply] for r in envelope.recipients],
    })


def decode(raw: bytes) -> Envelope:
    try:
        d = _unpackb(raw)
        # Positional, in Envelope's field order (keywords cost a visible share per message).
        envelope = Envelope(
            d["i"], d["s"],
            [Recipient(a, tuple(n) if type(n) is list else _not_a_list(n), o, s, t, lr) for a, n, o, s, t, lr in d["r"]],
            d["z"], d["a"], d["n"], d["p"], d["t"], d["R"], d["E"], d["B"], d["U"], d["c"],
            d.get("W", False),  # (absent in records before it)
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptRecord(f"{type(exc).__name__}: {exc}") from None
    wrong = _wrong_field(envelope)
    if wrong is not None:
        raise CorruptRecord(f"field {wrong} has the wrong type or value")
    return envelope


def decode_queued(raw: bytes) -> tuple[float, list[tuple[str, str]]]:
    """What the spool's indexes keep of an encoded envelope, without the rest of decode's
    work: its next attempt and each recipient's (address, state), checked as decode checks
    them (the spool's deletes need no more). CorruptRecord when they do not hold."""
    try:
        d = _unpackb(raw)
        when, recipients = d["n"], [(r[0], r[3]) for r in d["r"]]
    except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise CorruptRecord(f"{type(exc).__name__}: {exc}") from None
    if type(when) not in _NUMBER or not 0 <= when < MAX_TIME:
        raise CorruptRecord("field next_attempt has the wrong type or value")
    if not recipients or not all([type(a) is str and s in RECIPIENT_STATES for a, s in recipients]):
        raise CorruptRecord("field recipients has the wrong type or value")
    return when, recipients


def _not_a_list(notify: object) -> None:
    if notify is not None:  # msgpack gives lists; a string here would pass as a tuple of letters
        raise TypeError(f"NOTIFY is {type(notify).__name__}, not a list")
    return None


_NUMBER = (int, float)
MAX_TIME = 1e12  # unix seconds (year 33658); NaN and infinities fail the range check too
_TEXT_OR_NONE = (str, type(None))
# Exact types (a bool is no int here: one flipped msgpack byte turns 0x01 into True).
_FIELDS = (("id", (str,)), ("sender", (str,)), ("size", (int,)), ("arrival", _NUMBER),
           ("next_attempt", _NUMBER), ("priority", (int,)), ("attempts", (int,)), ("ret", _TEXT_OR_NONE),
           ("envid", _TEXT_OR_NONE), ("body_type", _TEXT_OR_NONE), ("smtputf8", (bool,)), ("client", (dict,)),
           ("warned", (bool,)))
_VALUES = operator.attrgetter(*(name for name, _ in _FIELDS))
# Every combination of field types an encoded envelope can have (64): the check of a
# decoded one is one set lookup, in C (the scheduler and each delivery decode per message).
_TYPES_OK = frozenset(itertools.product(*(kinds for _, kinds in _FIELDS)))


def _wrong_field(e: Envelope) -> str | None:
    """The first field whose type (or state) no encoded envelope can have; None if all fit."""
    if tuple(map(type, _VALUES(e))) not in _TYPES_OK:
        return next(name for name, kinds in _FIELDS if type(getattr(e, name)) not in kinds)
    if not 0 <= e.next_attempt < MAX_TIME:  # a flipped exponent: the due index's be64 milliseconds cannot hold it
        return "next_attempt"
    if not 0 <= e.arrival < MAX_TIME:
        return "arrival"
    if not e.recipients:
        return "recipients"
    for r in e.recipients:
        if (type(r.address) is not str or r.state not in RECIPIENT_STATES or type(r.attempts) is not int
                or type(r.orcpt) not in _TEXT_OR_NONE or type(r.last_reply) not in _TEXT_OR_NONE
                or (r.notify is not None and not all(type(n) is str for n in r.notify))):
            return "recipients"
    return None
