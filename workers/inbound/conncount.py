"""Open connections per client address, all inbound workers of the node together, in shared memory.

[limits] max_connections_per_ip is always on, so its count is on every connection's path:
here a take and a give-back are memory reads and writes in one mmap'd file, no system
call and no lock (the LMDB cache took a write transaction, four GIL releases, for each).

The file `connections` in the cache's folder (0600, created or claimed under one flock
at worker start, never per connection) holds SLOTS worker slots. A slot belongs to one
live ConnectionCounts (its owner pid in the slot header) and only its owner writes it:
an open-addressing table (linear probing, CAPACITY entries) of (count, address), where
the address is the client's IP text itself (a longer string: a flagged 32-byte digest),
so two addresses never share a count. The owner also keeps each address's position in
a dict, so its own take and give-back are one read and one write of the count. An
address whose count falls to 0 stays ("parked": clients come back) until PARKED_MAX of
them are deleted together; a delete shifts the entries after it back (no tombstones)
while the slot's sequence number is odd. A reader sums the count of one address over
every claimed slot, reading a slot again when its sequence moved meanwhile.
Layout version and sizes are in the file header: a file of another layout is replaced
(rename) and the workers that mapped it keep theirs until they exit.

Invariants: a slot's table holds each address at most once; its owner
is the only writer, except at a claim (under the flock), which first frees the slots of
dead pids and zeroes the table of the slot it takes. The count of an address never
includes a dead worker's connections when it refuses: at the limit the slots holding
that address are checked with kill(pid, 0) and a dead owner's counts are left out (and
skipped from then on). Take is increment-then-check, so two workers taking the last
place at once may both refuse, never both admit. Ordering across processes relies on
the CPU keeping stores in order (x86-64's TSO); a torn read costs one wrong count, once.

Full (no free slot at claim, or MAX_USED addresses open in one slot): the count fails open
(connections are admitted uncounted), logged once (`event=connection_table_full`).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import zlib
from typing import Final

from mta import logs

FILE_NAME: Final = "connections"
MAGIC: Final = b"mtaconn1"
SLOTS: Final = 128  # inbound workers of two generations at once (a reload), and the restarted
CAPACITY: Final = 8192  # table entries per slot (a power of two)
MAX_USED: Final = CAPACITY * 3 // 4  # distinct addresses one worker counts at once; more: uncounted
ENTRY_BYTES: Final = 64  # native int64 field (0: free, else count + 1), then the key
KEY_BYTES: Final = ENTRY_BYTES - 8
SLOT_HEADER_BYTES: Final = 64  # int64 owner pid, sequence, entries in use
TABLES_OFFSET: Final = 3 * 4096  # file header (64 bytes), then the slot headers, page aligned
TABLE_BYTES: Final = CAPACITY * ENTRY_BYTES
FILE_BYTES: Final = TABLES_OFFSET + SLOTS * TABLE_BYTES  # sparse: only the pages in use take room
PARKED_MAX: Final = 1024  # entries at count 0 kept (a client often comes back), then deleted together
KEYS_KEPT: Final = 65_536  # addresses whose key and home position this worker remembers
READ_TRIES: Final = 8  # re-reads of a slot its owner is changing; then the last read stands
_MASK: Final = CAPACITY - 1
_HEADER = struct.Struct("=8sqqq")  # magic, slots, capacity, slots ever claimed (the readers' range)
_HIGH: Final = 3  # int64 index of "slots ever claimed" in the file header
_DIGEST_FLAG: Final = b"\xff"  # never in an IP's text


class ConnectionCounts:
    """One worker's slot in the node's shared connection counts (see the module docstring)."""

    def __init__(self, directory: str, pid: int) -> None:
        """Map `directory`/connections (creating it) and claim a slot for `pid`."""
        self.path = os.path.join(directory, FILE_NAME)
        self.pid = pid
        self._dead: set[tuple[int, int]] = set()  # (slot, owner pid) known dead: not counted
        self._full_logged = False
        self._at: dict[bytes, int] = {}  # this slot's entries: key -> int64 index of its field
        self._parked = 0  # entries of this slot at count 0 (field 1)
        self._keys: dict[str, tuple[bytes, int]] = {}  # ip -> (key, home): a client comes back
        self._mm, self._slot = _map_and_claim(self.path, pid)
        self._q = memoryview(self._mm).cast("q")  # the file as int64s
        if self._slot is None:
            self._log_full(f"all {SLOTS} worker slots in use")
        else:
            self._table = _table_offset(self._slot)
            self._used_at, self._seq_at = _used(self._slot), _seq(self._slot)

    def take(self, ip: str, limit: int) -> bool:
        """Count one connection from `ip` unless that makes more than `limit` (then False)."""
        if self._slot is None:
            return True
        key, home = self._key(ip)
        q = self._q
        at = self._at.get(key)
        if at is None:
            at = self._insert(key, home)
            if at is None:
                return True  # full: uncounted
            mine = 1
        else:
            field = q[at]
            q[at] = field + 1
            mine = field  # the field is the count + 1
            if field == 1:
                self._parked -= 1
        if mine + self._others(key, home, False) <= limit:
            return True
        if mine + self._others(key, home, True) <= limit:
            return True
        self._uncount(at)
        return False

    def give_back(self, ip: str) -> None:
        """Uncount one connection of `ip` taken with take (none counted: nothing happens)."""
        if self._slot is not None and (at := self._at.get(self._key(ip)[0])) is not None:
            self._uncount(at)

    def counts(self, ip: str) -> dict[int, int]:
        """The open connections of `ip` by worker pid, dead workers' included (a read)."""
        key, home = _key(ip)
        found: dict[int, int] = {}
        for _slot, owner_at, table in _SLOT_AT[:self._q[_HIGH]]:
            pid = self._q[owner_at]
            if pid and (n := self._count_in(owner_at, table, key, home)):
                found[pid] = found.get(pid, 0) + n
        return found

    def close(self) -> None:
        """Give the slot up: this worker's counts stop counting, and take admits uncounted."""
        if self._slot is not None and self._q[_owner(self._slot)] == self.pid:
            self._q[_owner(self._slot)] = 0
        self._slot = None

    # --- internals ---------------------------------------------------------------------

    def _key(self, ip: str) -> tuple[bytes, int]:
        found = self._keys.get(ip)
        if found is None:
            if len(self._keys) >= KEYS_KEPT:
                self._keys.clear()
            found = self._keys[ip] = _key(ip)
        return found

    def _uncount(self, at: int) -> None:
        field = self._q[at]
        if field > 1:
            self._q[at] = field - 1
            if field == 2:  # parked: deleted with others, or counted again meanwhile
                self._parked += 1
                if self._parked >= PARKED_MAX:
                    self._purge()

    def _insert(self, key: bytes, home: int) -> int | None:
        """Add `key` to this slot at count 1; None when the table is full."""
        q, used_at = self._q, self._used_at
        if q[used_at] >= MAX_USED and self._parked:
            self._purge()
        if q[used_at] >= MAX_USED:
            self._log_full(f"{MAX_USED} addresses in one worker's table")
            return None
        table, pos = self._table, home
        while q[(table + pos * ENTRY_BYTES) >> 3]:  # not there (self._at): the first free entry
            pos = (pos + 1) & _MASK
        offset = table + pos * ENTRY_BYTES
        self._mm[offset + 8:offset + ENTRY_BYTES] = key  # the key first: readers see a free entry until done
        q[offset >> 3] = 2
        q[used_at] += 1
        self._at[key] = offset >> 3
        return offset >> 3

    def _purge(self) -> None:
        """Delete the parked entries: the entries after each that belong at or before it
        move back (no tombstones); readers see the sequence odd meanwhile and read again."""
        q, mm, table = self._q, self._mm, self._table
        seq_at, used_at = self._seq_at, self._used_at
        q[seq_at] += 1  # odd: moving
        for key in [key for key, at in self._at.items() if q[at] == 1]:
            hole = (self._at.pop(key) * 8 - table) // ENTRY_BYTES  # its position
            probe = hole
            while True:
                probe = (probe + 1) & _MASK
                offset = table + probe * ENTRY_BYTES
                field = q[offset >> 3]
                if not field:
                    break
                moved = mm[offset + 8:offset + ENTRY_BYTES]
                home = zlib.crc32(moved) & _MASK
                if (hole < probe and hole < home <= probe) or (hole > probe and (home > hole or home <= probe)):
                    continue  # it belongs between the hole and here: it stays
                to = table + hole * ENTRY_BYTES
                mm[to + 8:to + ENTRY_BYTES] = moved
                q[to >> 3] = field
                self._at[moved] = to >> 3
                hole = probe
            q[(table + hole * ENTRY_BYTES) >> 3] = 0
            q[used_at] -= 1
        self._parked = 0
        q[seq_at] += 1  # even again

    def _others(self, key: bytes, home: int, check_alive: bool) -> int:
        """The count of `key` in the other claimed slots; `check_alive`: leave out (and
        remember) those of dead owners."""
        q, total, dead, mine = self._q, 0, self._dead, self._slot
        for slot, owner_at, table in _SLOT_AT[:q[_HIGH]]:
            pid = q[owner_at]
            if not pid or slot == mine or (dead and (slot, pid) in dead):
                continue
            n = self._count_in(owner_at, table, key, home)
            if n and check_alive and not alive(pid):
                dead.add((slot, pid))
                continue
            total += n
        return total

    def _count_in(self, owner_at: int, table: int, key: bytes, home: int) -> int:
        """The count of `key` in the slot whose header is at int64 `owner_at` and table at
        byte `table` (0: not there), read again while its owner moves entries (the
        sequence odd, or changed meanwhile). Runs for every slot at every connection:
        while loops, no calls."""
        q, mm = self._q, self._mm
        n = tries = 0
        while tries < READ_TRIES:
            before = q[owner_at + 1]
            n, pos, left = 0, home, CAPACITY  # bounded: the table may be changing under us
            while left:
                offset = table + pos * ENTRY_BYTES
                field = q[offset >> 3]
                if not field:
                    break
                if mm[offset + 8:offset + ENTRY_BYTES] == key:
                    n = field - 1
                    break
                pos, left = (pos + 1) & _MASK, left - 1
            if not before & 1 and q[owner_at + 1] == before:
                break
            tries += 1
        return n

    def _log_full(self, why: str) -> None:
        if not self._full_logged:
            self._full_logged = True
            logs.event("connection_table_full", file=self.path, why=why,
                       effect="connections admitted uncounted by max_connections_per_ip")


