"""Peers of an end-to-end run: the counting sink both relays deliver to, and Postfix.

Owns two things bench/run starts for `--e2e`:

- CountingSink: one SMTP sink on loopback, the common next hop. Postfix's smtp-sink
  (C, one process, `-c` prints "sess=N quit=N mesg=N\\r" on every "." received) when
  it is installed, else bench/sink.py with `--count` (same "mesg=N" records). A reader
  thread timestamps each record, so the driver knows when the N-th message ARRIVED.
  With `ids_header` it is always bench/sink.py `--count --ids HEADER`, which also says
  how many distinct values of that header arrived and how many repeats (`ids()`).
- PostfixInstance: a private Postfix (its own config, queue and data directories in a
  temp dir, never /etc/postfix or the system queue) relaying `e2e.test` to the sink.

Invariants: everything listens on and sends to 127.0.0.1 only; neither peer ever asks
the machine's DNS resolver (Postfix relays to a bracketed numeric relayhost with DNS
lookups disabled and no reverse lookup of clients); every process started here is
stopped by pid, never by name; every wait is bounded.
"""

from __future__ import annotations

import bisect
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Final

from procs import BENCH_DIR, HOST, kill_pids, log, wait_greeting
from procstat import group_cpu_seconds, process_cpu_seconds

SINK_SCRIPT: Final = BENCH_DIR / "sink.py"
SMTP_SINK: Final = Path("/usr/sbin/smtp-sink")
POSTFIX: Final = Path("/usr/sbin/postfix")
POSTCONF: Final = Path("/usr/sbin/postconf")
SHIPPED_MASTER_CF: Final = Path("/etc/postfix/master.cf")
E2E_DOMAIN: Final = "e2e.test"
COUNT_RECORD: Final = re.compile(rb"mesg=(\d+)")
IDS_RECORD: Final = re.compile(rb"ids=(\d+) dups=(\d+)")
STOP_GRACE_SECONDS: Final = 10.0

# Exactly what `--install-peers` runs (recipes.md): the preseed keeps the installer
# from asking, and "No configuration" leaves /etc/postfix/main.cf absent, so no
# system instance is configured or started (and no policy-rc.d start happens here).
POSTFIX_INSTALL_COMMANDS: Final = (
    "apt-get update",
    'echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections',
    "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix",
)


# ---------------------------------------------------------------------------
# The counting sink


