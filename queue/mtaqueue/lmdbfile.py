"""Reading an LMDB data file (data.mdb) with pread only: damage is an error, never a SIGBUS.

LMDB maps its file and trusts it: a page beyond the end of a truncated file is a SIGBUS
in whichever process touches it, a flipped page number a wild read. This reader walks
the same B+trees (LMDB 0.9's format, mdb.c: MDB_meta, MDB_page, MDB_node; 64-bit, host
byte order) with os.pread, and checks every page before it uses it: wholly inside the
file, the number it says it is, the kind the tree expects, node offsets and sizes inside
the page, keys in order, no page used twice, the tree's page and entry counts.
It never writes. Tables with duplicate keys (MDB_DUPSORT) are reported as damage: the
spool has none, and tests/mtaqueue/test_check.py compares this reader with LMDB's own
view of every spool table.

Invariant (mdb.c): every page 2..mm_last_pg of a snapshot is used by exactly one tree
or listed in the free tree. So once the free tree has been read whole, a page that was
neither reached nor listed free belongs to a subtree that damage cut off from its root:
`loose_leaves` offers those (and the free ones, marked as such) to salvage. (mm_last_pg itself may lie beyond the end of
an intact file: pages freed in the transaction that allocated them are never written.)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

PAGE_HEADER = struct.Struct("=QHHHH")  # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
PAGE_HEADER_BYTES = PAGE_HEADER.size  # PAGEHDRSZ = 16
OVERFLOW_HEADER = struct.Struct("=QHHI")  # mp_pgno, mp_pad, mp_flags, mp_pages
NODE = struct.Struct("=HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
NODE_BYTES = NODE.size
DB = struct.Struct("=IHHQQQQQ")  # md_pad, md_flags, md_depth, branch, leaf, overflow pages, entries, root
META = struct.Struct("=IIQQ" + DB.format[1:] * 2 + "QQ")  # magic, version, address, mapsize, dbs[2], last_pg, txnid
PGNO = struct.Struct("=Q")

P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
MDB_INTEGERKEY = 0x08  # the free tree's keys: native integers, not bytes, in order
P_INVALID = 2**64 - 1
MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
META_PAGES = 2
MIN_PAGE_BYTES, MAX_PAGE_BYTES = 512, 65536

if struct.calcsize("P") != 8:  # pgno_t is size_t: the format read here is the 64-bit one
    raise ImportError("mtaqueue.lmdbfile reads 64-bit LMDB files only")


class Damage(Exception):
    """The file is not what LMDB wrote: the message says where (page, tree) and what."""


@dataclass(frozen=True, slots=True)
class DbRecord:
    """MDB_db: one tree's root and counts."""

    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> DbRecord:
        _pad, flags, depth, branch, leaf, overflow, entries, root = DB.unpack_from(raw, offset)
        return cls(flags, depth, branch, leaf, overflow, entries, root)


@dataclass(frozen=True, slots=True)
class Meta:
    slot: int  # meta page 0 or 1
    txnid: int
    last_page: int
    page_bytes: int
    free: DbRecord
    main: DbRecord


@dataclass(frozen=True, slots=True)
class Leaf:
    key: bytes
    size: int  # the value's length
    inline: bytes | None  # the value, when it sits in the leaf page
    overflow: int  # else its first overflow page (0 when inline)
    page: int  # the leaf page holding this node


