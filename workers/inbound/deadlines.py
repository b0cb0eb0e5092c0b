"""A session's two deadlines: the whole session and the whole DATA/BDAT transfer.

command_timeout_seconds and data_timeout_seconds restart with every byte, so a client
trickling one byte at a time meets neither. These two never restart:
session_timeout_seconds runs from the connection, data_total_timeout_seconds from our
354 (or the first BDAT chunk) to the end of the content. Deadlines rather than a
minimum transfer rate: a deadline bounds how long a client holds a connection slot and
its share of the memory budget whatever it does, and an operator can reason about one
number (a minimum rate still lets a client hold max_message_bytes / rate seconds).

Pure: no I/O, no clock reads (pass `now`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.config import LimitsConfig


@dataclass(slots=True)
class Deadlines:
    session_end: float
    transfer_seconds: float
    transfer_end: float | None = None  # while a transfer runs

    @classmethod
    def start(cls, limits: LimitsConfig, now: float) -> Deadlines:
        return cls(now + limits.session_timeout_seconds, limits.data_total_timeout_seconds)

    def transfer(self, active: bool, now: float) -> None:
        """Whether the connection is reading content after this input: starts or ends the transfer's clock."""
        if active != (self.transfer_end is not None):
            self.transfer_end = now + self.transfer_seconds if active else None

    @property
    def next(self) -> float:
        """The earliest deadline."""
        return self.session_end if self.transfer_end is None else min(self.session_end, self.transfer_end)

    def expired(self, now: float) -> str | None:
        """The deadline passed, named as in mta_inbound_rejected_total; None while both are ahead."""
        if self.transfer_end is not None and now >= self.transfer_end:
            return "data_total_timeout"
        if now >= self.session_end:
            return "session_timeout"
        return None
