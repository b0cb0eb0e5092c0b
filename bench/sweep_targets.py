"""bench/run --sweep's targets: which are there, how each is started, what a started one offers.

Kinds (sweep_grid.TARGET_KINDS): `wire` (the common sink itself, smtp-sink or
bench/sink.py: the load tool's limit), `mta` (one target per inbound worker count,
started as --e2e starts it: bench/run hands that over as a Rig), `postfix` (a private
instance, peers.py), `opensmtpd` (an unpacked .deb in its own namespaces,
peer_opensmtpd.py) and `aiosmtpd` (the baseline, also from the Rig). find_peers
installs or locates each peer and says why one is skipped; start_target returns a
Started (process group, port, handle) or why it is not ready, and always a handle to
stop.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import peer_opensmtpd
from peers import POSTFIX_INSTALL_COMMANDS, SMTP_SINK, CountingSink, PostfixInstance, install_postfix, \
    postfix_installed, postfix_version
from procs import free_port, log
from procstat import group_cpu_seconds, group_rss_bytes

START_TIMEOUT_SECONDS: Final = 20.0


class TargetProcess(Protocol):
    """A started target, whatever it is: how to measure it, check it and stop it."""

    def cpu_seconds(self) -> float: ...
    def alive(self) -> bool: ...
    def stop(self) -> object: ...
    def log_tail(self) -> str: ...


class ServerProcess(TargetProcess, Protocol):
    """bench/run's Server: spawned in its own session (its pid is the group's id)."""

    proc: subprocess.Popen

    def wait_ready(self, timeout: float) -> str | None: ...


@dataclass
class Rig:
    """What bench/run hands over: how mta and the aiosmtpd baseline are started.

    Each returns bench/run's Server, already spawned; the sweep waits for its
    greeting."""

    start_mta: Callable[[int, Path, int, int], ServerProcess]  # port, workdir, workers, sink port
    start_aiosmtpd: Callable[[int, Path], ServerProcess]  # port, workdir


@dataclass
class Target:
    """One row family of the sweep: a target kind, and for mta its worker count."""

    kind: str
    workers: int | None = None
    skipped: str = ""  # why it never ran (not installed, could not be fetched)
    detail: str = ""  # version, or how it was found

    @property
    def name(self) -> str:
        return f"mta-{self.workers}w" if self.kind == "mta" else self.kind

    @property
    def relays(self) -> bool:
        """Has a next hop: its end-to-end rate is measured at the common sink."""
        return self.kind in ("mta", "postfix", "opensmtpd")


class Started:
    """A running target: its process group (for CPU and RSS), port and handle."""

    def __init__(self, target: Target, port: int, pgid: int, handle: TargetProcess,
                 workdir: Path):
        self.target = target
        self.port = port
        self.pgid = pgid
        self.handle = handle
        self.workdir = workdir
        self.warm_sessions = 0  # the most sessions a warm-up has run on it

    def accepted_count(self) -> int | None:
        """What the target itself has accepted so far, where it says: the wire's
        count of messages, the baseline's files. None for a relay (its count is the
        common sink's)."""
        if isinstance(self.handle, _SinkHandle):
            return self.handle.sink.count()
        if self.target.kind == "aiosmtpd":
            try:
                return sum(1 for _ in os.scandir(self.workdir / "spool"))
            except OSError:
                return 0  # nothing written yet
        return None

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.pgid)

    def rss_bytes(self) -> int:
        return group_rss_bytes(self.pgid)


class _SinkHandle:
    """smtp-sink (or sink.py) as the wire-limit target."""

    def __init__(self, sink: CountingSink):
        self.sink = sink

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.sink.proc.pid)

    def alive(self) -> bool:
        return self.sink.alive()

    def stop(self) -> None:
        self.sink.stop()

    def log_tail(self) -> str:
        try:
            return self.sink.stderr_path.read_text(errors="replace")[-2000:]
        except OSError as exc:
            return f"(cannot read {self.sink.stderr_path}: {exc})"


def start_target(target: Target, rig: Rig, workdir: Path, sink_port: int,
                 args: argparse.Namespace) -> tuple[Started | None, TargetProcess | None, str | None]:
    """Start one target; (started, handle to stop even if not ready, why not ready)."""
    port = free_port()
    if target.kind == "wire":
        sink = CountingSink(args.sink, port, workdir)
        handle: TargetProcess = _SinkHandle(sink)
        why = sink.wait_ready(START_TIMEOUT_SECONDS)
        target.detail = sink.kind
        return (None if why else Started(target, port, sink.proc.pid, handle, workdir)), handle, why
    if target.kind == "postfix":
        pf = PostfixInstance(workdir, port, sink_port, args.postfix_in_flow_delay)
        why = pf.start(START_TIMEOUT_SECONDS)
        if why is not None or pf.master_pid is None:
            return None, pf, why or "no master pid"
        return Started(target, port, pf.master_pid, pf, workdir), pf, None
    if target.kind == "opensmtpd":
        root = peer_opensmtpd.locate()
        assert root is not None  # find_peers() skipped the target otherwise
        inst = peer_opensmtpd.OpenSmtpdInstance(root, workdir, port, sink_port,
                                                args.opensmtpd_limits)
        why = inst.start(START_TIMEOUT_SECONDS)
        if why is not None or inst.pgid is None:
            return None, inst, why or "not started"
        return Started(target, port, inst.pgid, inst, workdir), inst, None
    server: ServerProcess
    if target.kind == "mta":
        assert target.workers is not None  # plan() gives every mta target its count
        server = rig.start_mta(port, workdir, target.workers, sink_port)
    else:
        server = rig.start_aiosmtpd(port, workdir)
    why = server.wait_ready(START_TIMEOUT_SECONDS)
    return (None if why else Started(target, port, server.proc.pid, server, workdir)), server, why


def find_peers(kinds: list[str], args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """kind -> (why it is skipped or "", detail): installs or locates each peer."""
    found: dict[str, tuple[str, str]] = {}
    for kind in kinds:
        if kind == "postfix" or (kind == "wire" and args.sink != "python"):
            if not postfix_installed() and args.install_peers:
                install_postfix()
        if kind == "postfix":
            found[kind] = (("", f"Postfix {postfix_version()}") if postfix_installed() else
                           ("Postfix is not installed (bench/run --install-peers, or: "
                            + "; ".join(POSTFIX_INSTALL_COMMANDS) + ")", ""))
        elif kind == "opensmtpd":
            root, how = peer_opensmtpd.locate_or_fetch()
            log(f"opensmtpd: {how}")
            found[kind] = (("", f"OpenSMTPD {peer_opensmtpd.version_of(root)}, limits "
                                f"{args.opensmtpd_limits}") if root else (how, ""))
        elif kind == "aiosmtpd":
            if importlib.util.find_spec("aiosmtpd") is None and args.install_peers:
                log("installing aiosmtpd: pip install aiosmtpd")
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd"],
                               stdin=subprocess.DEVNULL, check=False, timeout=300)
                importlib.invalidate_caches()
            found[kind] = (("", "bench/baseline_aiosmtpd.py")
                           if importlib.util.find_spec("aiosmtpd") else
                           ("aiosmtpd is not importable (pip install aiosmtpd)", ""))
        elif kind == "wire":
            found[kind] = ("", "smtp-sink" if SMTP_SINK.exists() and args.sink != "python"
                           else "bench/sink.py (smtp-sink not installed)")
        else:
            found[kind] = ("", "")
    return found