def _key(ip: str) -> tuple[bytes, int]:
    """The stored key of `ip` and its home position."""
    raw = ip.encode()
    if len(raw) > KEY_BYTES or b"\0" in raw:
        raw = _DIGEST_FLAG + hashlib.blake2b(raw, digest_size=32).digest()
    key = raw.ljust(KEY_BYTES, b"\0")
    return key, zlib.crc32(key) & _MASK


def _owner(slot: int) -> int:
    """The int64 index of the slot's owner pid (then its sequence, then entries in use)."""
    return (_HEADER.size + slot * SLOT_HEADER_BYTES) >> 3


def _seq(slot: int) -> int:
    return _owner(slot) + 1


def _used(slot: int) -> int:
    return _owner(slot) + 2


def _table_offset(slot: int) -> int:
    return TABLES_OFFSET + slot * TABLE_BYTES


def alive(pid: int) -> bool:
    """kill(pid, 0): the process exists (pid reuse aside)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, as another user
    return True


def _map_and_claim(path: str, pid: int) -> tuple[mmap.mmap, int | None]:
    """The file mapped (created 0600, or replaced when its layout is not this one's) and
    the slot claimed for `pid` (None: none free), under the file's flock."""
    header = _HEADER.pack(MAGIC, SLOTS, CAPACITY, 0)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except PermissionError as exc:
            raise PermissionError(f"cannot open {path}: {exc.strerror}; give it to the user mta runs as "
                                  "(chown), or delete it while mta is stopped") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the claim runs under it too
            st = os.fstat(fd)
            if _inode(path) != st.st_ino:
                continue  # replaced (or removed) while we waited: open the one there now
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            if st.st_size == 0:  # new: this process lays it out
                os.ftruncate(fd, FILE_BYTES)
                os.pwrite(fd, header, 0)
            elif st.st_size != FILE_BYTES or os.pread(fd, 24, 0) != header[:24]:
                _replace(path, header)  # another build's layout
                continue
            mm = mmap.mmap(fd, FILE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            q = memoryview(mm).cast("q")
            try:
                return mm, _claim(q, pid)
            finally:
                q.release()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the mmap holds a duplicate of fd
            os.close(fd)


def _claim(q: memoryview, pid: int) -> int | None:
    """Under the flock: free the slots of dead owners, take the lowest free one for `pid`
    with its table emptied; None when all are taken."""
    high = min(q[_HIGH], SLOTS)
    for slot in range(high):
        owner = q[_owner(slot)]
        if owner and not alive(owner):
            q[_owner(slot)] = 0
    free = next((slot for slot in range(SLOTS) if not q[_owner(slot)]), None)
    if free is None:
        return None
    first = _table_offset(free) >> 3
    for at in range(first, first + TABLE_BYTES // 8, ENTRY_BYTES // 8):
        if q[at]:
            q[at] = 0  # only the entries in use: the rest of a sparse file stays unwritten
    q[_seq(free)] = 0
    q[_used(free)] = 0
    q[_owner(free)] = pid
    q[_HIGH] = max(high, free + 1)
    return free


def _inode(path: str) -> int | None:
    try:
        return os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return None


def _replace(path: str, header: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.new"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, FILE_BYTES)
        os.pwrite(fd, header, 0)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_SLOT_AT: Final = [(slot, _owner(slot), _table_offset(slot)) for slot in range(SLOTS)]  # for the readers' loop
