"""A private clamd (Debian clamav-daemon) for tests, with a signature database made here.

    with running_clamd(tmp_dir, stream_max_length_bytes=1 << 20) as clamd:
        clamd.tcp, clamd.unix   # "tcp:127.0.0.1:port", "unix:<tmp_dir>/clamd.sock"

Its own clamd.conf, DatabaseDirectory, log and temporary directory under `root`, in the
foreground, listening on a free loopback port and a unix socket, ScanMail on. Nothing is
downloaded: the database is two body signatures, EICAR's test string and
`Mta.Test.Custom` on CUSTOM_MARKER. clamd runs as whoever runs the tests (no `User`
option), root included, and reads the database the tests wrote.

Invariant: when the context ends, the clamd process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.integration.conftest import free_port

PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
START_SECONDS = 60.0  # a 2-signature database loads in ~1 s; an idle machine is not a given
STOP_SECONDS = 10.0

# The EICAR anti-virus test file (eicar.org), the 68 bytes every scanner detects on purpose.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Eicar-Signature"
CUSTOM_MARKER = b"mta-test-custom-marker-5b0d6f"
CUSTOM_SIGNATURE = "Mta.Test.Custom"

CLAMD_CONF = """\
DatabaseDirectory {root}/db
TemporaryDirectory {root}/tmp
LocalSocket {root}/clamd.sock
TCPSocket {port}
TCPAddr 127.0.0.1
Foreground yes
ScanMail yes
StreamMaxLength {stream_max_length_bytes}
LogFile {root}/clamd.log
LogTime yes
SelfCheck 0
"""


def clamd_binary() -> str:
    """The clamd program; a failure telling the operator how to install it."""
    found = shutil.which("clamd", path=PATH)
    assert found is not None, f"clamd not found in {PATH}: run `make test-deps` (Debian clamav-daemon)"
    return found


@dataclass
class Clamd:
    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def tcp(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        return f"unix:{self.root}/clamd.sock"

    @property
    def log(self) -> str:
        path = self.root / "clamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_database(directory: Path) -> None:
    """The signatures as a .ndb file: name, any target type, anywhere, the bytes in hex."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mta-test.ndb").write_text(
        f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n{CUSTOM_SIGNATURE}:0:*:{CUSTOM_MARKER.hex()}\n")


@contextlib.contextmanager
def running_clamd(root: Path, stream_max_length_bytes: int = 25 << 20) -> Iterator[Clamd]:
    binary = clamd_binary()
    write_database(root / "db")
    (root / "tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = root / "clamd.conf"
    conf.write_text(CLAMD_CONF.format(root=root, port=port, stream_max_length_bytes=stream_max_length_bytes))
    process = subprocess.Popen([binary, "--config-file", str(conf)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clamd = Clamd(root, port, process)
    try:
        _wait_ready(clamd)
        yield clamd
    finally:
        clamd.stop()


def _wait_ready(clamd: Clamd) -> None:
    """Until clamd answers PING on both sockets (it binds them once the database is loaded)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if clamd.process.poll() is not None:
            raise RuntimeError(f"clamd exited with {clamd.process.returncode}; its log:\n{clamd.log}")
        if _pong(socket.AF_INET, ("127.0.0.1", clamd.port)) and _pong(socket.AF_UNIX, str(clamd.root / "clamd.sock")):
            return
        time.sleep(0.1)
    raise RuntimeError(f"clamd did not answer PING within {START_SECONDS}s; its log:\n{clamd.log}")


def _pong(family: int, address: object) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(address)
            sock.sendall(b"zPING\0")
            return sock.recv(64) == b"PONG\0"
        except OSError:
            return False
