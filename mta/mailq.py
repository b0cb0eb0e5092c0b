"""`mailq` (`mta-sendmail -bp`): the queue in Postfix mailq's layout, which scripts parse.

    -Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------
    18C2B3A4F5E6D7A8B9C0D*    293 Mon Dec  7 03:16:07  alice@example.com
                           (connect to mx.example.net[192.0.2.1]:25: Connection refused)
                                             bob@example.net

    -- 0 Kbytes in 1 Request.

Byte for byte the columns of Postfix 3.7's `postqueue -p` (tests/mta/test_mailq.py holds
one captured from it): the id with `*` when a recipient is being delivered, `!` when
all its pending ones are held; the size; the arrival in local time; the sender
(MAILER-DAEMON for <>). Then the last reply of a failed attempt, right-aligned to column
78, above the recipients it holds back, and the other pending recipients; delivered
and bounced ones are not shown. The maildrop's files come first, as Postfix lists its maildrop queue,
when the caller may read that folder. "Mail queue is empty" when there is nothing.

The messages come from the running server's admin API, or from the spool when it is
stopped (mta/queuecli.py: the same access as `mta queue list`), streamed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mta import maildrop, queuecli, queuepages
from mta.config import Config

HEADER = f"{'-Queue ID-':<11} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------"
RECIPIENT_INDENT = " " * 41
FINAL_STATES = ("delivered", "bounced")


def run(cfg: Config) -> int:
    """Print the listing; the exit code (queuecli.run's: 1 when the queue cannot be read)."""
    return queuecli.run(cfg, argparse.Namespace(action=_print))


def _print(cfg: Config, args: argparse.Namespace) -> int:
    for line in lines(maildrop_files(cfg.queue.maildrop_dir), queuecli.selected(cfg, queuepages.Selection())):
        print(line)
    sys.stdout.flush()
    return 0


def lines(drops: Iterable[tuple[str, int, float, int]], messages: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The listing: `drops` as (name, size, mtime, uid), `messages` in envelope_json form."""
    count = size = 0
    for name, octets, mtime, uid in drops:
        yield from _separator(count)
        yield f"{name:<11} {octets:>7} {_when(mtime)} (maildrop queue, sender UID {uid})"
        count, size = count + 1, size + octets
    for e in messages:
        yield from _separator(count)
        yield from message_lines(e)
        count, size = count + 1, size + e["size"]
    if not count:
        yield "Mail queue is empty"
        return
    yield ""
    yield f"-- {size // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}."


def _separator(count: int) -> Iterator[str]:
    yield HEADER if not count else ""


def message_lines(e: Mapping[str, Any]) -> list[str]:
    pending = [r for r in e["recipients"] if r["state"] not in FINAL_STATES]
    mark = ("*" if any(r["state"] == "active" for r in pending) else
            "!" if pending and all(r["state"] == "held" for r in pending) else "")
    arrival = datetime.datetime.fromisoformat(e["arrival"]).timestamp()
    out = [f"{e['id'] + mark:<11} {e['size']:>7} {_when(arrival)} {e['sender'] or 'MAILER-DAEMON'}"]
    reason = None
    for r in sorted(pending, key=lambda r: not r["last_reply"]):  # (stable: those with a reason first)
        if r["last_reply"] and r["last_reply"] != reason:
            reason = r["last_reply"]
            out.append(f"{'':>{max(0, 76 - len(reason))}}({reason})")
        out.append(RECIPIENT_INDENT + r["address"])
    return out


def _when(ts: float) -> str:
    """asctime's first 20 characters, as Postfix prints them ("Mon Dec  7 03:16:07 ")."""
    return time.asctime(time.localtime(ts))[:20]


def maildrop_files(path: str) -> list[tuple[str, int, float, int]]:
    """Files waiting in the maildrop (not yet picked up), oldest first; none when the caller
    may not list it (only mta's user and root may)."""
    found = []
    for folder in (maildrop.NEW, maildrop.PICKUP):
        try:
            with os.scandir(os.path.join(path, folder)) as entries:
                for entry in entries:
                    if entry.name.startswith(maildrop.TMP_PREFIX):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # picked up meanwhile
                        continue
                    found.append((entry.name, st.st_size, st.st_mtime, st.st_uid))
        except (FileNotFoundError, PermissionError):
            continue
    return sorted(found, key=lambda f: f[2])
