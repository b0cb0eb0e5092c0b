"""The admin API's routes: the answer to each /api/ request the guard let through.

  GET  /api/queue          queued messages, oldest first, as `mta queue list --json`.
                           Query: domain, state (ready|deferred|held|active), sender,
                           recipient (mta/queuepages.py's filters), limit (1..MAX_PAGE),
                           cursor (a next_cursor). With limit: one page, {"messages":
                           [...], "next_cursor": str or null}; a page reads at most
                           PAGE_SCAN messages, so with filters it may hold fewer than
                           `limit` and still have a next_cursor (null: the end).
                           Without limit: the JSON array, streamed (chunked) as it is read.
  GET  /api/queue/summary  queued recipients per destination and state (the spool's
                           counts, O(destinations)); /api/domains is its older name
  GET  /api/queue/ID       one message (404 for an ID that is not one: mtaqueue.ids)
  GET  /api/queue/ID/body  its stored bytes
  POST /api/queue/OP       OP = retry | hold | release | delete; body {"ids": [...]},
                           {"domain": "d"} or {"all": true} (true itself: "false" or 1 is a
                           400, never every message); applied by the scheduler:
                           {"op", "count"}. With Accept: application/x-ndjson, a line
                           {"done", "total"} for each progress report of the scheduler
                           as it comes, then {"op", "count"} (or {"error"}).

The event loop never reads more than one message of the spool: pages and streams are
read and encoded in a worker thread (asyncio.to_thread), a bounded chunk per step, and a
stream takes its next step only when the client has taken the last (back-pressure), so
/metrics and /healthz answer while a listing of any size streams. Bad parameters: 400
with {"error": ...} saying what to change.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import typing
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final

from mta import messages, queueops, queuepages, queueview
from mta.messages import Message
from mta.queuepages import Selection, SelectionError
from mtaqueue.backend import QueueBackend
from mtaqueue.ids import MessageId, is_id

JSON: Final = b"application/json"
NDJSON: Final = b"application/x-ndjson"
MAX_PAGE: Final = 5000  # messages in one page (limit)
PAGE_SCAN: Final = 10000  # messages one page request reads at most
CHUNK_MESSAGES: Final = 200  # messages per chunk of a streamed listing
LISTING_KEYS: Final = ("limit", "cursor", "domain", "state", "sender", "recipient")

Ask = Callable[[Message], Awaitable[Message | None]]  # one answer of the scheduler; None: not reachable
Converse = Callable[[Message], AsyncIterator[Message]]  # its answers until the last (progress, then a result)


@dataclass(frozen=True, slots=True)
class Reply:
    status: bytes
    body: bytes | AsyncIterator[bytes]  # an iterator is sent as it comes (chunked)
    kind: bytes = JSON
    headers: bytes = b""  # extra header lines, each ending in CRLF


def json_reply(status: bytes, value: object) -> Reply:
    return Reply(status, json.dumps(value, indent=1).encode() + b"\n")


class AdminApi:
    def __init__(self, spool: QueueBackend, ask: Ask, converse: Converse) -> None:
        self.spool = spool
        self._ask = ask
        self._converse = converse

    async def answer(self, method: bytes, path: str, query: str, headers: dict[bytes, bytes],
                     payload: bytes) -> Reply:
        if method == b"GET" and path == "/api/queue":
            try:
                selection, limit, after = listing_query(query)
            except SelectionError as exc:
                return json_reply(b"400 Bad Request", {"error": str(exc)})
            active = await self._active()
            if limit is None:
                return Reply(b"200 OK", _stream(_listing_chunks(self.spool, selection, active, after)))
            page = await asyncio.to_thread(_page_json, self.spool, selection, active, after, limit)
            return Reply(b"200 OK", page)
        if method == b"GET" and path in ("/api/queue/summary", "/api/domains"):
            counts = await asyncio.to_thread(self.spool.destination_counts)
            return json_reply(b"200 OK", queueview.domain_summary(counts))
        parts = path.split("/")  # "", "api", "queue", ID[, "body"]
        if method == b"GET" and parts[2:3] == ["queue"] and (len(parts) == 4 or parts[4:] == ["body"]):
            return self._message(MessageId(parts[3].upper()), body=len(parts) == 5)
        op = path.removeprefix("/api/queue/")
        if method == b"POST" and op in messages.QUEUE_OPS:
            return await self._operation(typing.cast(messages.QueueOp, op), payload,
                                         NDJSON in headers.get(b"accept", b""))
        return json_reply(b"404 Not Found", {"error": "no such endpoint"})

    async def _active(self) -> queuepages.Active:
        """The recipients in a session now (an empty map while the scheduler is down)."""
        answer = await self._ask(messages.ActiveQuery())
        return answer.active if isinstance(answer, messages.ActiveJobs) else {}

    def _message(self, msgid: MessageId, body: bool) -> Reply:
        # Only a well-formed id reaches LMDB: an empty or overlong key is an error there, not a miss.
        if is_id(msgid) and body and (data := self.spool.body(msgid)) is not None:
            return Reply(b"200 OK", data, b"application/octet-stream")
        if is_id(msgid) and not body and (envelope := self.spool.envelope(msgid)) is not None:
            return json_reply(b"200 OK", queueview.envelope_json(envelope))
        return json_reply(b"404 Not Found", {"error": "no such message"})

    async def _operation(self, op: messages.QueueOp, payload: bytes, progress: bool) -> Reply:
        try:
            which = json.loads(payload or b"{}")
        except ValueError:
            return json_reply(b"400 Bad Request", {"error": "the body must be JSON"})
        if (not isinstance(which, dict) or not (which.get("ids") or which.get("domain") or which.get("all"))
                or not isinstance(which.get("domain") or "", str) or not isinstance(which.get("all", False), bool)):
            return json_reply(b"400 Bad Request", {"error": 'name {"ids": [...]}, {"domain": "d"} or {"all": true}'})
        ids = which.get("ids") or []
        bad = [i for i in ids if not isinstance(i, str) or not is_id(i.upper())] if isinstance(ids, list) else [ids]
        if bad:
            return json_reply(b"400 Bad Request", {"error": f"not a message id: {str(bad[0])[:50]!r}"})
        domain = queueops.destination_of("@" + which["domain"]) if which.get("domain") else None
        answers = self._converse(messages.QueueCommand(op, tuple(i.upper() for i in ids), domain,
                                                       bool(which.get("all"))))
        first = await anext(answers, None)
        if first is None:
            return json_reply(b"503 Service Unavailable", {"error": "the scheduler is not running"})
        if progress:
            return Reply(b"200 OK", _progress_lines(op, first, answers), NDJSON)
        last = first
        async for last in answers:
            pass
        if not isinstance(last, messages.CommandResult):
            return json_reply(b"503 Service Unavailable", {"error": GONE})
        return json_reply(b"200 OK", {"op": op, "count": last.count})


GONE: Final = "the scheduler stopped answering before the end: see its log, then look at the queue"


def listing_query(query: str) -> tuple[Selection, int | None, MessageId | None]:
    """GET /api/queue's parameters: the filters, the page size (None: stream them all),
    the position to start after. SelectionError says what is wrong."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                       max_num_fields=len(LISTING_KEYS))
    except ValueError:
        raise SelectionError(f"the query takes name=value pairs joined by &, each once: {', '.join(LISTING_KEYS)}") \
            from None
    params = dict(pairs)
    unknown = [name for name, _ in pairs if name not in LISTING_KEYS]
    if unknown or len(params) < len(pairs):
        raise SelectionError(f"unknown or repeated parameter {(unknown or [pairs[-1][0]])[0][:40]!r}: "
                             f"GET /api/queue takes {', '.join(LISTING_KEYS)}, each once")
    limit = None
    if "limit" in params:
        text = params["limit"]
        limit = int(text) if text.isdigit() and len(text) <= 6 else 0
        if not 1 <= limit <= MAX_PAGE:
            raise SelectionError(f"limit must be a whole number from 1 to {MAX_PAGE}")
    selection = Selection.of(params.get("domain"), params.get("state"), params.get("sender"),
                             params.get("recipient"))
    if "cursor" not in params:
        return selection, limit, None
    cursor_selection, after = queuepages.decode_cursor(params["cursor"])
    given = selection.filters
    if any(cursor_selection.filters.get(name) != value for name, value in given.items()):
        raise SelectionError("the cursor belongs to a listing with other filters: repeat that listing's "
                             "filters (or none) with its cursor")
    return cursor_selection, limit, after


