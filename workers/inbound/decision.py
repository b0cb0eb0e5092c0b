"""What an inbound check decides: the reply to send and, when it refuses, why.

A check returns a Decision; the adapter answers with its `reply` and never reads the
code to learn why: `reason` says it ("" when accepted; else the `reason` label of
mta_inbound_rejected_total, or for AUTH the `result` of mta_auth_attempts_total).
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.smtp.replies import Reply


@dataclass(frozen=True, slots=True)
class Decision:
    reply: Reply
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return not self.reason
