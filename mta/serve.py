"""`mta serve`: take the spool lock, then run the prefork master (mta/master).

The master binds every listener once at start and on reload (mta/master/listeners.py:
`bind_all` keeps sockets whose address is unchanged, so reloads never close them).
This is the composition root: the one module of mta/ that imports workers/ (the
bodies the master forks).

Before anything forks, the soft fd limit is raised to the hard limit (children inherit
it; the session caps derive from it: mta/master/admission.py).

Only one master may run on one spool: an exclusive flock on <queue path>/mta.lock,
held by the master alone (children close it), released by the kernel even on kill -9.
Workers left behind by a killed master finish their sessions and exit; a new master
may start at once (LMDB is safe for several processes).

Then, before anything is forked, the spool's file is checked (mtaqueue/check.py: pread
only, the LMDB handle that pins the snapshot is closed again): a damaged file (truncated,
pages scrambled) would SIGBUS or crash every child that touches it, so the master refuses
to start, naming the file and the recovery. The check at start reads the meta pages, the
small tables and every tree's branch pages, not the leaves, so its time does not grow
with the queue (the full walk is `mta queue check`). Envelopes that do not decode are
left to the backend, which moves them to the corrupt table when it meets them.

When the spool's indexes need a rebuild (a format-1 spool from an older release, or a
recount after a record was quarantined: mtaqueue/upgrade.py), the full walk runs first
(the rebuild reads every envelope through LMDB's map), then the master opens the spool
read-write once, which rebuilds in batches with progress in the log, and closes it
before it forks.

Last, the maildrop (mta/maildrop.py: where mta-sendmail leaves mail) is created or its
modes put right, and files a crash left in its pickup folder are settled while no
scheduler runs (workers/inbound/pickupfiles.py: committed ones removed, the others
picked up again); the spool is opened, read-only, only when there are such files.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import resource
import shutil
import time

from mta import logs
from mta.config import Config
from mta.master.listeners import ServeError, bind_all
from mta.tls import TlsError, control_context, server_context
from mtaqueue.private import private_dir

PROGRESS_SECONDS = 1.0  # spool_rebuild progress lines at most this often


def lock_spool(path: str) -> int:
    try:
        private_dir(path)
    except PermissionError as exc:
        raise ServeError(str(exc)) from None
    fd = os.open(os.path.join(path, "mta.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServeError(f"another mta is already serving the queue at {path} "
                         "(stop it first, or give this one its own [queue] path)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_spool(config: Config) -> None:
    """Refuse a spool file that LMDB would crash on (mtaqueue/check.py), naming the recovery;
    then rebuild the spool's indexes if they need it."""
    from mtaqueue.check import check_spool as check_file
    try:
        report = check_file(config.queue.path, full=False)
        if report.rebuild and not report.full and not report.fatal:
            report = check_file(config.queue.path)  # the rebuild reads every envelope through LMDB's map
    except OSError as exc:
        raise ServeError(f"cannot read the queue at {config.queue.path}: {exc}") from None
    logs.event("spool_check", file=report.path, check="full" if report.full else "start", messages=report.messages,
               seconds=round(report.seconds, 3), damage=len(report.damage) or None,
               undecodable=len(report.undecodable) or None, without_body=len(report.without_body) or None,
               corrupt_table=len(report.quarantined) or None, rebuild=report.rebuild)
    if not report.fatal:  # undecodable envelopes: the backend moves each to corrupt when it meets it
        if report.rebuild:
            rebuild_spool(config, report.rebuild)
        return
    flags = "" if config.source.startswith("<") else f" -c {config.source}"
    more = f" (and {len(report.damage) - 1} more problems)" if len(report.damage) > 1 else ""
    logs.event("spool_damaged", file=report.path, problem=report.damage[0], problems=len(report.damage))
    raise ServeError(
        f"the queue file {report.path} is damaged: {report.damage[0]}{more}. Nothing was started. "
        f"`mta queue check{flags}` lists every problem; `mta queue salvage{flags} OUT` copies every "
        "readable message into a new spool directory OUT: then set [queue] path to OUT and start again "
        "(keep the damaged spool until the salvaged mail is delivered).")


