"""bench/run --content's fixtures: the message, the DKIM keys and the peers (clamd, a milter).

    message = content_message(10240)        # multipart, From: in SIGNING_DOMAIN
    with content_peers(scratch) as peers:   # a private clamd and the libmilter test peer
        peers.clamd, peers.milter           # addresses for [antivirus] and [[milter]]
        peers.cpu_seconds()                 # {"clamd": s, "milter": s}: each peer's own CPU

The peers are the tests' own (bench may import from tests/, as contentfuncs.py does;
imported when the peers start, so bench/run's other modes need no test dependencies):
tests/mta/content/clamdpeer.py's clamd with its two-signature database (nothing is
downloaded), and tests/mta/milter/libmilter_peer.py on libmilter itself (Debian's
python3-milter, run by /usr/bin/python3), whose behaviour the envelope sender's local
part chooses. One of each serves every configuration of an invocation.

A peer that is missing or does not start raises RuntimeError saying what to do.

Invariant: when content_peers ends, both peer processes are gone.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from procs import HOST, REPO_ROOT, free_port, log
from procstat import process_cpu_seconds, threads_runtime_seconds

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # the repo's mta and tests packages

SIGNING_DOMAIN: Final = "bench.test"
FROM_HEADER: Final = f"Bench Sender <news@{SIGNING_DOMAIN}>"
MILTER_CHANGES: Final = f"headers@{SIGNING_DOMAIN}"  # the peer adds, changes and inserts headers
MILTER_SLEEPS: Final = f"sleep@{SIGNING_DOMAIN}"  # the peer sleeps MILTER_SLEEP_SECONDS, adds a header
MILTER_SLEEP_SECONDS: Final = 0.2  # libmilter_peer.py's "sleep"
DKIM_ALGORITHMS: Final = ("rsa", "ed25519")


def content_message(size: int, rcpt: str) -> bytes:
    """About `size` bytes: multipart/mixed holding multipart/alternative (quoted-printable
    text, HTML) and a base64 PDF, padded by the PDF; no Message-ID (loadgen adds one)."""
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. =C3=A9\r\n" * 12
    html = "<html><body>" + "<p>Lorem ipsum dolor sit amet, consectetur.</p>\r\n" * 12 + "</body></html>"
    head = (f"From: {FROM_HEADER}\r\nTo: <{rcpt}>\r\nSubject: bench content\r\n"
            "Date: Mon, 7 Dec 2026 05:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="m"\r\n\r\n').encode()
    alternative = ('--m\r\nContent-Type: multipart/alternative; boundary="a"\r\n\r\n'
                   "--a\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   f"{text}--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--a--\r\n").encode()
    attached = (b'--m\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
                b'Content-Disposition: attachment; filename="report.pdf"\r\n'
                b"Content-Transfer-Encoding: base64\r\n\r\n")
    room = max(0, size - len(head) - len(alternative) - len(attached) - len(b"--m--\r\n"))
    raw = room * 57 // 78  # base64 lines: 57 bytes become 76 characters and a CRLF
    pdf = (b"%PDF-1.4\n" + bytes(i % 251 for i in range(raw)))[:max(raw, 9)]
    body = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    return head + alternative + attached + body + b"--m--\r\n"


def write_dkim_keys(directory: Path) -> dict[str, Path]:
    """One key per algorithm, made by mta's own code (as `mta dkim keygen` makes them)."""
    from mta.dkim.keys import DkimKey

    keys = {}
    for algorithm in DKIM_ALGORITHMS:
        path = directory / f"dkim-{algorithm}.pem"
        path.write_bytes(DkimKey.generate(algorithm))
        path.chmod(0o600)
        keys[algorithm] = path
    return keys


def own_cpu_seconds(pid: int) -> float:
    """A peer's CPU: the larger of its ticks (exited threads included) and its live threads' run time."""
    return max(process_cpu_seconds(pid) or 0.0, threads_runtime_seconds(pid))


@dataclass
class Peers:
    clamd: str  # [antivirus] clamd
    milter: str  # [[milter]] address
    pids: dict[str, int]

    def cpu_seconds(self) -> dict[str, float]:
        return {name: own_cpu_seconds(pid) for name, pid in self.pids.items()}


@contextlib.contextmanager
def libmilter_peer(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The libmilter test peer on a loopback port: ("inet:127.0.0.1:PORT", its process)."""
    from tests.integration.libmilter import PEER, SYSTEM_PYTHON, wait_listening

    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True, check=False)
    if probe.returncode != 0:
        raise RuntimeError("python3-milter is missing: run `make test-deps` (Debian python3-milter)")
    port = free_port()
    with open(workdir / "milter.stderr", "wb") as err:
        proc = subprocess.Popen([SYSTEM_PYTHON, str(PEER), f"inet:{port}@{HOST}"], stdin=subprocess.DEVNULL,
                                stderr=err)
    try:
        wait_listening(proc, lambda: socket.create_connection((HOST, port)), "the libmilter peer")
        yield f"inet:{HOST}:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def content_peers(scratch: Path) -> Iterator[Peers]:
    try:
        # Here, not at the top: the tests' helpers need the test dependencies (lmdb, pytest).
        from tests.integration import libmilter  # noqa: F401  (libmilter_peer's, checked here)
        from tests.mta.content.clamdpeer import clamd_binary, running_clamd
    except ImportError as exc:
        raise RuntimeError(f"the tests' peer helpers do not import ({exc}): install mta's dependencies and "
                           f"its test extra (make install; pip install -e '.[test]')") from exc
    try:
        clamd_binary()
    except AssertionError as exc:  # the tests' way of saying what to install
        raise RuntimeError(str(exc)) from exc
    root = scratch / "peers"
    (root / "clamd").mkdir(parents=True)
    log("content: starting a private clamd (two-signature database) and the libmilter peer")
    with running_clamd(root / "clamd") as clamd, libmilter_peer(root) as (milter, proc):
        yield Peers(clamd=clamd.unix, milter=milter, pids={"clamd": clamd.process.pid, "milter": proc.pid})
