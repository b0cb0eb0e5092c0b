"""OpenSMTPD as a peer of bench/run --sweep: fetched, unpacked, run privately, stopped.

Owns everything OpenSMTPD needs on a machine where Postfix is installed (the two
Debian packages conflict: both provide mail-transport-agent):

- fetch(): `apt-get download opensmtpd` and `dpkg -x` into a cache directory outside
  the repo (~/.cache/mta-bench/opensmtpd/<version>/, or $XDG_CACHE_HOME), plus the
  .deb of any library it needs that the machine lacks (found with `ldd`), unpacked
  alongside and put on LD_LIBRARY_PATH. Nothing is installed; the system is unchanged.
- OpenSmtpdInstance: one `smtpd -d` relaying e2e.test to the common sink, in a
  private mount and UTS namespace (`unshare`), because its paths are compiled in:
  /var/spool/smtpd (the queue), /var/lib/opensmtpd/empty (the chroot), /var/run
  (control socket) come from a private /var in the run's temp dir; its two users
  (opensmtpd, opensmtpq) exist only in a private copy of /etc/passwd and /etc/group;
  its host name is `opensmtpd.bench` (a name with a dot: no lookup of the machine's
  own name); and /etc/resolv.conf says `nameserver 127.0.0.1` and `lookup file`.

Invariants: nothing here asks the machine's DNS resolver: OpenSMTPD resolves every
client's address (its "lookup" process, asr) and reads resolv.conf for that, so in
its namespace resolv.conf points at loopback and restricts asr to /etc/hosts; even a
query that should not happen stays on 127.0.0.1. It listens on and relays to
127.0.0.1 only. Every process is stopped through its process group (smtpd -d is the
leader; its children stay in the group); every wait is bounded.

OpenSMTPD 6.8 as Debian 12 ships it does not fsync a new message before its 250
(a weaker durability bar than mta's and Postfix's) and calls listen() with a backlog
of 5: with more concurrent connection attempts the kernel drops SYNs and clients
retry 1 s later (bench/run counts these drops per run: TcpExt ListenDrops).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from peers import E2E_DOMAIN
from procs import HOST, kill_pids, log, wait_greeting
from procstat import group_cpu_seconds, group_pids

PACKAGE: Final = "opensmtpd"
SMTPD_REL: Final = Path("usr/sbin/smtpd")
UNSHARE: Final = "/usr/bin/unshare"
USERS: Final = ("opensmtpd", "opensmtpq")  # compiled into Debian's build
FIRST_FREE_ID: Final = 64900  # private ids for those users, first free one from here
HOSTNAME: Final = "opensmtpd.bench"
STOP_GRACE_SECONDS: Final = 10.0
APT_TIMEOUT_SECONDS: Final = 120.0

# Written to smtpd.conf. `stock` is OpenSMTPD as shipped: its outbound defaults
# (5 connections per route, 5 s between connections on a route, 2 s per relay) gave
# ~14 msg/s to the one sink here. `matched` gives it the outbound window mta and
# Postfix have (20 connections to the destination) and drops the connect delays
# (neither mta nor Postfix has them); the only tuning, reported with the results.
LIMITS: Final = {
    "stock": "",
    "matched": ("mta limit max-conn-per-route 20 max-conn-per-host 20 "
                "conn-delay-route 0 conn-delay-relay 0 reconn-delay-route 0"),
}

SMTPD_CONF: Final = """\
# Written by bench/run --sweep; a private instance (own namespace, spool, users).
listen on {host} port {port} hostname {hostname}
{limits}
action "relay" relay host smtp+notls://{host}:{sink_port} helo {hostname}
match from local for domain "{domain}" action "relay"
"""

# Inside the namespace: mounts first (the unshare'd shell is root in it), then exec,
# so the pid bench/run started *is* smtpd, the process group leader.
NAMESPACE_SCRIPT: Final = """\
set -e
mount --bind "$BENCH_VAR" /var
mount --bind "$BENCH_RESOLV" /etc/resolv.conf
mount --bind "$BENCH_PASSWD" /etc/passwd
mount --bind "$BENCH_GROUP" /etc/group
hostname "$BENCH_HOSTNAME"
exec "$BENCH_SMTPD" -d -f "$BENCH_CONF"
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mta-bench" / PACKAGE


def _root_version(root: Path) -> str:
    return root.parent.name


def locate() -> Path | None:
    """The newest unpacked tree in the cache (its `root/`), or None."""
    roots = sorted(cache_dir().glob(f"*/root/{SMTPD_REL}"))
    return roots[-1].parents[2] if roots else None


def library_path(root: Path) -> str:
    """LD_LIBRARY_PATH for libraries unpacked next to smtpd (may be empty)."""
    dirs = [root / d for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu",
                               "lib", "usr/lib")]
    return os.pathsep.join(str(d) for d in dirs if d.is_dir() and any(d.glob("*.so*")))


def missing_libraries(root: Path) -> list[str]:
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(root))
    done = subprocess.run(["ldd", str(root / SMTPD_REL)], capture_output=True, env=env,
                          stdin=subprocess.DEVNULL, check=False, timeout=30)
    return re.findall(r"^\s*(\S+) => not found", done.stdout.decode(), re.M)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL,
                          check=False, timeout=APT_TIMEOUT_SECONDS,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                          stdin=subprocess.DEVNULL, check=False, timeout=30)
    return done.stdout.decode().endswith("installed")


