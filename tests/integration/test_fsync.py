"""Durability order, seen from the kernel: the spool is synced before the 250 is written.

The server runs under `strace -f`; one client sends messages one after another over one
connection (no concurrency, so no group commit). For every `250 2.0.0 Ok: queued as`
write, between the read that brought the end of its data and the start of that write:

- an fdatasync (or fsync) of the LMDB data file started and returned 0: the message's
  pages are on disk;
- then a pwrite of the meta page through LMDB's O_DSYNC descriptor returned: the commit
  itself is on disk (LMDB with sync and metasync on, without writemap).

Both must come from the process that wrote the 250 (its queue writer thread): another
process syncing the spool at that moment proves nothing. Threads are mapped to their
process through the clone calls in the trace.

Event order is line order: strace -f writes one line per syscall entry or exit, and a
syscall interrupted by another thread's line is split into "<unfinished ...>" and
"<... name resumed>" lines.
"""

from __future__ import annotations

import re
import shutil
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer

pytestmark = pytest.mark.integration

MESSAGES = 20
SYSCALLS = ("fdatasync,fsync,msync,sync_file_range,write,writev,sendto,sendmsg,"
            "read,readv,recvfrom,recvmsg,pwrite64,pwritev,openat,clone,clone3")
SOCKET_READS = {"read", "readv", "recvfrom", "recvmsg"}
SOCKET_WRITES = {"write", "writev", "sendto", "sendmsg"}
SYNCS = {"fdatasync", "fsync"}

_LINE = re.compile(r"^(\d+) +\d\d:\d\d:\d\d\.\d+ (.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\(")
_FD = re.compile(r"^\w+\((\d+)<([^>]*)>")
_RESULT = re.compile(r"\) += (-?\d+)(?:<[^>]*>)?(?: .*)?$")


@dataclass(frozen=True)
class Syscall:
    tid: int
    name: str
    text: str  # the whole call, "name(args) = result", unfinished and resumed parts joined
    start: int  # line index of its entry
    end: int  # line index of its return

    @property
    def fd(self) -> int | None:
        found = _FD.match(self.text)
        return int(found.group(1)) if found else None

    @property
    def path(self) -> str:
        """What strace -y says the first argument (a descriptor) is: a path or socket:[inode]."""
        found = _FD.match(self.text)
        return found.group(2) if found else ""

    @property
    def result(self) -> int | None:
        found = _RESULT.search(self.text)
        return int(found.group(1)) if found else None


def parse_strace(text: str) -> list[Syscall]:
    calls: list[Syscall] = []
    unfinished: dict[int, tuple[int, str]] = {}  # tid -> (line index, head): one per thread
    for index, line in enumerate(text.splitlines()):
        match = _LINE.match(line)
        if match is None:
            continue
        tid, rest = int(match.group(1)), match.group(2)
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            start, head = unfinished.pop(tid)
            assert head.startswith(resumed.group(1) + "("), (head, line)
            calls.append(Syscall(tid, resumed.group(1), head + resumed.group(2), start, index))
        elif rest.endswith("<unfinished ...>"):
            unfinished[tid] = (index, rest[: -len("<unfinished ...>")].rstrip())
        elif (call := _CALL.match(rest)) is not None:
            calls.append(Syscall(tid, call.group(1), rest, index, index))
    return sorted(calls, key=lambda c: c.start)


def processes(calls: list[Syscall]) -> dict[int, int]:
    """Thread id -> the pid of its process, from the clone(CLONE_THREAD) calls in the trace."""
    parent = {c.result: c.tid for c in calls if c.name in ("clone", "clone3")
              and "CLONE_THREAD" in c.text and c.result is not None and c.result > 0}

    def pid(tid: int) -> int:
        while tid in parent:
            tid = parent[tid]
        return tid

    return {c.tid: pid(c.tid) for c in calls}


def check_synced_before_each_250(calls: list[Syscall]) -> list[str]:
    """The queue ids of the 250 writes, in order; asserts the sync order for each."""
    pid = processes(calls)
    dsync_fds = {(pid[c.tid], c.result) for c in calls if c.name == "openat" and "data.mdb" in c.text
                 and "O_DSYNC" in c.text and (c.result or -1) >= 0}
    assert dsync_fds, "LMDB opened no O_DSYNC descriptor for its meta page (metasync off?)"
    syncs = [c for c in calls if c.name in SYNCS and c.path.endswith("/data.mdb") and c.result == 0]
    meta_writes = [c for c in calls if c.name in ("pwrite64", "pwritev") and c.path.endswith("/data.mdb")
                   and (pid[c.tid], c.fd) in dsync_fds and (c.result or 0) > 0]
    replies = [c for c in calls if c.name in SOCKET_WRITES and "250 2.0.0 Ok: queued as " in c.text]
    ids = []
    for reply in replies:
        qid = re.search(r"queued as ([0-9A-F]{21})", reply.text)
        assert qid is not None, reply.text
        ids.append(qid.group(1))
        reads = [c for c in calls if c.name in SOCKET_READS and c.tid == reply.tid and c.fd == reply.fd
                 and c.end < reply.start and (c.result or 0) > 0]
        assert reads, f"no read before {reply.text[:80]}"
        data_end = reads[-1]  # sequential sends: the client waits for this 250, so this read ended DATA
        assert '.\\r\\n", ' in data_end.text, f"the last read before the 250 is not the end of data: {data_end.text[-80:]}"
        synced = [s for s in syncs if pid[s.tid] == pid[reply.tid]
                  and data_end.end < s.start and s.end < reply.start]
        assert synced, (f"{qid.group(1)}: no fdatasync/fsync of data.mdb between the end of its data "
                        f"(line {data_end.end + 1}) and its 250 (line {reply.start + 1})")
        committed = [m for m in meta_writes if pid[m.tid] == pid[reply.tid]
                     and synced[0].end < m.start and m.end < reply.start]
        assert committed, (f"{qid.group(1)}: no O_DSYNC meta page write between its fdatasync "
                           f"(line {synced[0].end + 1}) and its 250 (line {reply.start + 1})")
    return ids


