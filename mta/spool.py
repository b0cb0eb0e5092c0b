"""The spool as an mta process opens it: the LMDB backend, damaged records reported.

The backend moves an envelope that does not decode to its corrupt table and calls
`on_corrupt` once; here that becomes mta_queue_corrupt_records_total and one
`event=corrupt_record msgid=...` line, in whichever process met the record.
"""

from __future__ import annotations

from mta import logs, metrics
from mta.config import QueueConfig
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import MessageId


def open_spool(queue: QueueConfig) -> LmdbBackend:
    """After fork only: an LMDB handle must not cross one. A pending recount (after a
    quarantine) is left to the next `mta serve`, whose master runs it before forking: a
    worker recounting a big queue would start late, and the counts the others read
    would be partial meanwhile."""
    return LmdbBackend(queue.path, queue.max_size_bytes, on_corrupt=report_corrupt, recount=False)


def report_corrupt(msgid: MessageId, error: str, moved: bool) -> None:
    metrics.QUEUE_CORRUPT_RECORDS.inc()
    logs.event("corrupt_record", msgid=msgid, error=error,
               action="moved to the corrupt table, not delivered" if moved else "left in place, skipped")
