"""`mta queue check` and `mta queue salvage OUT`: mtaqueue/check.py, told to an operator.

check: the same check `mta serve` runs before it forks (the server may be running);
what is wrong, one line each, and the corrupt table; exit 0 when the spool is sound,
1 on any problem. salvage: with the server stopped (it takes the spool lock), copy
every readable message into a new spool directory; exit 0 when OUT was written (the
report says what could not be copied), 1 when nothing could be.
"""

from __future__ import annotations

import os
import sys

from mta.config import Config
from mta.queueview import iso
from mta.master.listeners import ServeError
from mta.serve import lock_spool
from mtaqueue import check
from mtaqueue.lmdbfile import Damage

SHOWN = 50  # lines of one kind printed before "... and N more"


def run_check(cfg: Config) -> int:
    report = check.check_spool(cfg.queue.path)
    if not os.path.exists(report.path):
        print(f"no spool file yet at {report.path}")
        return 0
    print(f"{report.path}: {report.file_bytes} bytes, {report.page_bytes}-byte pages, last page "
          f"{report.last_page}, transaction {report.txnid}")
    print(f"read {report.messages} envelope(s) in {report.seconds:.2f} s")
    _lines("DAMAGED", report.damage)
    _lines("envelope does not decode (moved to the corrupt table when next read)",
           [f"{msgid}: {error}" for msgid, error in report.undecodable])
    _lines("envelope without a body", report.without_body)
    _lines("in the corrupt table (not delivered)",
           [f"{msgid}: moved {iso(at)}: {error}" for msgid, error, at in report.quarantined])
    if report.ok:
        print("OK")
        return 0
    if report.fatal:
        print("the file is damaged: mta serve refuses to start on it. Stop the server, run "
              "`mta queue salvage OUT`, set [queue] path to OUT and start again.")
    else:
        print("the file is sound, some messages are not: they are listed above and not delivered; "
              "`mta queue salvage OUT` copies the readable ones into a new spool without them.")
    return 1


def run_salvage(cfg: Config, out: str) -> int:
    source = os.path.abspath(cfg.queue.path)
    if os.path.abspath(out) == source:
        print("mta queue salvage: OUT must be a new directory, not the spool itself", file=sys.stderr)
        return 1
    if not os.path.exists(os.path.join(source, check.DATA_FILE)):
        print(f"mta queue salvage: no spool file at {source}", file=sys.stderr)
        return 1
    try:
        lock_fd = lock_spool(source)  # no server may write while we read its file
    except ServeError as exc:
        print(f"mta queue salvage: {exc}", file=sys.stderr)
        return 1
    try:
        os.makedirs(out, mode=0o700, exist_ok=True)
        report = check.salvage(source, out, cfg.queue.max_size_bytes)
    except (Damage, FileExistsError, OSError) as exc:
        print(f"mta queue salvage: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(lock_fd)
    _lines("damage met", report.damage)
    _lines("not copied", [f"{msgid}: {why}" for msgid, why in report.skipped])
    print(f"copied {report.copied} message(s), {report.copied_bytes} bytes of message data, into {out}")
    lost = len(report.skipped) + report.unaccounted
    if report.counted is None:
        print("the spool's record of its envelope table is lost: how many messages it held is unknown")
    elif report.unaccounted:
        print(f"{report.unaccounted} more envelope(s) counted by the spool are on no readable page")
    print(f"{lost} message(s) not copied" if lost else "every message was copied")
    print(f"next: set [queue] path = {out!r} and start mta; keep {source} until its mail is delivered")
    return 0


def _lines(title: str, lines: list[str]) -> None:
    for line in lines[:SHOWN]:
        print(f"{title}: {line}")
    if len(lines) > SHOWN:
        print(f"{title}: ... and {len(lines) - SHOWN} more")
