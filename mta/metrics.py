"""Prometheus metrics: the metrics mta exports, with their help text, and the scrape.

Defined here: every metric but those defined beside the code that counts them, the DNS
resolver's (mta_dns_*), the DNSBL check's (mta_dnsbl_*) and AUTH's (mta_auth_*); all
are documented in docs/metrics.md. The per-destination and cache-entry gauges are no
Gauge objects: they are rendered at each scrape (render_destinations,
render_cache_entries).

prometheus-client's multiprocess mode: `mta.serve.prepare_metrics` sets
PROMETHEUS_MULTIPROC_DIR and wipes the directory in the master before anything imports
prometheus_client (the value class is chosen at import); every forked child writes
its own files there, the master calls `process_dead(pid)` when it reaps one, and the
control process serves the merged view (`render()`). Labels are low-cardinality only
(destination: the scheduler's top destinations and "other").
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import glob
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector

from mta import procinfo

# prometheus-client's multiprocess values call os.getpid() (a system call) on every
# inc() and set() to notice a fork; ours is read from a variable updated at fork.
if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
    values.ValueClass = values.MultiProcessValue(process_identifier=procinfo.pid)


@contextlib.contextmanager
def _files_locked(exclusive: bool) -> Iterator[str]:
    """Readers share, the merge of a dead process's files is exclusive: a scrape never sees
    a counter twice (merged and dead) or not at all (mid-merge), which would read as a reset."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    with open(os.path.join(directory, ".merge.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield directory


class _Files(multiprocess.MultiProcessCollector):
    """MultiProcessCollector without the files of processes still creating them, and
    naming a damaged file.

    A process's first metric creates its file empty and only then sizes it: a scrape in
    that instant (a worker just spawned) would fail on the stock collector, reading no
    header. The process has counted nothing yet, so leaving its file out loses nothing.
    A file that does not parse raises OSError, as a vanished one does: the scrape says
    which file, and the callers' handling of unreadable files applies.
    """

    def collect(self) -> Iterator[Metric]:
        files = [path for path in glob.glob(os.path.join(self._path, "*.db")) if os.path.getsize(path) > 0]
        try:
            return self.merge(files, accumulate=True)
        except (RuntimeError, struct.error) as exc:  # what prometheus-client raises for a file it cannot parse
            raise OSError(f"{_damaged(files)} is damaged ({exc}): remove it, or restart mta "
                          "(which clears the directory)") from exc


def _damaged(files: list[str]) -> str:
    """The first of `files` that does not parse (the merge does not say which)."""
    for path in files:
        try:
            list(MmapedDict.read_all_values_from_file(path))
        except (RuntimeError, struct.error):
            return path
    return "a metrics file"


def render() -> bytes:
    """The merged view of every process's metric files (the control process serves it)."""
    with _files_locked(exclusive=False):
        registry = CollectorRegistry()
        _Files(registry)
        return generate_latest(registry)


def merged() -> list[Metric]:
    """The merged metric families, as render() shows them (the web UI's overview reads them)."""
    with _files_locked(exclusive=False):
        return list(_Files(CollectorRegistry()).collect())


def process_dead(pid: int) -> None:
    """A child is gone: drop its live gauges, fold its counters into one merged file.

    Stock prometheus-client keeps a dead process's counter and histogram files (their
    values still count), so the directory would grow by a file per restart. Adding them
    into `<type>_merged.db` keeps totals monotonic and the directory at one file per
    live process and type.
    """
    with _files_locked(exclusive=True) as directory:
        multiprocess.mark_process_dead(pid, directory)
        _merge(directory, pid)


def _merge(directory: str, pid: int) -> None:
    for kind in ("counter", "histogram"):
        dead = os.path.join(directory, f"{kind}_{pid}.db")
        if not os.path.exists(dead):
            continue
        merged = MmapedDict(os.path.join(directory, f"{kind}_merged.db"))
        try:
            for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(dead):
                total, _ = merged.read_value(key)
                merged.write_value(key, total + value, timestamp)
        finally:
            merged.close()
        os.remove(dead)


INBOUND_CONNECTIONS = Counter(
    "mta_inbound_connections_total", "Client connections that reached an inbound worker.", ["listener"])
INBOUND_MESSAGES = Counter(
    "mta_inbound_messages_total", "Messages accepted with 250 after DATA/BDAT (durably queued).", ["listener"])
