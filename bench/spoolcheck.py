"""Time of the spool checks at a given fill: what `mta serve` runs before it forks, and
`mta queue check`'s full walk.

    PYTHONPATH=.:queue python3 bench/spoolcheck.py --messages 100000 [--spool DIR] [--runs 3]

Fills a spool directly with LmdbBackend.commit (batches of 25, 1 KiB bodies, 2
recipients at 2 of 50 domains, deferred), unless DIR holds one already, then times
check_spool at start (the pre-fork check) and the full walk, the median of `--runs`
each, and the LMDB open that follows the start-time check (the upgrade or recount, when
one is due, runs in it). The page cache is warm after the fill: a cold start reads the
same pages from disk.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time

from mtaqueue import check
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.ids import new_id
from mtaqueue.records import Envelope, NewMessage, Recipient

BATCH = 25
BODY = b"Subject: bench\r\n\r\n" + b"x" * (1024 - 18)


def fill(path: str, messages: int) -> None:
    spool = LmdbBackend(path, 64 * 1024 * 1024 * 1024)
    now = time.time()
    done = 0
    try:
        while done < messages:
            batch = []
            for k in range(min(BATCH, messages - done)):
                n = done + k
                recipients = [Recipient(f"u{n}@d{(n + i) % 50}.example", None, None, "deferred") for i in range(2)]
                envelope = Envelope(new_id(now - messages + n), "s@client.example", recipients, len(BODY),
                                    now - messages + n, now + 3600)
                batch.append(NewMessage(envelope, BODY))
            spool.commit(batch)
            done += len(batch)
            if done % 20000 < BATCH:
                print(f"filled {done}/{messages}", file=sys.stderr)
    finally:
        spool.close()


def timed(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--spool", help="a spool directory to fill (kept) or to reuse when it holds one")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.spool or os.path.join(scratch, "spool")
        if not os.path.exists(os.path.join(path, "data.mdb")):
            fill(path, args.messages)
        size = os.path.getsize(os.path.join(path, "data.mdb"))
        print(f"spool {path}: {size / 1e6:.0f} MB")
        quick = "full" in inspect.signature(check.check_spool).parameters  # this checkout has a start-time mode
        if quick:
            start = timed(lambda: check.check_spool(path, full=False), args.runs)
            print(f"start-time check (before fork): {start:.3f} s")
        whole = timed(lambda: check.check_spool(path), args.runs)
        print(f"full walk (mta queue check{'' if quick else '; also the start-time check of this checkout'}): "
              f"{whole:.3f} s")
        opened = timed(lambda: LmdbBackend(path, 64 * 1024 * 1024 * 1024).close(), args.runs)
        print(f"LMDB open after it: {opened:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
