"""Process plumbing every bench driver shares (bench/run, its modes, the sweep, the soak).

- free_port, greets, wait_greeting: loopback only (HOST).
- Server: a server under test started in its own session (its pid is its process
  group's id), its output in files (a chatty server never blocks on a pipe nobody
  reads), its CPU read by process group, stopped by process group: SIGTERM, then
  SIGKILL after a grace period (workers may outlive their master).
- become_subreaper, reap_orphans, kill_pids: daemons that leave our process tree
  (Postfix's master) are adopted and reaped, never left as zombies.
- log: one progress line on stderr, prefixed with the tool's name (set_log_name).

Invariants: every wait is bounded; processes are signalled by pid or process group,
never by name.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from procstat import group_cpu_by_kind, group_cpu_seconds, group_titles, process_cpu_seconds

HOST: Final = "127.0.0.1"
BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
STOP_GRACE_SECONDS: Final = 10.0
STDERR_TAIL_LINES: Final = 15
PR_SET_CHILD_SUBREAPER: Final = 36  # <linux/prctl.h>

_log_name = "bench"


def set_log_name(name: str) -> None:
    global _log_name
    _log_name = name


def log(msg: str) -> None:
    print(f"{_log_name}: {msg}", file=sys.stderr, flush=True)


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now and not handed out before in this run: ports
    picked together are bound only later, and the kernel may hand one out twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def greets(port: int, timeout: float = 1.0) -> bool:
    """True if something on the port answers with a 220 greeting (then we QUIT)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            if not s.recv(512).startswith(b"220"):
                return False
            s.sendall(b"QUIT\r\n")
            try:
                s.recv(512)
            except OSError:
                pass  # the 220 already proved readiness; the QUIT reply is a courtesy
            return True
    except OSError:
        return False


def wait_greeting(port: int, timeout: float, proc: subprocess.Popen | None = None,
                  poll_seconds: float = 0.05) -> str | None:
    """None once the port greets with 220; otherwise why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"exited with status {proc.returncode} before accepting connections"
        if greets(port):
            return None
        time.sleep(poll_seconds)
    return f"no 220 greeting on {HOST}:{port} within {timeout:.0f}s"


def tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already gone: that is the goal


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone: that is the goal


def become_subreaper() -> bool:
    """Adopt orphaned descendants (prctl PR_SET_CHILD_SUBREAPER), so reap_orphans() can
    collect them: Postfix's master daemonizes and, once it exits, its last children
    would otherwise wait as zombies ("[smtpd] <defunct>") until init gets to them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux, or no prctl: zombies stay until init reaps them


def reap_orphans(keep: set[int]) -> int:
    """Reap exited children of ours that no Popen object owns (pids not in `keep`)."""
    reaped = 0
    me = str(os.getpid()).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] == b"Z" and fields[1] == me:
            try:
                if os.waitpid(int(entry.name), os.WNOHANG)[0]:
                    reaped += 1
            except ChildProcessError:
                pass  # reaped meanwhile by its owner
    return reaped


@dataclass
class Launch:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    # The started pid is a prefork master with this many inbound workers as children:
    # its own CPU is measured apart, and the workers are counted.
    prefork_workers: int | None = None


class Server:
    """One started server: its process, its log files and how to stop it."""

    def __init__(self, name: str, launch: Launch, workdir: Path, port: int,
                 stop_grace_seconds: float = STOP_GRACE_SECONDS):
        self.name = name
        self.port = port
        self.stop_grace_seconds = stop_grace_seconds
        self.stdout_path = workdir / "server.stdout"
        self.stderr_path = workdir / "server.stderr"
        # Files, not pipes: a chatty server must never block on a full pipe we don't read.
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(launch.argv, cwd=launch.cwd, env=launch.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)

    def wait_ready(self, timeout: float) -> str | None:
        """None once it greets; otherwise why it is not ready."""
        return wait_greeting(self.port, timeout, self.proc, poll_seconds=0.1)

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process (mta: master, inbound, scheduler, ...)."""
        return group_cpu_by_kind(self.proc.pid)

    def leader_cpu_seconds(self) -> float | None:
        """The started process alone: for mta, the prefork master without its workers."""
        return process_cpu_seconds(self.proc.pid)

    def children_titled(self, prefix: bytes) -> int:
        """Live processes of the group, but the leader, whose title starts with `prefix`."""
        return sum(1 for pid, title in group_titles(self.proc.pid).items()
                   if pid != self.proc.pid and title.startswith(prefix))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        return tail(self.stderr_path)

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL it after the grace period."""
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: still running {self.stop_grace_seconds:.0f}s after SIGTERM; SIGKILL")
        # Workers of a multi-process server may outlive the master: kill what is left.
        signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: pid {pgid} did not exit after SIGKILL")
