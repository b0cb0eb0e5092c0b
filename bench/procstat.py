"""CPU accounting from /proc for bench/run: per process, per process group, per machine.

Owns every /proc read the benchmark makes. Linux only; values are seconds of CPU
(user + sys), from SC_CLK_TCK ticks (10 ms here) or, where a tick is too coarse (many
small processes), from the scheduler's nanosecond run times. Also the resident
memory of a process group (--sweep's peak RSS), one process's memory and open fds
(the soak's samples), the kernel's count of connections dropped by full listen
queues, and the machine's description every result records.

Invariant: a process that exits between listing /proc and reading it is skipped, never
an error; a reaped child's CPU moves into its parent's cutime/cstime, so summing own
CPU plus cutime/cstime over a live process tree loses nothing but what was reaped by
a parent outside the tree.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from dataclasses import dataclass
from typing import Final

TICKS = os.sysconf("SC_CLK_TCK")


def read_stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat fields from field 3 (state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ")": split after its last ")".
    return stat[stat.rindex(b")") + 2:].split()


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process alone (not its children); None if it is gone."""
    fields = read_stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14, 15


def group_pids(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (field 5 of /proc/PID/stat)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = read_stat_fields(entry.name)
        if fields is not None and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def group_titles(pgid: int) -> dict[int, bytes]:
    """pid -> process title (argv as ps shows it) of every live process in a group."""
    titles = {}
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                titles[pid] = f.read().replace(b"\0", b" ").strip()
        except OSError:
            continue  # exited between the two reads
    return titles


MTA_TITLE: Final = re.compile(r"mta: (\w+(?:#\d+)?)(?: gen\d+)?$")


def mta_processes(pgid: int) -> dict[str, int]:
    """mta's processes in a group: title without the generation ("master", "inbound#1",
    "scheduler#1", "delivery#1", "control#1") -> pid."""
    found = {}
    for pid, raw in group_titles(pgid).items():
        match = MTA_TITLE.match(raw.decode(errors="replace"))
        if match:
            found[match.group(1)] = pid
    return found


def threads_runtime_seconds(pid: int | str) -> float:
    """CPU time of a process's live threads, in ns precision (/proc/PID/task/*/schedstat,
    first field: sum_exec_runtime). 0.0 if unreadable (a zombie has no live threads)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return total / 1e9


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of every live process in a group, plus the children they reaped.

    bench/run starts each server as a session leader, so its workers share its group;
    Postfix's master makes itself a session leader the same way.

    Per process: its own CPU is the larger of utime+stime (/proc/PID/stat, whole
    10 ms ticks, truncated, but including threads that already exited) and the sum of
    its live threads' schedstat run time (exact): truncation alone would lose up to
    10 ms per process, i.e. about a second per run over Postfix's ~130 daemons. Reaped
    children come from cutime+cstime (one truncated sum per parent).
    """
    return sum(group_cpu_by_kind(pgid).values())


def group_cpu_by_kind(pgid: int) -> dict[str, float]:
    """group_cpu_seconds split by kind of process: mta's titles name it (`mta: inbound#1
    gen1` -> "inbound", `mta: master` -> "master"), others by program name. A reaped
    child's CPU counts for its parent's kind."""
    by_kind: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = read_stat_fields(entry.name)  # None: exited between listing and read
        if fields is None or int(fields[2]) != pgid:
            continue
        ticks_own = (int(fields[11]) + int(fields[12])) / TICKS  # utime stime
        own = max(ticks_own, threads_runtime_seconds(entry.name))
        kind = process_kind(entry.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + own + (int(fields[13]) + int(fields[14])) / TICKS
    return by_kind


def process_kind(pid: int | str) -> str:
    """mta's kind from its title ("inbound" of `mta: inbound#1 gen1`), else the program's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").replace("\0", " ").split()
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0] == "mta:" and len(argv) > 1:
        return argv[1].split("#")[0]
    return os.path.basename(argv[0])


def _cpu_line() -> list[int]:
    """/proc/stat's "cpu" line: user nice system idle iowait irq softirq steal ...
    in ticks, summed over CPUs (guest time is inside user)."""
    with open("/proc/stat", "rb") as f:
        return [int(v) for v in f.readline().split()[1:]]


def machine_busy_seconds(interrupts: bool = True) -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat), summed over CPUs.

    interrupts=False leaves out irq and softirq time: loopback TCP is processed in
    softirq context, which is charged to no process, so a run that moves a lot of
    traffic over loopback would otherwise look like interference."""
    fields = _cpu_line()
    busy = sum(fields[:3]) + fields[7] + (fields[5] + fields[6] if interrupts else 0)
    return busy / TICKS


def machine_interrupt_seconds() -> float:
    """CPU seconds all CPUs spent in irq and softirq since boot (/proc/stat)."""
    fields = _cpu_line()
    return (fields[5] + fields[6]) / TICKS


def reaped_children_cpu_seconds() -> float:
    """User + sys CPU of this process's waited-for children (each loadgen run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    """User + sys CPU of this process, all threads (bench/run's own reader threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every live process in a group, summed (/proc/PID/statm).

    A sum of RSS counts a page shared by N processes N times (shared libraries, a
    prefork parent's pages its children did not write to): an upper bound of what
    the group holds, comparable between servers that fork alike, not a PSS."""
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_BYTES
        except (OSError, ValueError, IndexError):
            continue  # exited between the listing and the read
    return total


def listen_drops() -> int | None:
    """TcpExt ListenDrops since boot (/proc/net/netstat): SYNs and handshakes a full
    listen (accept) queue dropped, machine-wide. None if unreadable."""
    try:
        with open("/proc/net/netstat", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith(b"TcpExt:") and values.startswith(b"TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            value = table.get(b"ListenDrops")
            return int(value) if value is not None else None
    return None


@dataclass
class ProcSample:
    pid: int
    rss_bytes: int
    rss_anon_bytes: int
    fds: int


def read_proc(pid: int) -> ProcSample | None:
    """VmRSS, RssAnon (/proc/PID/status) and open fds of one process; None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"VmRSS", b"RssAnon"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    if b"VmRSS" not in fields:
        return None  # a zombie has no memory left
    return ProcSample(pid, fields[b"VmRSS"], fields.get(b"RssAnon", 0), fds)


def machine_line() -> str:
    """The machine in a report's first line: "2 CPUs, Python 3.11.7"."""
    return f"{os.cpu_count()} CPUs, Python {platform.python_version()}"


def machine_info(loadavg: bool = False) -> dict:
    """Python, platform, CPUs and the time, for a result's JSON (with `loadavg`: the load now)."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if loadavg:
        info["loadavg_at_end"] = os.getloadavg()
    return info
