#!/usr/bin/env python3
"""Fill a stopped mta's spool with N deferred messages, straight into LMDB (no SMTP).

    python3 bench/queuefill.py --spool DIR --max-size-bytes B --messages 100000 \\
        --domain scale.test --tag r1 [--due-now 100] [--json]

Owns `bench/run --queue-scale`'s fill: a queue that grew for an hour while one
destination deferred everything, made in seconds instead of the hours SMTP would take
at a million. Each message is what inbound would have stored for a 1 KiB loadgen
message (our Received header, From/To/Subject/Message-ID, loadgen's body of --size
bytes) to `u<i>@DOMAIN`, plus an `X-Bench-Fill: TAG-<i>` header the counting sink
reads to tell each message apart (every one exactly once). Its one recipient is
`deferred` after one attempt (a 451 reply recorded), the envelope says attempts 1.

Times: arrivals spread evenly over the last --span-seconds (ids from
mtaqueue.ids.new_id at each arrival, so the spool is in arrival order as a real one
is); next attempts spread evenly from --retry-after-seconds to twice that from now
(none comes due during a run), except the --due-now oldest messages, whose next
attempt is already past: a restarted scheduler has something to dispatch at once.

Written with mtaqueue's LmdbBackend.commit in batches of --batch (one transaction
each), so whatever indexes and counts the spool keeps are kept as inbound keeps
them. mta must not be running on this spool. Progress on stderr; with --json the
last stdout line is the result. mtaqueue is imported from this checkout
(bench/../queue).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Final

from loadgen import build_body
from procs import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "queue"))  # this checkout's mtaqueue, not an installed one
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import new_id
from mtaqueue.records import Envelope, NewMessage, Recipient

SENDER: Final = "bench@client.test"
DEFER_REPLY: Final = "451 4.4.1 destination unreachable (bench/queuefill.py)"
PROGRESS_SECONDS: Final = 2.0


def fill_message(i: int, tag: str, header: str, domain: str, arrival: float, next_attempt: float,
                 body: bytes, date: str) -> NewMessage:
    """One stored message: envelope (one deferred recipient) and body as inbound stores it."""
    msgid = new_id(arrival)
    rcpt = f"u{i}@{domain}"
    head = (f"Received: from client.test ([127.0.0.1])\r\n"
            f"\tby mta.bench (mta) with ESMTP id {msgid}\r\n\tfor <{rcpt}>;\r\n\t{date}\r\n"
            f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: queue-scale {tag}-{i}\r\n"
            f"Message-ID: <{tag}-{i}@fill.bench>\r\n{header}: {tag}-{i}\r\n\r\n").encode("ascii")
    data = head + body
    envelope = Envelope(
        id=msgid, sender=SENDER, size=len(data), arrival=arrival, next_attempt=next_attempt,
        attempts=1, recipients=[Recipient(rcpt, state="deferred", attempts=1, last_reply=DEFER_REPLY)],
        client={"ip": "127.0.0.1", "port": 0, "helo": "client.test", "listener": "127.0.0.1:25",
                "protocol": "ESMTP", "tls": None, "user": None})
    return NewMessage(envelope, data)


def fill(spool: Path, max_size_bytes: int, messages: int, *, domain: str, tag: str, header: str, size: int,
         due_now: int, span_seconds: float, retry_after_seconds: float, batch: int,
         quiet: bool = False) -> dict:
    """Write `messages` deferred messages; what was written, and how fast."""
    body = build_body(size)
    started = time.monotonic()
    now = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now))
    step = span_seconds / max(messages, 1)
    retry_step = retry_after_seconds / max(messages, 1)
    backend = LmdbBackend(str(spool), max_size_bytes)
    last_note = started
    written = 0
    try:
        while written < messages:
            chunk = []
            for i in range(written, min(written + batch, messages)):
                arrival = now - span_seconds + i * step
                next_attempt = (now - 1.0 if i < due_now
                                else now + retry_after_seconds + i * retry_step)
                chunk.append(fill_message(i, tag, header, domain, arrival, next_attempt, body, date))
            backend.commit(chunk)
            written += len(chunk)
            if not quiet and (time.monotonic() - last_note >= PROGRESS_SECONDS or written == messages):
                last_note = time.monotonic()
                elapsed = last_note - started
                print(f"queuefill: {written}/{messages} messages in {elapsed:.1f}s "
                      f"({written / max(elapsed, 1e-9):.0f}/s)", file=sys.stderr, flush=True)
        stats = backend.stats()
    finally:
        backend.close()
    seconds = time.monotonic() - started
    return {"messages": written, "seconds": seconds, "per_second": written / max(seconds, 1e-9),
            "domain": domain, "tag": tag, "header": header, "size": size, "due_now": min(due_now, messages),
            "span_seconds": span_seconds, "next_attempt_from": now + retry_after_seconds,
            "next_attempt_to": now + 2 * retry_after_seconds, "batch": batch,
            "stored_bytes": stats.used_bytes, "map_used_bytes": stats.map_used_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spool", required=True, type=Path, help="[queue] path of a stopped mta")
    p.add_argument("--max-size-bytes", required=True, type=int, help="its [queue] max_size_bytes")
    p.add_argument("--messages", required=True, type=int)
    p.add_argument("--domain", default="scale.test")
    p.add_argument("--tag", default="fill", help="prefix of each message's header value (unique per fill)")
    p.add_argument("--header", default="X-Bench-Fill", help="the header that tells messages apart")
    p.add_argument("--size", type=int, default=1024, help="body bytes, as loadgen's --size")
    p.add_argument("--due-now", type=int, default=0,
                   help="this many (the oldest) are due at once; the rest come due hours later")
    p.add_argument("--span-seconds", type=float, default=3600.0, help="arrivals spread over this past")
    p.add_argument("--retry-after-seconds", type=float, default=7200.0,
                   help="next attempts spread from this far ahead to twice that")
    p.add_argument("--batch", type=int, default=2000, help="messages per transaction")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout's last line")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    if a.messages < 1 or a.batch < 1 or a.size < 0 or a.due_now < 0:
        p.error("--messages and --batch must be >= 1, --size and --due-now >= 0")
    result = fill(a.spool, a.max_size_bytes, a.messages, domain=a.domain, tag=a.tag, header=a.header, size=a.size,
                  due_now=a.due_now, span_seconds=a.span_seconds,
                  retry_after_seconds=a.retry_after_seconds, batch=a.batch, quiet=a.quiet)
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{result['messages']} messages in {result['seconds']:.1f}s "
              f"({result['per_second']:.0f}/s), {result['stored_bytes']} bytes stored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