INBOUND_TRANSFER_DUPLICATES = Counter(
    "mta_inbound_transfer_duplicates_total",
    "Messages another node moved here with `mta queue transfer` that had come before (same X-Mta-Transfer id "
    "and origin): its transfer was interrupted between our 250 and its delete. Each is logged "
    "(event=transfer_duplicate) and still delivered.")
INBOUND_BYTES = Counter(
    "mta_inbound_bytes_total", "Bytes of accepted messages as stored (our Received header included).", ["listener"])
INBOUND_REJECTED = Counter(
    "mta_inbound_rejected_total",
    "Connections, senders, recipients or messages refused, by reason and reply code class. reason: "
    "relay, user_unknown, mailbox_full, rcpt, queue_full, queue_error (messages and recipients); client_denied, "
    "auth_lockout, max_connections_per_ip, connection_rate, max_sessions, max_sessions_per_worker, fd_limit, "
    "node_drained (connections; the last four answered by the master); sender_denied, "
    "sender_login_mismatch, dnsbl, message_rate (MAIL); recipient_denied, recipient_rate (RCPT); "
    "cluster_unavailable ([cluster] redis down, on_redis_down = tempfail: connect, MAIL or RCPT); "
    "memory_budget (MAIL 452, or a transfer 451: the worker's max_worker_buffered_bytes); idle_timeout, "
    "data_total_timeout, session_timeout (421 4.4.2: sessions closed by a timeout).",
    ["reason", "code"])
INBOUND_TLS = Counter(
    "mta_inbound_tls_handshakes_total",
    "TLS handshakes with clients, by listener mode (smtp and submission: STARTTLS; smtps: implicit) and "
    "result (ok, failed). Failures are clients that cannot speak our TLS versions or ciphers, scanners, "
    "or a certificate problem if they are all failing.", ["mode", "result"])
for _mode in ("smtp", "submission", "smtps"):
    for _result in ("ok", "failed"):
        INBOUND_TLS.labels(_mode, _result)  # every series from the start, at 0
