"""The soak's samples: what every --interval records, one progress line, the CSV.

A sample: the load's tallies so far, deliveries at the sink, deletions, the spool's
size on disk and apparent (data.mdb + lock.mdb), the live queue data and depth from
/metrics, and VmRSS, RssAnon and open fds of every mta process by title.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import TextIO

from peers import CountingSink
from procstat import ProcSample, read_proc
from soak_load import Churn, LoadTally
from soak_mta import Mta


def mib(value: float) -> str:
    return f"{value / 1024**2:.1f} MiB"


@dataclass
class Sample:
    elapsed: float
    load: LoadTally
    delivered: int
    deleted: int
    spool_disk_bytes: int
    spool_apparent_bytes: int
    live_bytes: float | None
    queue_messages: float | None
    deferred_recipients: float | None
    procs: dict[str, ProcSample]


def take_sample(elapsed: float, mta: Mta, churn: Churn, sink: CountingSink,
                deleted: int) -> Sample:
    procs = {}
    for title, pid in sorted(mta.processes().items()):
        read = read_proc(pid)
        if read is not None:
            procs[title] = read
    metrics = mta.scrape() or {}
    disk, apparent = mta.spool_bytes()
    return Sample(elapsed=elapsed, load=churn.snapshot(), delivered=sink.count(),
                  deleted=deleted, spool_disk_bytes=disk, spool_apparent_bytes=apparent,
                  live_bytes=metrics.get("mta_queue_stored_bytes"),
                  queue_messages=metrics.get("mta_queue_messages"),
                  deferred_recipients=metrics.get('mta_queue_recipients{state="deferred"}'),
                  procs=procs)


def progress_line(s: Sample, duration: float) -> str:
    rss = sum(p.rss_bytes for p in s.procs.values())
    fds = sum(p.fds for p in s.procs.values())
    fmt_num = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    return (f"{s.elapsed:6.0f}s/{duration:.0f}s sent={s.load.sent} accepted={s.load.accepted} "
            f"rejected={s.load.rejected} errors={s.load.errors} skipped={s.load.skipped} "
            f"delivered={s.delivered} deleted={s.deleted} queue={fmt_num(s.queue_messages)} "
            f"deferred={fmt_num(s.deferred_recipients)} "
            f"live={'-' if s.live_bytes is None else mib(s.live_bytes)} "
            f"spool={mib(s.spool_disk_bytes)} rss={mib(rss)} fds={fds} "
            f"procs={len(s.procs)}")


class CsvOut:
    """One row per sample, flushed at once; the columns are fixed by the first sample."""

    COMMON = ("elapsed_seconds", "offered", "skipped", "sent", "accepted", "rejected",
              "errors", "delivered", "deleted", "queue_messages", "deferred_recipients",
              "live_bytes", "spool_disk_bytes", "spool_apparent_bytes")

    def __init__(self, path: str | None):
        # "x": an existing file is the operator's; never overwrite it.
        self.file: TextIO | None = open(path, "x", newline="") if path else None
        self.writer = csv.writer(self.file) if self.file else None
        self.titles: list[str] | None = None

    def write(self, s: Sample) -> None:
        if self.writer is None:
            return
        if self.titles is None:
            self.titles = list(s.procs)
            self.writer.writerow([*self.COMMON, *(f"{col}:{t}" for t in self.titles
                                                  for col in ("pid", "rss_bytes",
                                                              "rss_anon_bytes", "fds"))])
        row = [f"{s.elapsed:.1f}", s.load.offered, s.load.skipped, s.load.sent,
               s.load.accepted, s.load.rejected, s.load.errors, s.delivered, s.deleted,
               s.queue_messages, s.deferred_recipients, s.live_bytes, s.spool_disk_bytes,
               s.spool_apparent_bytes]
        for t in self.titles:
            p = s.procs.get(t)
            row += [p.pid, p.rss_bytes, p.rss_anon_bytes, p.fds] if p else ["", "", "", ""]
        self.writer.writerow(["" if v is None else v for v in row])
        assert self.file is not None  # a writer exists only with its file
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
