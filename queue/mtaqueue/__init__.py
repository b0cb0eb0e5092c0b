"""mtaqueue: the durable message spool (LMDB) behind a small backend interface."""

from mtaqueue.backend import QueueBackend, QueueError, QueueFull, QueueIOError, QueueStats
from mtaqueue.ids import MessageId, new_id
from mtaqueue.records import Envelope, NewMessage, Recipient

__all__ = [
    "Envelope", "MessageId", "NewMessage", "QueueBackend", "QueueError", "QueueFull",
    "QueueIOError", "QueueStats", "Recipient", "new_id",
]