def _page_json(spool: QueueBackend, selection: Selection, active: queuepages.Active, after: MessageId | None,
               limit: int) -> bytes:
    """One page (in a worker thread)."""
    page = queuepages.read_page(spool, selection, active, after, limit, PAGE_SCAN)
    cursor = queuepages.encode_cursor(selection, page.after) if page.after is not None else None
    return json.dumps({"messages": [queueview.envelope_json(e) for e in page.envelopes], "next_cursor": cursor},
                      indent=1).encode() + b"\n"


def _listing_chunks(spool: QueueBackend, selection: Selection, active: queuepages.Active,
                    after: MessageId | None) -> Iterator[bytes]:
    """The listing as json.dumps(list, indent=1) + newline, CHUNK_MESSAGES messages a chunk."""
    entries = (queueview.envelope_json(e) for batch in queuepages.batches(spool, selection, active, after)
               for e in batch)
    pieces = itertools.chain(queueview.json_array(entries), ["\n"])
    while chunk := "".join(itertools.islice(pieces, CHUNK_MESSAGES)):
        yield chunk.encode()


async def _stream(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Each step of `chunks` in a worker thread: the event loop stays free meanwhile."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


async def _progress_lines(op: str, first: Message, answers: AsyncIterator[Message]) -> AsyncIterator[bytes]:
    message: Message | None = first
    while isinstance(message, messages.CommandProgress):
        yield json.dumps({"done": message.done, "total": message.total}).encode() + b"\n"
        message = await anext(answers, None)
    if isinstance(message, messages.CommandResult):
        yield json.dumps({"op": op, "count": message.count}).encode() + b"\n"
    else:
        yield json.dumps({"error": GONE}).encode() + b"\n"