class DataFile:
    """An open data.mdb; read-only, pread only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; Damage when the file ends before them (a damaged page
        number or page count points past its end)."""
        data = os.pread(self._fd, size, offset)
        if len(data) < size:
            raise Damage(f"bytes {offset}..{offset + size} lie past the end of the file ({self.size} bytes)")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def metas(self) -> list[Meta | Damage]:
        """Both meta pages, each parsed or the reason it is unusable (as LMDB would refuse it)."""
        out: list[Meta | Damage] = []
        page_bytes = 0
        for slot in range(META_PAGES):
            try:
                meta = self._meta(slot, page_bytes)
            except Damage as exc:
                out.append(exc)
                if slot == 0:  # LMDB finds meta page 1 by meta page 0's page size
                    out.append(Damage("meta page 1 cannot be located: meta page 0 is unusable"))
                    return out
                continue
            page_bytes = meta.page_bytes
            out.append(meta)
        return out

    def _meta(self, slot: int, page_bytes: int) -> Meta:
        offset = slot * page_bytes
        raw = self.read(offset, PAGE_HEADER_BYTES + META.size)
        if len(raw) < PAGE_HEADER_BYTES + META.size:
            raise Damage(f"meta page {slot} is missing: the file is {self.size} bytes (truncated)")
        _pgno, _pad, flags, _lower, _upper = PAGE_HEADER.unpack_from(raw)
        fields = META.unpack_from(raw, PAGE_HEADER_BYTES)
        magic, version = fields[0], fields[1]
        if not flags & P_META or magic != MAGIC:
            raise Damage(f"meta page {slot} is not an LMDB meta page (flags {flags:#x}, magic {magic:#x})")
        if version != DATA_VERSION:
            raise Damage(f"meta page {slot} has format version {version}, not {DATA_VERSION}")
        free = DbRecord.unpack(raw, PAGE_HEADER_BYTES + 24)
        main = DbRecord.unpack(raw, PAGE_HEADER_BYTES + 24 + DB.size)
        psize = DB.unpack_from(raw, PAGE_HEADER_BYTES + 24)[0]  # mm_psize = mm_dbs[FREE_DBI].md_pad
        last_page, txnid = fields[-2], fields[-1]
        if not MIN_PAGE_BYTES <= psize <= MAX_PAGE_BYTES or psize & (psize - 1):
            raise Damage(f"meta page {slot} gives an impossible page size {psize}")
        if slot and psize != page_bytes:
            raise Damage(f"meta page {slot} gives page size {psize}, meta page 0 {page_bytes}")
        if last_page < META_PAGES - 1 or last_page > 2**48:
            raise Damage(f"meta page {slot} gives an impossible last page {last_page}")
        if self.size < META_PAGES * psize:
            raise Damage(f"the file is {self.size} bytes, less than its two {psize}-byte meta pages (truncated)")
        return Meta(slot, txnid, last_page, psize, free, main)

    def newest(self) -> Meta:
        """The meta LMDB would use: the valid one with the higher txnid; Damage if neither is."""
        found = self.metas()
        valid = [m for m in found if isinstance(m, Meta)]
        if not valid:
            raise Damage("; ".join(str(d) for d in found))
        if len(valid) < len(found):  # LMDB refuses to open with either meta page broken
            raise Damage(next(str(d) for d in found if isinstance(d, Damage)))
        return max(valid, key=lambda m: m.txnid)


