"""System calls of a running server, counted per process kind and per syscall with strace.

Owns the tracer for bench/run --syscalls: one `strace -f` attached to every live process
(and thread) of a server, started after its warm-up and stopped after its load, and
the count of what it saw. strace writes one line per call (`-o FILE`, arguments raw and
strings cut: cheap to print); a call is counted once, on the line that starts it (a
call another thread interrupts shows again as "<... NAME resumed>", not counted), as
`strace -c` counts them. The -c summary itself cannot say which process made a call,
and a Postfix master forks new daemons during the load: each traced task's kind is
known from the start (procstat.process_kind of its process: mta's title, else the
program's name), a task created meanwhile (a clone/fork/vfork return value) takes its
creator's kind until it calls execve, whose program name is its kind from then on.

Invariants: the tracer is started and stopped by pid (SIGINT: strace detaches, the
traced processes run on); every wait is bounded; Linux and strace only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

from procstat import process_kind

STRACE: Final = "strace"
ATTACH_TIMEOUT_SECONDS: Final = 20.0
DETACH_TIMEOUT_SECONDS: Final = 60.0
# "1234  write(5, 0x55..., 1024) = 1024" or "1234  <... read resumed>...": pid, then the
# call's name right before "(" (a "resumed" line starts with "<", so it never matches).
CALL_LINE: Final = re.compile(rb"^(\d+) +([a-z_0-9]+)\(")
RESUMED_LINE: Final = re.compile(rb"^(\d+) +<\.\.\. ([a-z_0-9]+) resumed>")
CREATES: Final = frozenset(("clone", "clone3", "fork", "vfork"))
RETURNED: Final = re.compile(rb"= (0x[0-9a-f]+|\d+)")
EXEC_PATH: Final = re.compile(rb'execve\("([^"]*)"')


def strace_installed() -> bool:
    return shutil.which(STRACE) is not None


def task_kinds(pids: Iterable[int]) -> dict[int, str]:
    """tid -> kind for every thread of the given processes (a process gone meanwhile is
    left out)."""
    kinds: dict[int, str] = {}
    for pid in pids:
        kind = process_kind(pid)
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # exited since it was listed
        if kind != "?":
            kinds.update(dict.fromkeys(tids, kind))
    return kinds


def tracer_of(pid: int) -> int | None:
    """TracerPid of a process (/proc/PID/status); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Tracer:
    """`strace -f` attached to a set of processes, writing every call to workdir/strace.txt."""

    def __init__(self, pids: list[int], workdir: Path):
        self.path = workdir / "strace.txt"
        self.kinds = task_kinds(pids)
        self.pids = sorted(pids)
        argv = [STRACE, "-f", "-qq", "-s", "0", "-e", "raw=!execve", "-o", str(self.path)]
        for pid in self.pids:
            argv += ["-p", str(pid)]
        self.stderr_path = workdir / "strace.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)

    def wait_attached(self) -> str | None:
        """None once every process that is still alive has strace as its tracer."""
        deadline = time.monotonic() + ATTACH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"strace exited {self.proc.returncode}: {self.stderr_tail()}"
            waiting = [p for p in self.pids if tracer_of(p) not in (None, self.proc.pid)]
            if not waiting:
                return None
            time.sleep(0.05)
        return f"strace did not attach to {waiting} within {ATTACH_TIMEOUT_SECONDS:.0f}s"

    def stop(self) -> str | None:
        """SIGINT (strace detaches and flushes its output); None, or what went wrong."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(DETACH_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            return f"strace did not detach within {DETACH_TIMEOUT_SECONDS:.0f}s; killed"
        return None

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-1000:]
        except OSError as exc:
            return f"(cannot read {self.stderr_path}: {exc})"

    def counts(self) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """count_calls of the trace, once the tracer has stopped. Threads of the traced
        processes listed again first: one a process started while strace attached (its
        clone not in the trace) is still of its process's kind, not "?"."""
        for tid, kind in task_kinds(self.pids).items():
            self.kinds.setdefault(tid, kind)
        with open(self.path, "rb") as f:
            return count_calls(f.readlines(), self.kinds)


def count_calls(lines: Sequence[bytes], kinds: dict[int, str]
                ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(kind -> syscall -> calls, kind -> tasks) in strace -f output.

    `kinds`: tid -> kind of the tasks traced from the start. A task created meanwhile
    takes its creator's kind when it first calls (it may run before its creator's
    fork returns, so the creators are found in a first pass), until an execve of its
    succeeds: from then on its kind is the program's name. A task of unknown kind
    counts as "?". Tasks are processes and threads alike: those traced from the start
    and those seen calling; every kind in `kinds` has an entry, even without calls."""
    creator = {}
    for tid, name, line in finished_calls(lines):
        if name in CREATES:
            new = returned(line)
            if new:
                creator[new] = tid
    # Every task traced from the start counts for its kind, calls or not.
    calls: dict[str, dict[str, int]] = {kind: {} for kind in kinds.values()}
    tasks: dict[str, set[int]] = {}
    for tid, kind in kinds.items():
        tasks.setdefault(kind, set()).add(tid)
    kinds = dict(kinds)
    for tid, name, line in finished_calls(lines, starts=True):
        if line is None:  # a call starts: count it for the task's kind now
            if tid not in kinds:
                kinds[tid] = kinds.get(creator.get(tid, -1), "?")
            per = calls.setdefault(kinds[tid], {})
            per[name] = per.get(name, 0) + 1
            tasks.setdefault(kinds[tid], set()).add(tid)
        elif name == "execve" and line.rstrip().endswith(b"= 0"):
            path = EXEC_PATH.search(line)
            if path:
                kinds[tid] = os.path.basename(path.group(1).decode(errors="replace"))
    return calls, {kind: len(tids) for kind, tids in tasks.items()}


def finished_calls(lines: Iterable[bytes], starts: bool = False
                   ) -> Iterator[tuple[int, str, bytes | None]]:
    """(tid, syscall, its start and result lines joined) per finished call, in order;
    with `starts`, also (tid, syscall, None) where each call starts. "+++ exited" and
    "--- SIGNAL ---" lines are skipped."""
    pending: dict[int, bytes] = {}  # tid -> the line that started its unfinished call
    for line in lines:
        resumed = RESUMED_LINE.match(line)
        if resumed is not None:
            tid = int(resumed.group(1))
            started = pending.pop(tid, None)
            if started is not None:
                yield tid, resumed.group(2).decode(), started.rstrip() + b" " + line
            continue
        match = CALL_LINE.match(line)
        if match is None:
            continue
        tid, name = int(match.group(1)), match.group(2).decode()
        if starts:
            yield tid, name, None
        if line.rstrip().endswith(b"<unfinished ...>"):
            pending[tid] = line
        else:
            yield tid, name, line


def returned(line: bytes) -> int:
    """The return value of a finished call's line (0 if none could be read)."""
    found = RETURNED.search(line, line.rfind(b")"))
    return int(found.group(1), 0) if found else 0