class CountingSink:
    """One SMTP sink on 127.0.0.1:port; `count()` is how many messages have arrived."""

    def __init__(self, prefer: str, port: int, workdir: Path, ids_header: str | None = None):
        if prefer not in ("auto", "smtp-sink", "python"):
            raise ValueError(f"unknown sink kind {prefer!r}")
        use_smtp_sink = ids_header is None and (
            prefer == "smtp-sink" or (prefer == "auto" and SMTP_SINK.exists()))
        if use_smtp_sink:
            # -u nobody: required as root. -c: the counters we read. No -M (it drops the
            # connection after message N and the relay defers one message) and no -d
            # (a file per message: the sink would measure its disk). Backlog 1024.
            argv = [str(SMTP_SINK), "-u", "nobody", "-c", f"{HOST}:{port}", "1024"]
            self.kind = "smtp-sink"
        else:
            argv = [sys.executable, str(SINK_SCRIPT), "--host", HOST, "--port", str(port),
                    "--count", *(["--ids", ids_header] if ids_header else [])]
            self.kind = "sink.py" + (f" --ids {ids_header}" if ids_header else "")
        self.port = port
        self.stderr_path = workdir / "sink.stderr"
        # Arrival history: times[i] is when the count first reached counts[i].
        self._times: list[float] = []
        self._counts: list[int] = []
        self._ids = (0, 0)  # --ids: (distinct values, repeats) so far
        self._ids_times: list[float] = []  # when the distinct count first reached _ids_counts[i]
        self._ids_counts: list[int] = []
        self._changed = threading.Condition()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            now = time.monotonic()
            # Records may be cut between reads; the counter only grows, so the largest
            # complete "mesg=N" seen so far is the count (a cut "mesg=1" of "mesg=12"
            # can only be too low, and the next record corrects it at once).
            found = COUNT_RECORD.findall(chunk)
            if not found:
                continue
            value = max(int(v) for v in found)
            ids = [(int(u), int(d)) for u, d in IDS_RECORD.findall(chunk)]
            with self._changed:
                if ids:  # both only grow: the largest pair is the latest complete one
                    self._ids = max(self._ids, max(ids))
                    if not self._ids_counts or self._ids[0] > self._ids_counts[-1]:
                        self._ids_times.append(now)
                        self._ids_counts.append(self._ids[0])
                        self._changed.notify_all()
                if not self._counts or value > self._counts[-1]:
                    self._times.append(now)
                    self._counts.append(value)
                    self._changed.notify_all()

    def wait_ready(self, timeout: float) -> str | None:
        return wait_greeting(self.port, timeout, self.proc)

    def count(self) -> int:
        with self._changed:
            return self._counts[-1] if self._counts else 0

    def ids(self) -> tuple[int, int]:
        """With ids_header: (distinct values of it arrived, arrivals repeating one)."""
        with self._changed:
            return self._ids

    def wait_for_ids(self, n: int, deadline: float) -> float | None:
        """Monotonic time at which n distinct ids had arrived; None if not by `deadline`."""
        return self._wait(self._ids_counts, self._ids_times, n, deadline)

    def first_arrival_after(self, when: float) -> float | None:
        """Monotonic time of the first arrival after `when`; None if none yet."""
        with self._changed:
            i = bisect.bisect_right(self._times, when)
            return self._times[i] if i < len(self._times) else None

    def wait_for(self, n: int, deadline: float) -> float | None:
        """Monotonic time at which the count reached n; None if not by `deadline`."""
        return self._wait(self._counts, self._times, n, deadline)

    def _wait(self, counts: list[int], times: list[float], n: int, deadline: float) -> float | None:
        with self._changed:
            while not counts or counts[-1] < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    return None
                self._changed.wait(min(remaining, 0.5))
            return times[bisect.bisect_left(counts, n)]

    def wait_quiet(self, quiet_seconds: float, timeout: float) -> int:
        """Wait until nothing arrived for `quiet_seconds` (bounded); the count then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._changed:
                last = self._times[-1] if self._times else 0.0
            if time.monotonic() - last >= quiet_seconds:
                break
            time.sleep(quiet_seconds / 4)
        return self.count()

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid) or 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after the grace period; the reader thread then ends."""
        kill_pids([self.proc.pid], signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            kill_pids([self.proc.pid], signal.SIGKILL)
            self.proc.wait(5)
        self._reader.join(5)


# ---------------------------------------------------------------------------
# Postfix


def postfix_installed() -> bool:
    return all(p.exists() for p in (POSTFIX, POSTCONF, SHIPPED_MASTER_CF))


def postfix_version() -> str:
    done = subprocess.run([str(POSTCONF), "-d", "-h", "mail_version"], capture_output=True,
                          stdin=subprocess.DEVNULL, check=False, timeout=30)
    return done.stdout.decode().strip() or "(unknown version)"


def install_postfix() -> bool:
    """Run POSTFIX_INSTALL_COMMANDS (as root); True if Postfix is installed afterwards."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in POSTFIX_INSTALL_COMMANDS:
        log(f"installing Postfix: {command}")
        done = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
                              timeout=600)
        if done.returncode != 0:
            log(f"`{command}` failed with status {done.returncode}:\n"
                + done.stdout.decode(errors="replace")[-2000:])
            return False
    return postfix_installed()


# Changed from Postfix's defaults, each for a reason given in bench/README.md. Anything
# not listed here is as shipped: above all the queue file is fsynced before the 250
# (the durability bar), initial_destination_concurrency = 5,
# default_destination_concurrency_limit = 20, default_process_limit = 100,
# max_use = 100. in_flow_delay is bench/run's `--postfix-in-flow-delay` (0 unless
# told otherwise; Postfix ships 1s).
POSTFIX_MAIN_CF: Final = """\
# Written by bench/run for one end-to-end measurement; private instance.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = {host_net}
relay_domains = {domain}
relayhost = [{host}]:{sink_port}
default_transport = smtp
relay_transport = smtp
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
in_flow_delay = {in_flow_delay}
"""


class PostfixInstance:
    """A private Postfix: config_directory, queue and data under `workdir`."""

    def __init__(self, workdir: Path, port: int, sink_port: int, in_flow_delay: str):
        self.port = port
        self.config_dir = workdir / "postfix-etc"
        self.queue_dir = workdir / "postfix-queue"
        self.data_dir = workdir / "postfix-data"
        self.maillog = workdir / "postfix.log"
        self.stderr_path = workdir / "postfix.stderr"
        self.master_pid: int | None = None
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True)
        # The daemons run as `postfix`; mkdtemp made our dirs 0700. Only `workdir` is
        # opened here: the caller makes the directories above it traversable.
        workdir.chmod(0o755)
        # master.lock and the daemons' caches live here: Postfix wants it its own.
        shutil.chown(self.data_dir, "postfix")
        (self.config_dir / "main.cf").write_text(POSTFIX_MAIN_CF.format(
            queue=self.queue_dir, data=self.data_dir, maillog=self.maillog, workdir=workdir,
            host=HOST, host_net="127.0.0.0/8", domain=E2E_DOMAIN, sink_port=sink_port,
            in_flow_delay=in_flow_delay))
        # master.cf as shipped, with the `smtp inet` listener moved to our port.
        shipped = SHIPPED_MASTER_CF.read_text().splitlines()
        lines = []
        for line in shipped:
            fields = line.split()
            if len(fields) >= 8 and fields[0] == "smtp" and fields[1] == "inet":
                line = f"{HOST}:{port} inet n - n - - smtpd"
            lines.append(line)
        (self.config_dir / "master.cf").write_text("\n".join(lines) + "\n")
        # Debian chroots most daemons, and only its init script populates the chroot.
        self._postconf("-F", "*/*/chroot = n")

    def _postconf(self, *args: str) -> None:
        subprocess.run([str(POSTCONF), "-c", str(self.config_dir), *args], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)

    def _postfix(self, command: str, timeout: float) -> int:
        """Run `postfix -c DIR command`; its messages are appended to stderr_path.

        Postfix commands write errors to stderr only when it is a terminal (else to
        syslog, which this machine lacks), so they get a pseudo-terminal."""
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.Popen([str(POSTFIX), "-c", str(self.config_dir), command],
                                    stdin=subprocess.DEVNULL, stdout=secondary,
                                    stderr=secondary)
        finally:
            os.close(secondary)
        output = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([primary], [], [], 0.2)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(primary, 4096)
                except OSError:  # EIO: every holder of the terminal closed it
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(primary)
        try:
            status = proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            status = -1
        with open(self.stderr_path, "ab") as err:
            err.write(f"$ postfix -c {self.config_dir} {command}  -> {status}\n".encode())
            err.write(bytes(output).replace(b"\r\n", b"\n"))
        return status

    def start(self, timeout: float) -> str | None:
        """None once smtpd greets on our port; otherwise why not."""
        status = self._postfix("start", timeout)
        if status != 0:
            return f"`postfix -c {self.config_dir} start` exited {status}"
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            self.master_pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            return f"no master pid in {pid_file}: {exc}"
        return wait_greeting(self.port, timeout)

    def processes(self) -> list[int]:
        """Every live process of this instance: the master's group, plus any process
        whose environment names our config directory (MAIL_CONFIG, inherited by every
        daemon), in case one ever left the group."""
        ours = f"MAIL_CONFIG={self.config_dir}".encode()
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if ours in f.read().split(b"\0"):
                        pids.append(int(entry.name))
                        continue
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # exited, or a kernel thread
            fields = stat[stat.rindex(b")") + 2:].split()
            # A zombie is gone already (init reaps it soon); its environ reads empty.
            if self.master_pid is not None and int(fields[2]) == self.master_pid \
                    and fields[0] != b"Z":
                pids.append(int(entry.name))
        return pids

    def cpu_seconds(self) -> float:
        """CPU of the master's process group: the master (setsid) and every daemon it
        forked, including those max_use/max_idle already retired (their CPU is in the
        master's cutime/cstime once it reaps them)."""
        return group_cpu_seconds(self.master_pid) if self.master_pid else 0.0

    def alive(self) -> bool:
        return self.master_pid is not None and os.path.exists(f"/proc/{self.master_pid}")

    def stop(self) -> list[int]:
        """`postfix stop`, then SIGKILL by pid whatever of ours is left; returns those."""
        if self.master_pid is not None or (self.queue_dir / "pid" / "master.pid").exists():
            if self._postfix("stop", STOP_GRACE_SECONDS + 5) != 0:
                log(f"postfix stop failed (see {self.stderr_path}); killing what is left")
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        if left:
            log(f"postfix: {len(left)} process(es) left after stop; SIGKILL {left}")
            kill_pids(left, signal.SIGKILL)
            time.sleep(0.2)
        return left

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for path in (self.stderr_path, self.maillog):
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            parts.extend(text[-lines:])
        return "\n".join(parts)
