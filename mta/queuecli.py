"""The `mta queue` commands that read or change messages: list, show, shape, and the
operations retry, hold, release, delete.

While the server runs they go through its admin API (mta/adminclient.py), so changes
take effect at once in the scheduler and each request is logged there. When nothing
answers on [control] listen (the server is stopped, or its control process is not up
yet) they do what they did before the API: read the spool directly (LMDB allows readers
across processes) and send changes to the scheduler's socket, or apply them to the
spool when that does not answer either (mta/queuebulk.py, in batches). Output and exit
codes are the same either way.

A listing is streamed in both cases (mta/queuepages.py: a batch at a time, constant
memory), written as it comes; `mta queue shape` reads the spool's index directly
(mta/queueshape.py) whether or not the server runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import typing
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mta import adminclient, messages, queuebulk, queueops, queuepages, queueshape, queueview
from mta.adminclient import ControlError
from mta.config import Config
from mtaqueue.backend import QueueError

if TYPE_CHECKING:
    from mtaqueue.backend_lmdb import LmdbBackend


def run(cfg: Config, args: argparse.Namespace) -> int:
    try:
        return int(args.action(cfg, args))
    except BrokenPipeError:  # `mta queue list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush must not fail)
        return 0
    except ControlError as exc:
        print(f"mta queue: {exc}", file=sys.stderr)
        return 1
    except queuepages.SelectionError as exc:
        print(f"mta queue: {exc}", file=sys.stderr)
        return 2
    except QueueError as exc:  # the spool read directly (the server is stopped)
        print(f"mta queue: {cfg.queue.path}: {exc}", file=sys.stderr)
        return 1


def open_spool(cfg: Config) -> LmdbBackend | None:
    from mta.spool import open_spool  # here: it loads the metrics, which the API path never needs
    if not os.path.isdir(cfg.queue.path):
        return None
    return open_spool(cfg.queue)


# --- list ----------------------------------------------------------------------------------

def queue_list(cfg: Config, args: argparse.Namespace) -> int:
    selection = queuepages.Selection.of(args.domain, args.state, args.sender, args.recipient)
    entries: Iterator[dict[str, Any]] = selected(cfg, selection)
    if args.limit is not None:
        entries = itertools.islice(entries, args.limit)
    if args.json:
        for piece in queueview.json_array(entries):
            sys.stdout.write(piece)
        print()
    else:
        _write_text(cfg, selection, entries, args.limit)
    sys.stdout.flush()  # (a closed pipe shows here, not at the exit)
    return 0


def selected(cfg: Config, selection: queuepages.Selection) -> Iterator[dict[str, Any]]:
    """The selected messages in their envelope_json form, from the API or else the spool."""
    streamed = adminclient.listing(cfg, urllib.parse.urlencode(selection.filters))
    if streamed is not None:
        yield from streamed
        return
    spool = open_spool(cfg)  # the server is stopped: the spool itself
    if spool is None:
        return
    active = adminclient.ask_scheduler(cfg, messages.ActiveQuery(), messages.ActiveJobs)
    for batch in queuepages.batches(spool, selection, active.active if active is not None else {}):
        yield from map(queueview.envelope_json, batch)


def _write_text(cfg: Config, selection: queuepages.Selection, entries: Iterator[dict[str, Any]],
                limit: int | None) -> None:
    count = size = 0
    for e in entries:
        if not count:
            print(queueview.TEXT_HEADER)
        print("\n".join(queueview.text_lines(e)))
        count, size = count + 1, size + e["size"]
    if not count:
        filters = " ".join(f"--{name} {value}" for name, value in selection.filters.items())
        print(f"no queued message matches {filters} ({cfg.queue.path})" if filters
              else f"queue is empty ({cfg.queue.path})")
        return
    more = f" (--limit {limit}: there may be more)" if count == limit else ""
    print(f"-- {count} message(s), {size} bytes{more}")


# --- show, shape -----------------------------------------------------------------------------

def queue_show(cfg: Config, args: argparse.Namespace) -> int:
    from mtaqueue.ids import MessageId, is_id
    path = f"/api/queue/{urllib.parse.quote(args.id, safe='')}" + ("/body" if args.body else "")
    answer = adminclient.request(cfg, "GET", path, expect=(200, 404))
    found: Any = None
    if answer is not None:
        if answer[0] == 200:
            found = answer[1] if args.body else json.loads(answer[1])
    else:  # the server is stopped: the spool itself
        spool = open_spool(cfg)
        msgid = MessageId(args.id.upper())
        envelope = spool.envelope(msgid) if spool is not None and is_id(msgid) else None
        if envelope is not None:
            found = (spool.body(msgid) or b"") if args.body else queueview.envelope_json(envelope)
    if found is None:
        print(f"mta: no message {args.id} in {cfg.queue.path}", file=sys.stderr)
        return 1
    if args.body:
        sys.stdout.buffer.write(found)
        sys.stdout.buffer.flush()
        return 0
    json.dump(found, sys.stdout, indent=1)
    print()
    return 0


def queue_shape(cfg: Config, args: argparse.Namespace) -> int:
    spool = open_spool(cfg)
    shape = queueshape.count(spool.by_destination() if spool is not None else (), time.time())
    if args.json:
        json.dump(queueshape.as_json(shape), sys.stdout, indent=1)
        print()
    else:
        print("\n".join(queueshape.table(shape)))
    return 0


# --- retry, hold, release, delete ------------------------------------------------------------

def queue_operation(cfg: Config, args: argparse.Namespace) -> int:
    if not (args.ids or args.domain or args.all):
        print(f"mta: queue {args.op}: name message IDs, --domain D or --all", file=sys.stderr)
        return 2
    domain = queueops.destination_of("@" + args.domain) if args.domain else None  # as the spool's index has it
    ids = [i.upper() for i in args.ids]
    command = messages.QueueCommand(typing.cast(messages.QueueOp, args.op), tuple(ids), domain, args.all)

    def progress(done: int, total: int) -> None:
        print(queuebulk.progress_line(args.op, done, total), file=sys.stderr, flush=True)

    count = adminclient.command(cfg, args.op, {"ids": ids, "domain": domain, "all": args.all}, progress)
    if count is None:  # stopped, or 503 (the control process runs, the scheduler not yet): as before the API
        result = adminclient.ask_scheduler(cfg, command, messages.CommandResult, progress)
        count = result.count if result is not None else None
    if count is not None:
        print(f"{args.op}: {count} message(s) (applied by the running scheduler)")
        return 0 if count or not args.ids else 1
    spool = open_spool(cfg)
    count = queuebulk.apply(spool, command, time.time(), time.monotonic, progress) if spool is not None else 0
    print(f"{args.op}: {count} message(s) (server not running: applied to the spool)")
    return 0 if count or not args.ids else 1
