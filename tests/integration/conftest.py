"""Integration helpers: a real `mta serve` subprocess, its config, its queue CLI, a raw SMTP client.

MtaServer runs the server in a session of its own, so kill9() and stop() reach the
master and every worker it forked. The `mta_server` fixture stops every server it
made at teardown (SIGTERM, then SIGKILL), so no test leaves a process behind, even
when it fails.

Invariant: after stop() or kill9() returns, no process of that server is alive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest

from mtaqueue import records
from mtaqueue.records import Envelope
from tests.mtaqueue import spoolindex

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 15.0
STOP_GRACE_SECONDS = 10.0
CLI_TIMEOUT_SECONDS = 60.0
MIB = 1024 * 1024

_MASTER_PID = re.compile(rb"proc=master pid=(\d+)")


# --- config ------------------------------------------------------------------------------

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it) and that this test
    process has not been given before: ports picked together (a server's listeners, its control
    port) are not bound until the server starts, and the kernel may hand one out twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def server_config(port: int, spool: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The test server's config document; `sections` override keys, e.g. queue={"max_size_bytes": n}."""
    doc: dict[str, Any] = {
        "server": {"hostname": "mx.test"},
        "listener": [{"address": f"127.0.0.1:{port}"}],
        "queue": {"path": str(spool), "max_size_bytes": 64 * MIB},
        "limits": {"max_message_bytes": 10 * MIB},
        # local.test is a relay domain (no mailbox check) and nothing is delivered: tests of
        # receiving see the spool exactly as inbound left it. Delivery tests override both.
        # No delay notices either: spools filled with old messages would get one each.
        "relay": {"relay_domains": ["local.test"], "mynetworks": []},
        "delivery": {"workers": 0, "delay_warning_seconds": 0},
        # Per-test DNS cache, and a resolver on a loopback port where nothing answers:
        # no test can ever reach the machine's own resolver.
        "cache": {"path": str(spool.parent / f"{spool.name}-cache")},
        "control": {"listen": f"127.0.0.1:{free_port()}", "metrics_dir": str(spool.parent / f"{spool.name}-metrics")},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout_seconds": 1},
    }
    for name, values in sections.items():
        if isinstance(values, list):
            doc[name] = values
        else:
            doc[name] = {**doc.get(name, {}), **values}
    return doc


def toml_dumps(doc: dict[str, Any]) -> str:
    """Tables, tables of tables ([domains."x.test"]) and arrays of tables of plain values."""
    out: list[str] = []

    def table(header: str, values: dict[str, Any]) -> None:
        out.append(header)
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if k not in nested)
        out.append("")
        for key, sub in nested.items():
            table(f"{header[:-1]}.{_toml_key(key)}]", sub)

    for name, value in doc.items():
        if isinstance(value, list):
            for item in value:
                out.append(f"[[{name}]]")
                out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items())
                out.append("")
        else:
            table(f"[{name}]", value)
    return "\n".join(out)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# --- the server process -------------------------------------------------------------------