def fetch() -> tuple[Path | None, str]:
    """Download and unpack opensmtpd (and missing libraries): (root, what happened)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="download-") as tmp:
        work = Path(tmp)
        # apt drops privileges to _apt for downloads: it must be able to write here.
        work.chmod(0o777)
        done = _run(["apt-get", "download", PACKAGE], work)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if done.returncode != 0 or not debs:
            return None, ("`apt-get download opensmtpd` failed: "
                          + (done.stderr.decode(errors="replace").strip()[-300:]
                             or f"status {done.returncode}"))
        version = debs[0].name.split("_")[1]
        final = cache / version
        root = final / "root"
        if final.exists():
            shutil.rmtree(final)
        root.mkdir(parents=True)
        done = _run(["dpkg", "-x", str(debs[0]), str(root)], work)
        if done.returncode != 0:
            return None, f"dpkg -x failed: {done.stderr.decode(errors='replace')[-300:]}"
        missing = missing_libraries(root)
        if missing:
            # The package's own library dependencies that this machine lacks.
            deps = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests",
                         PACKAGE], work).stdout.decode()
            wanted = [name for name in re.findall(r"^\s*\|?Depends: ([^<\s]+)$", deps, re.M)
                      if name.startswith("lib") and not _installed(name)]
            for name in wanted:
                got = _run(["apt-get", "download", name], work)
                for deb in work.glob(f"{name}_*.deb"):
                    _run(["dpkg", "-x", str(deb), str(root)], work)
                if got.returncode != 0:
                    log(f"opensmtpd: `apt-get download {name}` failed")
            missing = missing_libraries(root)
            if missing:
                return None, f"smtpd needs libraries not found: {', '.join(missing)}"
        return root, f"fetched opensmtpd {version} into {root}"


def locate_or_fetch() -> tuple[Path | None, str]:
    root = locate()
    if root is not None and not missing_libraries(root):
        return root, f"opensmtpd {_root_version(root)} from {root}"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return None, "no apt-get/dpkg to fetch opensmtpd with"
    try:
        return fetch()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"fetching opensmtpd failed: {exc}"


def version_of(root: Path) -> str:
    return _root_version(root)


def _free_ids(count: int) -> list[int]:
    used: set[int] = set()
    for path in ("/etc/passwd", "/etc/group"):
        for line in Path(path).read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit():
                used.add(int(fields[2]))
    ids: list[int] = []
    candidate = FIRST_FREE_ID
    while len(ids) < count:
        if candidate not in used:
            ids.append(candidate)
        candidate += 1
    return ids


class OpenSmtpdInstance:
    """One private smtpd relaying e2e.test to the sink; the same surface as Postfix's."""

    def __init__(self, root: Path, workdir: Path, port: int, sink_port: int,
                 limits: str = "matched"):
        self.root = root
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / "smtpd.log"
        self.proc: subprocess.Popen | None = None
        var = workdir / "var"
        for sub in ("spool", "lib/opensmtpd/empty", "run", "tmp", "mail"):
            (var / sub).mkdir(parents=True, exist_ok=True)
        # smtpd checks that the chroot and spool parents are root-owned, not writable
        # by others.
        for d in (workdir, var, var / "spool", var / "lib", var / "lib/opensmtpd",
                  var / "lib/opensmtpd/empty", var / "run"):
            d.chmod(0o755)
        (var / "tmp").chmod(0o1777)
        ids = _free_ids(len(USERS))
        passwd = Path("/etc/passwd").read_text().rstrip("\n") + "\n" + "".join(
            f"{user}:x:{uid}:{uid}:bench {user}:/var/lib/opensmtpd/empty:/usr/sbin/nologin\n"
            for user, uid in zip(USERS, ids))
        group = Path("/etc/group").read_text().rstrip("\n") + "\n" + "".join(
            f"{user}:x:{gid}:\n" for user, gid in zip(USERS, ids))
        (workdir / "passwd").write_text(passwd)
        (workdir / "group").write_text(group)
        (workdir / "resolv.conf").write_text(
            "# bench/run: inside smtpd's namespace only. Loopback, and asr reads\n"
            "# /etc/hosts alone (`lookup file`): no query leaves the machine.\n"
            f"nameserver {HOST}\noptions attempts:1 timeout:1\nlookup file\n")
        self.conf = workdir / "smtpd.conf"
        self.conf.write_text(SMTPD_CONF.format(
            host=HOST, port=port, hostname=HOSTNAME, limits=LIMITS[limits],
            sink_port=sink_port, domain=E2E_DOMAIN))
        for path in (workdir / "passwd", workdir / "group", workdir / "resolv.conf",
                     self.conf):
            path.chmod(0o644)

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float) -> str | None:
        """None once smtpd greets on our port; otherwise why not."""
        env = dict(os.environ, BENCH_VAR=str(self.workdir / "var"),
                   BENCH_RESOLV=str(self.workdir / "resolv.conf"),
                   BENCH_PASSWD=str(self.workdir / "passwd"),
                   BENCH_GROUP=str(self.workdir / "group"), BENCH_HOSTNAME=HOSTNAME,
                   BENCH_SMTPD=str(self.root / SMTPD_REL), BENCH_CONF=str(self.conf))
        libs = library_path(self.root)
        if libs:
            env["LD_LIBRARY_PATH"] = libs
        argv = [UNSHARE, "--mount", "--uts", "--propagation", "private", "--",
                "/bin/sh", "-c", NAMESPACE_SCRIPT]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=self.workdir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        return wait_greeting(self.port, timeout, self.proc)

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> list[int]:
        """SIGTERM to the group, SIGKILL what is left after the grace period."""
        if self.proc is None:
            return []
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already gone
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            log(f"opensmtpd: still running {STOP_GRACE_SECONDS:.0f}s after SIGTERM")
        left = group_pids(pgid)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone: that is the goal
        kill_pids(left, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            log(f"opensmtpd: pid {pgid} did not exit after SIGKILL")
        return left

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