class Snapshot:
    """The trees of one meta page, walked page by page. Damage in a subtree is recorded
    in `damage` (one line each) and the walk goes on with the rest of the tree."""

    def __init__(self, data: DataFile, meta: Meta) -> None:
        self.data = data
        self.meta = meta
        self.psize = meta.page_bytes
        self.file_pages = data.size // self.psize
        self.damage: list[str] = []
        self.used = bytearray(meta.last_page + 1)  # 1: in a tree, 2: listed free
        self.used[0:META_PAGES] = b"\x01" * META_PAGES
        self.free_complete = False
        self.beyond_end = 0  # the highest page a tree needs that lies beyond the end of the file

    # --- pages ---------------------------------------------------------------------

    def _read(self, pgno: int, count: int = 1) -> bytes:
        self._inside(pgno, count)
        return self.data.read(pgno * self.psize, count * self.psize)

    def _inside(self, pgno: int, count: int) -> None:
        if pgno < META_PAGES or pgno + count - 1 > self.meta.last_page:
            raise Damage(f"page number {pgno} is outside the snapshot's pages 2..{self.meta.last_page}")
        if pgno + count > self.file_pages:
            self.beyond_end = max(self.beyond_end, pgno + count - 1)
            raise Damage(f"page {pgno + count - 1} lies beyond the end of the file (page {self.file_pages}: "
                         f"{self.data.size} bytes): the file was truncated")

    def _claim(self, pgno: int, count: int, what: str) -> None:
        if self.used.find(b"\x01", pgno, pgno + count) >= 0 or self.used.find(b"\x02", pgno, pgno + count) >= 0:
            raise Damage(f"{what} page {pgno} is used twice")
        self.used[pgno:pgno + count] = b"\x01" * count

    def page(self, pgno: int, kinds: int) -> bytes:
        """A branch or leaf page, its header checked against what the tree expects."""
        raw = self._read(pgno)
        number, _pad, flags, lower, upper = PAGE_HEADER.unpack_from(raw)
        if number != pgno:
            raise Damage(f"page {pgno} says it is page {number}")
        if flags & ~(P_BRANCH | P_LEAF) or not flags & kinds or flags == P_BRANCH | P_LEAF:
            raise Damage(f"page {pgno} has flags {flags:#x}, expected {'branch' if kinds == P_BRANCH else 'leaf'}")
        if not PAGE_HEADER_BYTES + 2 <= lower <= upper <= self.psize or lower & 1:
            raise Damage(f"page {pgno} has impossible bounds lower={lower} upper={upper}")
        return raw

    def nodes(self, pgno: int, raw: bytes) -> Iterator[tuple[int, int, int, bytes, int]]:
        """(lo, hi, flags, key, offset of the data) of every node of a checked page."""
        _number, _pad, _flags, lower, upper = PAGE_HEADER.unpack_from(raw)
        count = (lower - PAGE_HEADER_BYTES) >> 1
        for ptr in struct.unpack_from(f"={count}H", raw, PAGE_HEADER_BYTES):
            if ptr < upper or ptr + NODE_BYTES > self.psize:
                raise Damage(f"page {pgno} has a node at impossible offset {ptr}")
            lo, hi, flags, ksize = NODE.unpack_from(raw, ptr)
            start = ptr + NODE_BYTES
            if start + ksize > self.psize:
                raise Damage(f"page {pgno} has a key running past the page")
            yield lo, hi, flags, raw[start:start + ksize], start + ksize

    def leaves_of_page(self, pgno: int, raw: bytes) -> Iterator[Leaf]:
        for lo, hi, flags, key, data in self.nodes(pgno, raw):
            size = lo | hi << 16
            if flags & F_DUPDATA:
                raise Damage(f"page {pgno} holds duplicate data, which no spool table uses")
            if flags & F_BIGDATA:
                if data + PGNO.size > self.psize:
                    raise Damage(f"page {pgno} has an overflow reference running past the page")
                yield Leaf(key, size, None, PGNO.unpack_from(raw, data)[0], pgno)
            else:
                if data + size > self.psize:
                    raise Damage(f"page {pgno} has a value running past the page")
                yield Leaf(key, size, raw[data:data + size], 0, pgno)

    def overflow_pages(self, leaf: Leaf) -> int:
        """Check the first overflow page of a big value; the number of pages it spans."""
        count = (PAGE_HEADER_BYTES - 1 + leaf.size) // self.psize + 1  # OVPAGES
        self._inside(leaf.overflow, 1)
        number, _pad, flags, pages = OVERFLOW_HEADER.unpack(self.data.read(leaf.overflow * self.psize,
                                                                           OVERFLOW_HEADER.size))
        if number != leaf.overflow or flags != P_OVERFLOW or pages != count:
            raise Damage(f"overflow page {leaf.overflow} (a value of {leaf.size} bytes) has page number {number}, "
                         f"flags {flags:#x}, {pages} pages: expected {count}")
        self._inside(leaf.overflow, count)
        return count

    def value_prefix(self, leaf: Leaf, size: int) -> bytes:
        """The first `size` bytes of a value (one small read for a big one)."""
        if leaf.inline is not None:
            return leaf.inline[:size]
        self.overflow_pages(leaf)
        return self.data.read(leaf.overflow * self.psize + PAGE_HEADER_BYTES, min(size, leaf.size))

    def value(self, leaf: Leaf) -> bytes:
        """The value of a leaf: inline, or read from its checked overflow pages."""
        if leaf.inline is not None:
            return leaf.inline
        count = self.overflow_pages(leaf)
        return self._read(leaf.overflow, count)[PAGE_HEADER_BYTES:PAGE_HEADER_BYTES + leaf.size]

    # --- trees ---------------------------------------------------------------------

    def tree(self, db: DbRecord, name: str) -> Iterator[Leaf]:
        """Every leaf reachable from db's root, in key order; damaged subtrees are skipped
        and noted. The tree's counts are checked when nothing in it was damaged."""
        if db.root == P_INVALID:
            if db.entries or db.depth:
                self.damage.append(f"table {name}: no root page but {db.entries} entries")
            return
        counts = [0, 0, 0, 0]  # branch, leaf, overflow pages, entries
        damaged = len(self.damage)
        previous: bytes | int | None = None
        stack: list[tuple[int, int]] = [(db.root, 1)]
        while stack:
            pgno, depth = stack.pop()
            try:
                if depth > db.depth:
                    raise Damage(f"page {pgno} lies deeper than the tree's depth {db.depth}")
                raw = self.page(pgno, P_LEAF if depth == db.depth else P_BRANCH)
                self._claim(pgno, 1, name)
                if depth < db.depth:
                    counts[0] += 1
                    children = [lo | hi << 16 | flags << 32 for lo, hi, flags, _key, _data in self.nodes(pgno, raw)]
                    stack.extend((child, depth + 1) for child in reversed(children))
                    continue
                counts[1] += 1
                leaves = list(self.leaves_of_page(pgno, raw))
                for leaf in leaves:
                    order = int.from_bytes(leaf.key, "little") if db.flags & MDB_INTEGERKEY else leaf.key
                    if previous is not None and order <= previous:  # type: ignore[operator]
                        raise Damage(f"page {pgno} has keys out of order")
                    previous = order
                    if leaf.overflow:
                        pages = self.overflow_pages(leaf)
                        self._claim(leaf.overflow, pages, name)
                        counts[2] += pages
                counts[3] += len(leaves)
            except Damage as exc:
                self.damage.append(f"table {name}: {exc}")
                continue
            yield from leaves
        found = DbRecord(db.flags, db.depth, counts[0], counts[1], counts[2], counts[3], db.root)
        if len(self.damage) == damaged and found != db:
            self.damage.append(f"table {name}: its record says {db.branch_pages}/{db.leaf_pages}/"
                               f"{db.overflow_pages} branch/leaf/overflow pages and {db.entries} entries, "
                               f"the tree has {counts[0]}/{counts[1]}/{counts[2]} and {counts[3]}")

    def branches(self, db: DbRecord, name: str) -> None:
        """The start-time check of a tree: its branch pages read and checked (page number,
        kind, bounds), its leaves not read; the count of branch pages checked against the
        tree's record. These are the pages LMDB reads on every lookup, some 1% of a big
        table (a 4 KiB branch page holds ~100 children). Branch pages whose children are
        leaves are checked but not parsed: their leaves lie below the snapshot's last page,
        which the caller compares with the file's size."""
        if db.root == P_INVALID:
            if db.entries or db.depth:
                self.damage.append(f"table {name}: no root page but {db.entries} entries")
            return
        damaged = len(self.damage)
        found = 0
        stack: list[tuple[int, int]] = [(db.root, 1)]
        while stack:
            pgno, depth = stack.pop()
            try:
                raw = self.page(pgno, P_LEAF if depth == db.depth else P_BRANCH)
                self._claim(pgno, 1, name)
                if depth == db.depth:
                    continue  # the root is the only leaf read
                found += 1
                if depth + 1 < db.depth:
                    stack.extend((lo | hi << 16 | flags << 32, depth + 1) for lo, hi, flags, _key, _data
                                 in self.nodes(pgno, raw))
            except Damage as exc:
                self.damage.append(f"table {name}: {exc}")
        if len(self.damage) == damaged and found != db.branch_pages:
            self.damage.append(f"table {name}: its record says {db.branch_pages} branch pages, the tree has {found}")

    def named(self) -> dict[bytes, DbRecord]:
        """The named databases (the main tree's sub-database records)."""
        out = {}
        for leaf in self.tree(self.meta.main, "(main)"):
            if leaf.inline is not None and len(leaf.inline) == DB.size:
                out[leaf.key] = DbRecord.unpack(leaf.inline)
        return out

    def read_free(self) -> None:
        """Mark the pages the free tree lists; free_complete when it was read whole.
        Call after walking every tree: a page both used and listed free is damage."""
        damaged = len(self.damage)
        for leaf in self.tree(self.meta.free, "(free pages)"):
            try:
                idl = self.value(leaf)
                count = PGNO.unpack_from(idl)[0] if len(idl) >= PGNO.size else -1
                if count < 0 or len(idl) < (count + 1) * PGNO.size:
                    raise Damage(f"a free-page list of {len(idl)} bytes claims {count} pages")
                for pgno in struct.unpack_from(f"={count}Q", idl, PGNO.size):
                    if not META_PAGES <= pgno <= self.meta.last_page:
                        raise Damage(f"the free-page list names page {pgno}, outside 2..{self.meta.last_page}")
                    if self.used[pgno]:
                        raise Damage(f"page {pgno} is both in use and listed free")
                    self.used[pgno] = 2
            except Damage as exc:
                self.damage.append(f"table (free pages): {exc}")
        self.free_complete = len(self.damage) == damaged

    def loose_leaves(self) -> Iterator[tuple[int, bool, list[Leaf]]]:
        """(page, orphan, its leaves) for each well-formed leaf page inside the file that no
        tree reached. orphan: the free tree was read whole and does not list the page, so
        it belongs to a subtree that damage cut off (the invariant above); otherwise it may
        be a freed page holding an old version of its records."""
        for pgno in range(META_PAGES, min(self.meta.last_page + 1, self.file_pages)):
            if self.used[pgno] == 1:
                continue
            try:
                leaves = list(self.leaves_of_page(pgno, self.page(pgno, P_LEAF)))
            except Damage:
                continue
            yield pgno, self.free_complete and not self.used[pgno], leaves