def test_parse_strace_joins_unfinished_and_resumed_lines() -> None:
    trace = (
        '10 07:00:00.000001 fdatasync(15</s/data.mdb> <unfinished ...>\n'
        '11 07:00:00.000002 read(17<socket:[9]>, "x\\r\\n.\\r\\n", 256000) = 6\n'
        '10 07:00:00.000003 <... fdatasync resumed>) = 0\n'
        '11 07:00:00.000004 write(17<socket:[9]>, "250 ok\\r\\n", 8 <unfinished ...>\n'
        '10 07:00:00.000005 +++ exited with 0 +++\n'
        '11 07:00:00.000006 <... write resumed>) = 8\n'
    )
    sync, read, write = parse_strace(trace)
    assert (sync.name, sync.start, sync.end, sync.result, sync.path) == ("fdatasync", 0, 2, 0, "/s/data.mdb")
    assert (read.name, read.fd, read.result, read.start, read.end) == ("read", 17, 6, 1, 1)
    assert (write.name, write.start, write.end, write.result) == ("write", 3, 5, 8)
    assert write.text == 'write(17<socket:[9]>, "250 ok\\r\\n", 8) = 8'


_THREAD = ('1 07:00:00.000000 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD'
           '|CLONE_SYSVSEM, child_tid=0x7f0, exit_signal=0}, 88) = 2')
_FORK = '1 07:00:00.000000 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD, child_tidptr=0x7f0) = 3'
_OPEN = '1 07:00:00.000000 openat(AT_FDCWD</w>, "/s/data.mdb", O_WRONLY|O_DSYNC|O_CLOEXEC) = 15</s/data.mdb>'
_READ = '1 07:00:00.000000 read(16<socket:[9]>, "Subject: x\\r\\n\\r\\nx\\r\\n.\\r\\n", 256000) = 23'
_SYNC = '2 07:00:00.000000 fdatasync(14</s/data.mdb>) = 0'
_META = '2 07:00:00.000000 pwrite64(15</s/data.mdb>, "\\0", 120, 32) = 120'
_250 = '1 07:00:00.000000 write(16<socket:[9]>, "250 2.0.0 Ok: queued as 66165161021830DB59BAD\\r\\n", 47) = 47'


@pytest.mark.parametrize(("durable", "lines"), [
    (True, [_OPEN, _READ, _SYNC, _META, _250]),
    (False, [_OPEN, _READ, _SYNC.replace(") = 0", " <unfinished ...>"), _META, _250,
             "2 07:00:00.000000 <... fdatasync resumed>) = 0"]),
    (False, [_OPEN, _READ, _250, _SYNC, _META]),
    (False, [_OPEN, _SYNC, _READ, _META, _250]),
    (False, [_OPEN, _READ, _SYNC, _250, _META]),
    (False, [_OPEN.replace("|O_DSYNC", ""), _READ, _SYNC, _META, _250]),
    (False, [_OPEN, _READ, _SYNC.replace("2 ", "3 ", 1), _META, _250]),
], ids=["in-order", "sync-returns-after-250", "250-first", "sync-before-data", "meta-after-250", "no-dsync",
        "sync-by-another-process"])
def test_checker_rejects_a_250_before_the_commit_is_durable(durable: bool, lines: list[str]) -> None:
    calls = parse_strace("\n".join([_THREAD, _FORK, *lines]) + "\n")
    if durable:
        assert check_synced_before_each_250(calls) == ["66165161021830DB59BAD"]
    else:
        with pytest.raises(AssertionError):
            check_synced_before_each_250(calls)


def test_fsync_completes_before_every_250(mta_server: Callable[..., MtaServer], tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not on PATH (`make test-deps` installs it)")
    trace_path = tmp_path / "strace.txt"
    server = mta_server(wrapper=[strace, "-f", "-tt", "-y", "-s", "4096", "-e", f"trace={SYSCALLS}",
                                 "-o", str(trace_path)])
    sent_ids = []
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        for n in range(MESSAGES):
            assert smtp.mail(f"s{n}@client.test")[0] == 250
            assert smtp.rcpt(f"r{n}@local.test")[0] == 250
            code, text = smtp.data(f"Message-ID: <{n}@fsync.test>\r\n\r\nmessage {n}\r\n".encode())
            assert code == 250, text
            sent_ids.append(text.decode().rsplit(" ", 1)[-1])
    assert server.stop() == 0, server.log_tail()

    calls = parse_strace(trace_path.read_text(errors="replace"))
    assert check_synced_before_each_250(calls) == sent_ids
    syncs = [c for c in calls if c.name in SYNCS and c.path.endswith("/data.mdb")]
    assert len(syncs) >= MESSAGES  # sequential: no group commit, one sync per message
    assert {c.name for c in syncs} == {"fdatasync"}  # what LMDB uses on Linux (no writemap: no msync)
    written_by = {c.name for c in calls if c.name in SOCKET_WRITES and "socket:" in c.path
                  and "250 " in c.text}
    assert written_by <= {"write", "writev"}  # libuv writes stream sockets with write/writev
