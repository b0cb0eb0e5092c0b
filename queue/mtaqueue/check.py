"""Checking the spool's file, and salvaging what a damaged one still holds.

`check_spool(path)` is what `mta queue check` prints: both meta pages, then every page
of every tree read with pread (lmdbfile.py: a truncated or scrambled file is reported,
never a SIGBUS), every envelope decoded, envelopes without a body, and the corrupt
table. It pins its snapshot with an LMDB read transaction (open, read, close: no handle
is kept), so a running server may write meanwhile. `damage` is fatal (LMDB would crash
or corrupt further); undecodable envelopes are not (the backend moves them to `corrupt`
when it meets them).

`check_spool(path, full=False)` is what `mta serve` runs before it forks anything, in a
time that does not grow with the queue's leaves (a million messages: 300,000+ pages
and a million decodes, ~15 s, against SMTP served within 2 s): both meta pages, the
file's length against the snapshot's last page (a truncated file is short of it: then
the full walk runs, to tell a truncation from pages freed unwritten), the main tree,
the small meta and corrupt tables, and the branch pages of every other tree (what LMDB
reads on every lookup). Leaf pages and envelopes are left to `mta queue check`: damage
inside a leaf (a disk fault, not a stop: LMDB survives kill -9 and power loss) is met
by whichever process reads that page. `rebuild` says whether the first read-write open
will rebuild the indexes (upgrade.py): that reads every envelope through LMDB's map, so
`mta serve` runs the full walk first.

`salvage(path, out, max_size_bytes)` copies every message whose envelope decodes and
whose body is whole (its length is the envelope's size) into a new spool at `out`,
reading the source with pread only. It starts from the newest usable meta page;
subtrees cut off by damage are read from their orphaned leaf pages (lmdbfile.py's
invariant), so a truncated file keeps the messages whose pages survived.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import lmdb
import msgpack

from mtaqueue import records, upgrade
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.indexes import REBUILD, RECOUNT
from mtaqueue.ids import is_id
from mtaqueue.lmdbfile import DataFile, Damage, DbRecord, Leaf, Meta, Snapshot
from mtaqueue.records import CorruptRecord, Envelope, NewMessage

DATA_FILE = "data.mdb"
SMALL_TABLES = (b"meta", b"corrupt")  # read whole by the start-time check
PIN_ATTEMPTS = 5
SALVAGE_BATCH_BYTES = 32 * 1024 * 1024


@dataclass
class CheckReport:
    path: str  # the data file
    file_bytes: int = 0
    page_bytes: int = 0
    last_page: int = 0
    txnid: int = 0
    messages: int = 0  # envelopes read
    seconds: float = 0.0
    damage: list[str] = field(default_factory=list)  # fatal: the file itself is broken
    undecodable: list[tuple[str, str]] = field(default_factory=list)  # (id, error) in the envelope table
    without_body: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str, float]] = field(default_factory=list)  # (id, error, moved at) in corrupt
    full: bool = True  # every page read (else the start-time check: see the module's header)
    rebuild: str | None = None  # "upgrade" (format 1) or "recount": the next read-write open rebuilds

    @property
    def fatal(self) -> bool:
        return bool(self.damage)

    @property
    def ok(self) -> bool:
        return not (self.damage or self.undecodable or self.without_body or self.quarantined)


def check_spool(path: str, full: bool = True) -> CheckReport:
    """The whole check, or with full=False the start-time one; a spool that does not exist
    yet is fine (LMDB creates it)."""
    started = time.monotonic()
    report = CheckReport(os.path.join(path, DATA_FILE), full=full)
    if not os.path.exists(report.path):
        return report
    try:
        with DataFile(report.path) as data:
            report.file_bytes = data.size
            if data.size == 0:
                raise Damage("the file is empty (truncated): if the spool never held mail, remove it")
            data.newest()  # both meta pages usable, before LMDB maps anything
            with _pinned(path, data) as meta:
                report.page_bytes, report.last_page, report.txnid = meta.page_bytes, meta.last_page, meta.txnid
                if data.size < (meta.last_page + 1) * meta.page_bytes:
                    report.full = True  # truncated, or its last pages were freed unwritten: only a walk can tell
                if report.full:
                    _check_trees(Snapshot(data, meta), report)
                else:
                    _check_branches(Snapshot(data, meta), report)
    except Damage as exc:
        report.damage.append(str(exc))
    report.seconds = time.monotonic() - started
    return report


@contextlib.contextmanager
def _pinned(path: str, data: DataFile) -> Iterator[Meta]:
    """The meta page of an LMDB read transaction held open meanwhile: the pages of that
    snapshot are not reused by writers until it ends."""
    try:
        env = lmdb.open(path, readonly=True, lock=True, max_dbs=0, subdir=True)
    except lmdb.Error as exc:
        raise Damage(f"LMDB cannot open it: {exc}") from None
    try:
        for _ in range(PIN_ATTEMPTS):  # two commits between begin and our read: try again
            with env.begin() as txn:
                meta = next((m for m in data.metas() if isinstance(m, Meta) and m.txnid == txn.id()), None)
                if meta is not None:
                    yield meta
                    return
        raise Damage(f"no meta page matches LMDB's current transaction after {PIN_ATTEMPTS} attempts")
    finally:
        env.close()


def _check_trees(snap: Snapshot, report: CheckReport) -> None:
    """Every table walked (its pages checked and claimed); envelopes decoded, the corrupt
    table listed; then the free pages, which must not overlap any table's."""
    envelopes: set[bytes] = set()
    bodies: set[bytes] = set()
    meta: dict[bytes, bytes] = {}
    for name, db in snap.named().items():
        for leaf in snap.tree(db, _id(name)):
            try:
                if name == b"envelope":
                    envelopes.add(leaf.key)
                    records.decode(snap.value(leaf))
                elif name == b"body":
                    bodies.add(leaf.key)
                elif name == b"meta":
                    meta[leaf.key] = snap.value(leaf)
                elif name == b"corrupt":
                    report.quarantined.append(_corrupt_entry(leaf.key, snap.value(leaf)))
            except CorruptRecord as exc:
                report.undecodable.append((_id(leaf.key), str(exc)))
            except (Damage, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                snap.damage.append(f"table {_id(name)}: record {_id(leaf.key)}: {exc}")
    report.messages = len(envelopes)
    report.rebuild = _rebuild(meta, report.messages)
    snap.read_free()
    if snap.beyond_end:
        report.damage.append(f"the file was truncated: it ends at page {snap.file_pages} ({report.file_bytes} "
                             f"bytes), its tables use pages up to {snap.beyond_end}")
    report.damage.extend(snap.damage)
    if not snap.damage:  # with a damaged tree, a missing body says nothing new
        report.without_body = sorted(_id(k) for k in envelopes - bodies)


def _check_branches(snap: Snapshot, report: CheckReport) -> None:
    """The start-time check: small tables whole, the big ones' branch pages (the header)."""
    named = snap.named()
    meta: dict[bytes, bytes] = {}
    for name, db in named.items():
        if name not in SMALL_TABLES:
            snap.branches(db, _id(name))
            continue
        for leaf in snap.tree(db, _id(name)):
            try:
                if name == b"meta":
                    meta[leaf.key] = snap.value(leaf)
                else:
                    report.quarantined.append(_corrupt_entry(leaf.key, snap.value(leaf)))
            except Damage as exc:
                snap.damage.append(f"table {_id(name)}: record {_id(leaf.key)}: {exc}")
    snap.branches(snap.meta.free, "(free pages)")
    report.messages = named[b"envelope"].entries if b"envelope" in named else 0
    report.rebuild = _rebuild(meta, report.messages)
    report.damage.extend(snap.damage)


def _rebuild(meta: dict[bytes, bytes], messages: int) -> str | None:
    """What upgrade.pending will find (without LMDB)."""
    if meta.get(upgrade.FORMAT_KEY) is None:
        return "upgrade" if messages or REBUILD in meta else None
    return "recount" if REBUILD in meta or RECOUNT in meta else None


def _id(key: bytes) -> str:
    return key.decode("ascii", "replace")


def _corrupt_entry(key: bytes, value: bytes) -> tuple[str, str, float]:
    """(id, error, moved at) of a corrupt-table record; one damaged in turn says so."""
    try:
        entry = msgpack.unpackb(value)
        return _id(key), str(entry["error"]), float(entry["at"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        return _id(key), f"the corrupt-table record itself is unreadable: {type(exc).__name__}", 0.0


# --- salvage ------------------------------------------------------------------------------

@dataclass
class SalvageReport:
    source: str
    out: str
    previous: bool = False  # read from the previous transaction's meta page (the newest one's tables are lost)
    copied: int = 0
    copied_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, why) of messages seen, not copied
    counted: int | None = None  # envelopes the spool's record of the table counts (None: record lost)
    unaccounted: int = 0  # of those, on no readable page
    damage: list[str] = field(default_factory=list)


def salvage(path: str, out: str, max_size_bytes: int) -> SalvageReport:
    """Copy every readable message of the spool at `path` into a new spool at `out`.
    The source is only read (pread); `out` must not exist or be empty."""
    report = SalvageReport(os.path.join(path, DATA_FILE), out)
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty: salvage writes a new spool")
    with DataFile(report.source) as data:
        snap, tables = _readable_snapshot(data, report)
        found = _leaves(snap, tables, report)
        spool = LmdbBackend(out, max_size_bytes)
        try:
            batch: list[NewMessage] = []
            for key in sorted(found.envelopes):
                message = _message(snap, key, found, report)
                if message is None:
                    continue
                batch.append(message)
                if sum(len(m.body) for m in batch) >= SALVAGE_BATCH_BYTES:
                    _write(spool, batch, report)
                    batch = []
            _write(spool, batch, report)
        finally:
            spool.close()
    return report


def _write(spool: LmdbBackend, batch: list[NewMessage], report: SalvageReport) -> None:
    spool.apply(add=batch)
    report.copied += len(batch)
    report.copied_bytes += sum(len(m.body) for m in batch)


def _readable_snapshot(data: DataFile, report: SalvageReport) -> tuple[Snapshot, dict[bytes, DbRecord]]:
    """The newest meta whose main tree names the envelope table; else the previous
    transaction's (LMDB keeps both), else the newest with what it has."""
    found = data.metas()
    report.damage.extend(str(d) for d in found if isinstance(d, Damage))
    metas = sorted((m for m in found if isinstance(m, Meta)), key=lambda m: -m.txnid)
    if not metas:
        raise Damage(f"{report.source}: neither meta page is usable: nothing can be read")
    snaps = [Snapshot(data, meta) for meta in metas]
    tables = [snap.named() for snap in snaps]
    chosen = next((i for i, named in enumerate(tables) if b"envelope" in named), 0)
    if chosen:
        report.previous = True
        report.damage.append(f"the newest transaction's tables are unreadable ({'; '.join(snaps[0].damage)}): "
                             f"copied from the previous transaction {metas[chosen].txnid}, so a message finished "
                             "in the last one may be delivered again")
    return snaps[chosen], tables[chosen]


# records.encode: a msgpack map, "i" first: of 14 keys, or 13 in records written before `warned`.
ENVELOPE_PREFIXES = frozenset({b"\x8e\xa1i", b"\x8d\xa1i"})


@dataclass
class _Found:
    """What salvage read: envelope and body leaves by id, from the trees first."""

    envelopes: dict[bytes, Leaf] = field(default_factory=dict)
    bodies: dict[bytes, Leaf] = field(default_factory=dict)
    loose_bodies: dict[bytes, list[Leaf]] = field(default_factory=dict)  # from pages no tree reached


def _leaves(snap: Snapshot, tables: dict[bytes, DbRecord], report: SalvageReport) -> _Found:
    """Every tree read; then the leaf pages no tree reached. Envelopes change (states,
    attempts) and are deleted when delivered, so they are taken only from orphaned pages
    (cut off by damage, still current), never from freed ones. A body never changes
    under its id: an unreached page's copy of a live message's body is that body
    (_message checks it)."""
    found = _Found()
    corrupt: set[bytes] = set()
    for name, db in tables.items():
        leaves = snap.tree(db, name.decode())
        target = {b"envelope": found.envelopes, b"body": found.bodies}.get(name)
        for leaf in leaves:
            if target is not None:
                target[leaf.key] = leaf
            elif name == b"corrupt":
                corrupt.add(leaf.key)
    snap.read_free()
    if not snap.free_complete:
        report.damage.append("the free-page table is damaged: envelopes cut off from their tree cannot be "
                             "told from old copies and were not read")
    for _page, orphan, leaves in snap.loose_leaves():
        keyed = [leaf for leaf in leaves if is_id(_id(leaf.key))]
        if any(_prefix(snap, leaf) in ENVELOPE_PREFIXES for leaf in keyed):
            for leaf in keyed if orphan else ():
                found.envelopes.setdefault(leaf.key, leaf)
        else:
            for leaf in keyed:
                found.loose_bodies.setdefault(leaf.key, []).append(leaf)
    report.damage[:0] = snap.damage
    for key in sorted(corrupt - found.envelopes.keys()):
        report.skipped.append((_id(key), "in the corrupt table (its envelope does not decode)"))
    if b"envelope" in tables:
        report.counted = tables[b"envelope"].entries
        report.unaccounted = max(0, report.counted - len(found.envelopes))
    return found


def _prefix(snap: Snapshot, leaf: Leaf) -> bytes:
    try:
        return snap.value_prefix(leaf, 3)  # (the length of every ENVELOPE_PREFIXES member)
    except Damage:
        return b""


def _message(snap: Snapshot, key: bytes, found: _Found, report: SalvageReport) -> NewMessage | None:
    msgid = _id(key)
    try:
        envelope: Envelope = records.decode(snap.value(found.envelopes[key]))
        if envelope.id != msgid:
            raise CorruptRecord(f"the envelope says it is {envelope.id}")
        body = _body(snap, key, envelope, found)
    except (CorruptRecord, Damage) as exc:
        report.skipped.append((msgid, str(exc)))
        return None
    return NewMessage(envelope, body)


def _body(snap: Snapshot, key: bytes, envelope: Envelope, found: _Found) -> bytes:
    """The body from its tree, else a copy on an unreached page: inline (the id's body,
    which never changes), or on overflow pages only when it names its id in our Received
    header (freed overflow pages may have been reused since)."""
    problem = "no body found"
    leaf = found.bodies.get(key)
    for candidate in ([leaf] if leaf is not None else []) + found.loose_bodies.get(key, []):
        try:
            body = snap.value(candidate)
        except Damage as exc:
            problem = str(exc)
            continue
        if len(body) != envelope.size:
            problem = f"the body is {len(body)} bytes, the envelope says {envelope.size}"
        elif candidate is leaf or candidate.inline is not None or b" id " + key in body[:4096]:
            return body
        else:
            problem = "only an unverifiable old copy of the body was found"
    raise Damage(problem)