class MtaServer:
    """One `mta serve` process group: start, wait for its greeting, stop or crash it, query its queue.

    start() may be called again after stop() or kill9(): same config, port and spool.
    `wrapper` prefixes the command (e.g. strace, or `ip netns exec NS`); signals then go to
    the master by the pid it logs, and the process group still holds everything. `host`:
    where its greeting is awaited (a node in a network namespace listens on its own address).
    `cli_wrapper` prefixes the `mta` commands run on it (the queue CLI, `mta node`): a node in
    a namespace is administered from inside it, as an operator runs them on the node itself
    (its admin API answers a client off loopback only over TLS).
    """

    def __init__(self, config_path: Path | None, port: int, spool: Path, log_path: Path,
                 cwd: Path = REPO_ROOT, wrapper: Sequence[str] = (), host: str = "127.0.0.1",
                 cli_wrapper: Sequence[str] = ()) -> None:
        self.cli_wrapper = list(cli_wrapper)
        self.config_path = config_path
        self.port = port
        self.host = host
        self.spool = spool
        self.log_path = log_path
        self.cwd = cwd
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # offset of this run's log in log_path
        self._orphan_groups: list[int] = []  # groups of masters killed alone

    # start and stop

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> MtaServer:
        assert self.proc is None, "already running"
        command = [*self.wrapper, sys.executable, "-m", "mta", "serve", *self._config_args()]
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen(command, cwd=self.cwd, env=_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        try:
            self._wait_greeting(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_greeting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mta serve exited with {self.proc.returncode} before listening\n"
                                   f"{self.log_tail()}")
            if _greets(self.port, deadline, self.host):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"mta serve did not greet on {self.host}:{self.port} within "
                                   f"{timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def master_pid(self) -> int:
        pid = self._find_master_pid()
        assert pid is not None, f"the master has not logged its pid yet\n{self.log_tail()}"
        return pid

    def _find_master_pid(self) -> int | None:
        """The process we started, unless a wrapper runs the master (then the pid it logs)."""
        assert self.proc is not None
        if not self.wrapper:
            return self.proc.pid
        found = _MASTER_PID.search(self.log_bytes())
        return int(found.group(1)) if found is not None else None

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM the master (it drains), SIGKILL whatever is left after `grace`; the exit code."""
        proc = self.proc
        master = self._find_master_pid() if proc is not None else None
        if proc is not None and proc.poll() is None and master is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        self._kill_all()
        return proc.returncode if proc is not None else None

    def kill9(self, whole_group: bool = True) -> None:
        """Crash: SIGKILL the master and its workers; whole_group=False: the master alone,
        and its orphaned workers live on (see orphans_alive(); stop() kills them)."""
        assert self.proc is not None, "not running"
        if whole_group:
            self._kill_all()
            return
        os.kill(self.master_pid, signal.SIGKILL)
        if not self.wrapper:
            self.proc.wait(STOP_GRACE_SECONDS)
        self._orphan_groups.append(self.proc.pid)
        self.proc = None

    def orphans_alive(self) -> bool:
        """Whether a worker of a master killed by kill9(whole_group=False) still runs."""
        return any(group_alive(pgid) for pgid in self._orphan_groups)

    def _kill_all(self) -> None:
        groups = [*self._orphan_groups, *([self.proc.pid] if self.proc is not None else [])]
        for pgid in groups:  # start_new_session: a group's id is its leader's pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(STOP_GRACE_SECONDS)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while any(group_alive(pgid) for pgid in groups):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of groups {groups} survived SIGKILL")
            time.sleep(0.01)
        self.proc = None
        self._orphan_groups.clear()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # logs

    def log_bytes(self) -> bytes:
        """This run's log (since the last start)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_bytes().decode("utf-8", "replace").splitlines()
        return "--- server log tail ---\n" + "\n".join(text[-lines:])

    # the queue CLI

    def mta(self, *args: str, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """`python -m mta ARGS -c CONFIG`, in the server's working directory."""
        return run_mta(*args, *self._config_args(), cwd=self.cwd, check=check, stdin=stdin, wrapper=self.cli_wrapper)

    def queue_list(self) -> list[dict[str, Any]]:
        return json.loads(self.mta("queue", "list", "--json").stdout)

    def queue_body(self, msgid: str) -> bytes:
        return self.mta("queue", "show", msgid, "--body").stdout

    def queue_delete(self, *msgids: str) -> subprocess.CompletedProcess[bytes]:
        return self.mta("queue", "delete", *msgids, check=False)

    def spool_snapshot(self) -> SpoolSnapshot:
        return spool_snapshot(self.spool)

    def _config_args(self) -> list[str]:
        return ["-c", str(self.config_path)] if self.config_path is not None else []


def run_mta(*args: str, cwd: Path = REPO_ROOT, check: bool = True,
            stdin: bytes | None = None, wrapper: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([*wrapper, sys.executable, "-m", "mta", *args], cwd=cwd, env=_env(), input=stdin,
                          capture_output=True, timeout=CLI_TIMEOUT_SECONDS)
    if check and done.returncode != 0:
        raise AssertionError(f"mta {' '.join(args)} exited {done.returncode}: "
                             f"{done.stderr.decode('utf-8', 'replace')}")
    return done


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "queue")])
    return env


