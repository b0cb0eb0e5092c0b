"""Spools of chosen messages for the queue view tests: ids with a chosen arrival (the
id's time part), recipients in chosen states, written to a real LMDB spool."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import MessageId
from mtaqueue.records import Envelope, NewMessage, Recipient

BODY = b"Subject: t\r\n\r\nbody\r\n"
MIB = 1024 * 1024


def msgid(arrival: float, n: int) -> MessageId:
    """The id of a message that arrived at `arrival` (n: its random part)."""
    return MessageId(f"{int(arrival * 1_000_000):013X}{n:08X}")


def message(arrival: float, n: int, rcpts: Sequence[tuple[str, str]], sender: str = "s@client.test",
            next_attempt: float | None = None) -> NewMessage:
    """rcpts: (address, state) pairs."""
    envelope = Envelope(msgid(arrival, n), sender, [Recipient(a, state=s) for a, s in rcpts], len(BODY),
                        arrival, next_attempt if next_attempt is not None else arrival + 3600)
    return NewMessage(envelope, BODY)


def fill(backend: LmdbBackend, messages: Iterable[NewMessage], batch: int = 1000) -> None:
    pending: list[NewMessage] = []
    for m in messages:
        pending.append(m)
        if len(pending) == batch:
            backend.commit(pending)
            pending = []
    if pending:
        backend.commit(pending)


def spool(path: Path, messages: Iterable[NewMessage], max_bytes: int = 256 * MIB) -> LmdbBackend:
    backend = LmdbBackend(str(path), max_bytes)
    fill(backend, messages)
    return backend
