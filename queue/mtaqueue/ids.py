"""Message ids: one NewType, one form (13 upper-case hex digits of time + 8 of randomness), sortable by arrival.

The time part (microseconds since the epoch) makes listings read in arrival order;
the random part keeps ids unique across processes without coordination (the random
module reseeds in every forked child; ids are unique, not secret, and the spool refuses
a duplicate id anyway).
"""

from __future__ import annotations

import random
import time
from typing import NewType

MessageId = NewType("MessageId", str)


def new_id(now: float | None = None) -> MessageId:
    micros = int((time.time() if now is None else now) * 1_000_000)
    return MessageId(f"{micros:013X}{random.getrandbits(32):08X}")


_DIGITS = "0123456789ABCDEF"


def is_id(text: str) -> bool:
    # (strip() leaves nothing iff every character is a digit: one pass in C, per id of every New)
    return len(text) == 21 and not text.strip(_DIGITS)