def _greets(port: int, deadline: float, host: str = "127.0.0.1") -> bool:
    """True once a connection gets a 220 greeting (the master binds before its workers serve)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            greeting = b""
            while not greeting.endswith(b"\n"):
                chunk = sock.recv(512)
                if not chunk:
                    return False
                greeting += chunk
            sock.sendall(b"QUIT\r\n")
            return greeting.startswith(b"220 ")
    except OSError:
        return False


def greets_within(port: int, seconds: float = 5.0) -> bool:
    return _greets(port, time.monotonic() + seconds)


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies do not count)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # it exited while we looked
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


@pytest.fixture
def mta_server(tmp_path: Path) -> Iterator[Callable[..., MtaServer]]:
    """A factory: mta_server(start=True, wrapper=(), **sections) -> MtaServer on its own port and spool."""
    made: list[MtaServer] = []

    def make(start: bool = True, wrapper: Sequence[str] = (), **sections: dict[str, Any]) -> MtaServer:
        n = len(made) + 1
        port = free_port()
        spool = tmp_path / f"spool{n}"
        config_path = tmp_path / f"mta{n}.toml"
        config_path.write_text(toml_dumps(server_config(port, spool, **sections)))
        server = MtaServer(config_path, port, spool, tmp_path / f"mta{n}.log", wrapper=wrapper)
        made.append(server)
        return server.start() if start else server

    with contextlib.ExitStack() as stack:  # every server is stopped, even if stopping one fails
        yield make
        for server in made:
            stack.callback(server.stop)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, server: MtaServer | None = None) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{server.log_tail()}" if server else ""))


# --- reading the spool directly ------------------------------------------------------------

@dataclass
class SpoolSnapshot:
    """Every record of the LMDB spool in one read transaction (to check invariants in bulk:
    one CLI call per message would take minutes for thousands)."""

    envelopes: dict[str, Envelope] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    due_ids: list[str] = field(default_factory=list)
    indexes: spoolindex.Indexes = field(default_factory=spoolindex.Indexes)  # due, counts, bydest as stored
    used_bytes: int = 0  # meta b"bytes"
    envelope_bytes: int = 0  # sum of encoded envelope sizes

    def problems(self) -> list[str]:
        """Broken spool invariants: a record without its partner, a wrong size or byte count."""
        found = []
        for msgid in self.envelopes.keys() - self.bodies.keys():
            found.append(f"{msgid}: envelope without a body")
        for msgid in self.bodies.keys() - self.envelopes.keys():
            found.append(f"{msgid}: body without an envelope")
        want = spoolindex.expected(self.envelopes.values())
        for name in ("due", "counts", "bydest"):
            if getattr(self.indexes, name) != getattr(want, name):
                found.append(f"the {name} table differs from what the envelopes say: {getattr(self.indexes, name)} "
                             f"!= {getattr(want, name)}")
        for msgid, envelope in self.envelopes.items():
            body = self.bodies.get(msgid)
            if body is not None and envelope.size != len(body):
                found.append(f"{msgid}: envelope size {envelope.size} != body length {len(body)}")
        stored = self.envelope_bytes + sum(len(b) for b in self.bodies.values())
        if stored != self.used_bytes:
            found.append(f"meta bytes {self.used_bytes} != {stored} bytes stored")
        return found


def spool_snapshot(path: Path) -> SpoolSnapshot:
    snap = SpoolSnapshot()
    env = lmdb.open(str(path), readonly=True, max_dbs=8, subdir=True, lock=True)
    try:
        with env.begin(buffers=False) as txn:
            for raw_key, raw in txn.cursor(db=env.open_db(b"envelope", txn=txn)):
                snap.envelopes[raw_key.decode()] = records.decode(raw)
                snap.envelope_bytes += len(raw)
            for raw_key, body in txn.cursor(db=env.open_db(b"body", txn=txn)):
                snap.bodies[raw_key.decode()] = body
            for raw_key in txn.cursor(db=env.open_db(b"due", txn=txn)).iternext(values=False):
                snap.due_ids.append(raw_key[8:].decode())
            snap.indexes = spoolindex.stored(env, txn)
            meta = txn.get(b"bytes", db=env.open_db(b"meta", txn=txn))
            snap.used_bytes = int.from_bytes(meta, "big") if meta is not None else 0
    finally:
        env.close()
    return snap


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """(our leading Received header, the message as the client sent it)."""
    assert stored.startswith(b"Received: "), stored[:80]
    end = 0
    while True:
        nl = stored.index(b"\r\n", end) + 2
        end = nl
        if stored[end:end + 1] not in (b" ", b"\t"):
            return stored[:end], stored[end:]


# --- a raw SMTP client --------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the lines after the code, joined by "\n"

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpClient:
    """A raw asyncio SMTP client: what it sends is exactly what you pass, one reply per read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: Reply | None = None

    @classmethod
    async def connect(cls, port: int, helo: str | None = "client.test", *, source: str | None = None,
                      tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> SmtpClient:
        """`source`: the client's own loopback address (e.g. 127.0.0.9, outside mynetworks);
        `tls`: implicit TLS (smtps), verified against that context, server name mx.test;
        `host`: the server's address (default loopback)."""
        reader, writer = await asyncio.open_connection(
            host, port, limit=1024 * 1024, local_addr=(source, 0) if source else None,
            ssl=tls, server_hostname="mx.test" if tls else None)
        client = cls(reader, writer)
        client.greeting = await client.read_reply()
        if helo is not None:
            reply = await client.command(f"EHLO {helo}")
            assert reply.code == 250, reply
        return client

    async def read_reply(self) -> Reply:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError(f"connection closed mid-reply (got {line!r})")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return Reply(int(text[:3]), "\n".join(lines))

    async def starttls(self, context: ssl.SSLContext) -> Reply:
        """STARTTLS, the handshake (verifying mx.test against `context`), then EHLO again."""
        reply = await self.command("STARTTLS")
        assert reply.code == 220, reply
        await self.writer.start_tls(context, server_hostname="mx.test")
        return await self.command("EHLO client.test")

    async def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.command(f"AUTH PLAIN {token}")

    async def command(self, line: str) -> Reply:
        self.writer.write(line.encode() + b"\r\n")
        return await self.read_reply()

    async def send_mail(self, sender: str, recipients: Sequence[str], data: bytes) -> Reply:
        """MAIL, RCPT..., DATA pipelined, then the dot-stuffed data: the reply that ended it."""
        assert data.endswith(b"\r\n")
        head = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
        self.writer.write("".join(f"{line}\r\n" for line in head).encode())
        replies = []
        for _ in head:
            replies.append(await self.read_reply())
            if replies[-1].code == 421:  # the server is closing the connection
                return replies[-1]
        failed = [r for r in replies[:-1] if r.code >= 400]
        if replies[-1].code != 354:
            return failed[0] if failed else replies[-1]
        stuffed = (b"." + data if data.startswith(b".") else data).replace(b"\r\n.", b"\r\n..")
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return await self.read_reply()

    async def close(self) -> None:
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                await self.read_reply()
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{21})$")


def queued_id(reply: Reply) -> str | None:
    """The queue id of a `250 2.0.0 Ok: queued as ID` reply, else None."""
    found = QUEUED.match(reply.text) if reply.code == 250 else None
    return found.group(1) if found else None