QUEUE_COMMIT_SECONDS = Histogram(
    "mta_queue_commit_seconds", "Time of one durable queue commit (one fsync).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
QUEUE_COMMIT_MESSAGES = Histogram(
    "mta_queue_commit_messages", "Messages per group commit.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 512))
CONTENT_DECISIONS = Counter(
    "mta_content_decisions_total",
    "Content pipeline decisions at end of data, by stage (attachments, antivirus, milter, footer, dkim) "
    "and result (pass, changed, reject, tempfail, discard, quarantine, failed, ...: docs/metrics.md).",
    ["stage", "result"])
CONTENT_STAGE_SECONDS = Histogram(
    "mta_content_stage_seconds", "Time one content stage took for one message, by stage.", ["stage"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0))
DELIVERY_OUTCOMES = Counter(
    "mta_delivery_recipients_total",
    "Recipient delivery outcomes: result delivered, deferred, bounced, retried (452 4.5.3: next transaction); "
    "reply: the class of the reply that decided it (2xx, 4xx, 5xx; when no server answered, the class of "
    "the reply we made up, e.g. 4xx for a refused connection).", ["result", "reply"])
DELIVERY_PIPELINED = Counter(
    "mta_delivery_pipelined_messages_total",
    "Messages whose MAIL/RCPT/DATA went out in the same write as the content of the message before them "
    "on the connection (RFC 2920 pipelining across messages: one round trip per message).")
DELIVERY_BODY_MISSING = Counter(
    "mta_delivery_body_missing_total",
    "Jobs whose message had an envelope but no body in the spool (a damaged spool): nothing was sent, "
    "the recipients were deferred (event=body_missing in the log names the message).")
DELIVERY_SIEVE_ACTIONS = Counter(
    "mta_delivery_sieve_actions_total",
    "Actions of mailboxes' Sieve scripts carried out at local delivery, one per recipient and action: "
    "keep, fileinto, discard, redirect, reject, vacation (a reply queued), vacation_skipped (not due or "
    "answered before), error (the script failed to parse or run: kept in INBOX).", ["action"])
BOUNCES = Counter("mta_scheduler_bounces_total", "Bounce messages (DSNs) queued.")
NOTICES = Counter("mta_scheduler_notices_total",
                  "Delay and success notices (DSNs) queued to senders who asked (NOTIFY): action delayed, "
                  "delivered or relayed. Failure notices are mta_scheduler_bounces_total.", ["action"])
QUEUE_CORRUPT_RECORDS = Counter(
    "mta_queue_corrupt_records_total",
    "Envelopes that did not decode (damaged on disk), moved to the spool's corrupt table and no longer "
    "delivered; `mta queue check` lists them.")
MASTER_RESTARTS = Counter(
    "mta_master_restarts_total", "Child processes that died and were replaced, by kind.", ["kind"])
MASTER_RELOADS = Counter("mta_master_reloads_total", "Configuration reloads (SIGHUP), by result.", ["result"])
MASTER_ACCEPT_ERRORS = Counter(
    "mta_master_accept_errors_total", "accept() failures of the master by errno name (EMFILE, ENFILE, ENOBUFS, "
    "ENOMEM); each pauses accepting for 0.1 s doubling to 1 s. Nonzero: raise the fd limit or lower "
    "[limits] max_sessions.", ["error"])

# Gauges: "livesum" adds the values of live processes (dead ones drop out).
INBOUND_ACTIVE_SESSIONS = Gauge(
    "mta_inbound_active_sessions", "SMTP sessions open right now, per inbound worker (pid label; sum them "
    "for the total).", multiprocess_mode="liveall")
INBOUND_BUFFERED = Gauge(
    "mta_inbound_buffered_bytes", "Memory an inbound worker spends on message content (unfinished DATA/BDAT, "
    "messages awaiting their commit; content counted twice, for the commit's copy), sampled each second "
    "(pid label). Near mta_inbound_buffered_limit_bytes new transfers get 451/452 4.3.1.",
    multiprocess_mode="liveall")
INBOUND_BUFFERED_LIMIT = Gauge(
    "mta_inbound_buffered_limit_bytes", "[limits] max_worker_buffered_bytes: the memory budget of each inbound "
    "worker.", multiprocess_mode="livemax")
CLUSTER_REDIS_UP = Gauge(
    "mta_cluster_redis_up", "1 while [cluster] redis answers, 0 while it does not (then [cluster] on_redis_down "
    "decides); the lowest over the live processes of that side (inbound, delivery: the scheduler's leases).", ["side"],
    multiprocess_mode="livemin")
CLUSTER_REDIS_OUTAGES = Counter(
    "mta_cluster_redis_outages_total", "Times a process found [cluster] redis down (once per outage, logged as "
    "event=cluster_redis_down).", ["side"])
CLUSTER_SHARED_DECISIONS = Counter(
    "mta_cluster_shared_decisions_total", "Decisions of the cluster-wide limits. limit: connection_rate, "
    "message_rate, recipient_rate, auth_lockout (inbound), concurrency, rate, max_connections (delivery); result: allowed, refused "
    "(by Redis, or a full window remembered), waiting (no slot or token yet), local (Redis down: the node's own "
    "limit decided), tempfail (Redis down: 4xx, or no new session).", ["limit", "result"])
PICKUP_FILES = Counter(
    "mta_pickup_files_total", "Maildrop files the pickup took (mta-sendmail's mail). result: committed (queued), "
    "corrupt (refused, set aside in <maildrop>/corrupt/).", ["result"])
QUEUE_RECIPIENTS = Gauge(
    "mta_queue_recipients", "Recipients in the queue by state (ready, active, deferred, held), "
    "as the scheduler sees them.", ["state"], multiprocess_mode="livesum")
QUEUE_MESSAGES = Gauge("mta_queue_messages", "Messages in the queue.", multiprocess_mode="livesum")
QUEUE_ACTIVE_MESSAGES = Gauge(
    "mta_queue_active_messages", "Messages in the scheduler's active set (at most [queue] active_limit + "
    "active_reserve); the rest wait in the spool.", multiprocess_mode="livesum")
QUEUE_OLDEST_SECONDS = Gauge(
    "mta_queue_oldest_message_age_seconds", "Age of the oldest queued message.", multiprocess_mode="livemax")
QUEUE_BYTES = Gauge(
    "mta_queue_stored_bytes", "Message data stored in the spool (envelopes + bodies).", multiprocess_mode="livesum")
QUEUE_LIMIT_BYTES = Gauge(
    "mta_queue_limit_bytes", "[queue] max_size_bytes: beyond it clients get 452 4.3.1.", multiprocess_mode="livemax")
QUEUE_MAP_BYTES = Gauge(
    "mta_queue_map_bytes", "Size of the spool's LMDB map (2 x [queue] max_size_bytes + 16 MiB).",
    multiprocess_mode="livemax")
QUEUE_MAP_USED_BYTES = Gauge(
    "mta_queue_map_used_bytes", "Spool LMDB pages up to the highest one ever written (free pages inside are "
    "reused). Near mta_queue_map_bytes, writes fail with 452 4.3.1 even below max_size_bytes.",
    multiprocess_mode="livemax")
CLUSTER_LEASE_WAIT_SECONDS = Histogram(
    "mta_cluster_lease_wait_seconds", "Time a destination with ready mail waited for cluster session slots.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
DELIVERY_LATENCY_SECONDS = Histogram(
    "mta_delivery_latency_seconds", "Arrival to successful delivery, per recipient.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400))
CHILDREN = Gauge(
    "mta_master_children", "Child processes by kind and state (starting, ready, retiring, killing).",
    ["kind", "state"], multiprocess_mode="livesum")

# Per-destination gauges: the scheduler's top destinations by queued recipients (tally.py
# TOP_DESTINATIONS) plus one destination="other" row. Not Gauge objects: in multiprocess
# mode a Gauge cannot drop a label set (remove() only warns; the value stays in the
# process's mmap file until it exits), so every destination that was ever in the top would
# stay in the scrape. The scheduler keeps a snapshot (every GAUGE_SECONDS), the control
# process asks for it at each scrape and renders it here: at most TOP_DESTINATIONS + 1
# destination values, none while the scheduler is down.
DESTINATION_RECIPIENTS_HELP = (
    "Recipients queued for each of the top destinations by queued recipients, by state (ready, active, "
    "deferred); destination=\"other\" sums every other destination. Held recipients are not broken down.")
DESTINATION_CONNECTIONS_HELP = "Open delivery sessions to each of the top destinations."
DESTINATION_LIMIT_HELP = (
    "The concurrency window the scheduler applies to each of the top destinations now (slow start, "
    "halved on connection failures, at most its concurrency).")


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


CACHE_NAMESPACES = ("dns", "auth", "rate", "transfer")


def render_cache_entries(counts: dict[str, int]) -> bytes:
    """mta_cache_entries{namespace}: counted in the shared cache at each scrape (dns, auth, rate)."""
    family = GaugeMetricFamily(
        "mta_cache_entries", "Entries in the shared LMDB cache by namespace: dns (answers), auth (verified "
        "logins), rate (rate-limit windows and connection counts), transfer (ids of messages moved here by `mta queue "
        "transfer`, for duplicate detection). Bounded by [cache] max_entries in total; "
        "near it, the entries expiring soonest are evicted.", labels=["namespace"])
    for name in CACHE_NAMESPACES:
        family.add_metric([name], counts.get(name, 0))
    return generate_latest(_Families([family]))


def render_destinations(top: Sequence[Sequence[Any]], other: Sequence[int]) -> bytes:
    """The per-destination gauges of a scheduler snapshot, as exposition text. `top`: rows
    [destination, ready, active, deferred, open sessions, window]; `other`: [ready, active, deferred]."""
    recipients = GaugeMetricFamily("mta_destination_recipients", DESTINATION_RECIPIENTS_HELP,
                                   labels=["destination", "state"])
    connections = GaugeMetricFamily("mta_destination_connections", DESTINATION_CONNECTIONS_HELP,
                                    labels=["destination"])
    limit = GaugeMetricFamily("mta_destination_connection_limit", DESTINATION_LIMIT_HELP, labels=["destination"])
    for name, ready, active, deferred, open_sessions, window in top:
        for state, value in (("ready", ready), ("active", active), ("deferred", deferred)):
            recipients.add_metric([name, state], value)
        connections.add_metric([name], open_sessions)
        limit.add_metric([name], window)
    for state, value in zip(("ready", "active", "deferred"), other):
        recipients.add_metric(["other", state], value)
    return generate_latest(_Families([recipients, connections, limit]))


def observe_all(histogram: Histogram, amounts: Sequence[float]) -> None:
    """histogram.observe(a) for each of `amounts` (an unlabelled histogram, or a child), with
    the sum and each bucket written once, not once per observation (in multiprocess mode
    every write takes the values' lock and packs into the mmap: ~3 us an observe())."""
    if not amounts:
        return
    bounds = histogram._upper_bounds  # ascending, +Inf last: observe()'s first bound >= the amount
    counts = [0] * len(bounds)
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1
    histogram._sum.inc(sum(amounts))
    for bucket, n in zip(histogram._buckets, counts):
        if n:
            bucket.inc(n)
