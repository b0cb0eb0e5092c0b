"""The libmilter test peer (tests/mta/milter/libmilter_peer.py) as running processes.

    with libmilter_peers(tmp_dir) as (tcp_address, unix_address): ...

Each peer runs under the system Python (Debian's python3-milter is libmilter itself);
what it does is chosen by the envelope sender's local part (see the peer's header).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.integration.conftest import free_port

PEER = Path(__file__).resolve().parents[1] / "mta" / "milter" / "libmilter_peer.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def wait_listening(proc: subprocess.Popen[bytes], connect: Callable[[], socket.socket], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise RuntimeError(f"{what} exited: {proc.stderr.read().decode()}")
        try:
            connect().close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen within 15s")


@contextlib.contextmanager
def libmilter_peers(tmp_dir: Path) -> Iterator[tuple[str, str]]:
    """One peer on TCP, one on a unix socket: their addresses ("inet:127.0.0.1:PORT", "unix:PATH")."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True, check=False)
    assert probe.returncode == 0, "python3-milter is missing: run `make test-deps`"
    port = free_port()
    path = tmp_dir / "peer.sock"
    procs = [
        subprocess.Popen([SYSTEM_PYTHON, str(PEER), f"inet:{port}@127.0.0.1"], stderr=subprocess.PIPE),
        subprocess.Popen([SYSTEM_PYTHON, str(PEER), f"unix:{path}"], stderr=subprocess.PIPE),
    ]
    try:
        wait_listening(procs[0], lambda: socket.create_connection(("127.0.0.1", port)), "TCP peer")

        def unix() -> socket.socket:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
            except OSError:
                s.close()  # not listening yet: no socket left for the GC to warn about
                raise
            return s

        wait_listening(procs[1], unix, "unix peer")
        yield f"inet:127.0.0.1:{port}", f"unix:{path}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