def prepare_maildrop(config: Config) -> None:
    from mta import maildrop
    from mtaqueue.backend import QueueIOError
    from mtaqueue.backend_lmdb import LmdbBackend
    from workers.inbound.pickupfiles import Files, settle_at_start
    path, limit = config.queue.maildrop_dir, config.limits.max_message_bytes
    try:
        maildrop.prepare(path)
        if not Files(path, limit).left():
            return
        spool = LmdbBackend(config.queue.path, config.queue.max_size_bytes, readonly=True)
        try:
            settle_at_start(path, limit, lambda msgid: spool.envelope(msgid) is not None)
        finally:
            spool.close()
    except (OSError, QueueIOError) as exc:
        raise ServeError(f"cannot prepare the maildrop {path} ([queue] maildrop): {exc}") from None


class RebuildLog:
    """An index rebuild's progress in the log, at most every PROGRESS_SECONDS."""

    def __init__(self, why: str) -> None:
        self.why = why
        self.started = self.last = time.monotonic()

    def on_progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or done >= total:
            self.last = now
            logs.event("spool_rebuild", reason=self.why, done=done, total=total, seconds=round(now - self.started, 1))

    @staticmethod
    def on_corrupt(msgid: str, error: str, moved: bool) -> None:
        logs.event("corrupt_record", msgid=msgid, error=error,
                   action="moved to the corrupt table, not delivered" if moved else "left in place, skipped")


def rebuild_spool(config: Config, why: str) -> None:
    """Open the spool read-write once (its open rebuilds the indexes: mtaqueue/upgrade.py)
    and close it before anything forks. No metrics here: prometheus_client must not be
    imported before prepare_metrics."""
    from mtaqueue.backend import QueueIOError
    from mtaqueue.backend_lmdb import LmdbBackend
    log = RebuildLog(why)
    logs.event("spool_rebuild", reason=why, state="starting",
               note="upgrading the queue's indexes, once" if why == "upgrade" else "recounting the queue")
    try:
        LmdbBackend(config.queue.path, config.queue.max_size_bytes, on_corrupt=log.on_corrupt,
                    on_progress=log.on_progress).close()
    except QueueIOError as exc:
        raise ServeError(f"cannot rebuild the indexes of the queue at {config.queue.path}: {exc}") from None
    logs.event("spool_rebuild", reason=why, state="done", seconds=round(time.monotonic() - log.started, 1))


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def prepare_metrics(directory: str) -> None:
    """Before anything imports prometheus_client: it picks multiprocess mode at import."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.abspath(directory)
    # Now, before any module defines a metric: mta.metrics installs the multiprocess value
    # class (its pid from an at-fork hook) that every metric of every process must share.
    importlib.import_module("mta.metrics")


def serve(config: Config, found_by: str = "-c") -> int:
    """Run the master until it exits; `found_by` (mta/config.py Found.how) goes to the log."""
    logs.setup("master")
    logs.set_format(config.log.format)
    try:
        server_context(config.tls)  # refuse to start on a bad certificate, before any fork
        control_context(config.control)
    except TlsError as exc:
        raise ServeError(str(exc)) from None
    fds = raise_fd_limit()
    lock_fd = lock_spool(config.queue.path)
    try:
        check_spool(config)
        prepare_maildrop(config)
    except ServeError:
        os.close(lock_fd)
        raise
    prepare_metrics(config.control.metrics_dir)
    logs.event("starting", config=config.source, config_from=found_by, workers=config.server.inbound_workers,
               listeners=",".join(lst.address for lst in config.listener), fd_limit=fds)
    from mta.master.arbiter import Arbiter
    # The bodies forked children run; each imports uvloop itself, after the fork.
    from workers.delivery.main import run as run_delivery
    from workers.inbound.main import run as run_inbound
    from workers.control.main import run as run_control
    from workers.scheduler.main import run as run_scheduler
    bodies = {"inbound": run_inbound, "scheduler": run_scheduler, "delivery": run_delivery,
              "control": run_control}
    try:
        return Arbiter(config, bodies, bind_all, master_fds=(lock_fd,)).run()
    finally:
        os.close(lock_fd)
