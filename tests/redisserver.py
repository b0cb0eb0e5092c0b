"""A private redis-server for tests: its own loopback port, directory and no persistence.

Never the system's Redis. stop() and start() again keep the port (a node's [cluster]
redis URL stays valid across a restart); nothing is saved, so a restart starts empty.
`host` and `wrapper` (e.g. `ip netns exec NS`) run it on another address, in a namespace.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REDIS_SERVER = "/usr/bin/redis-server"
START_SECONDS = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int | None = None,
                 wrapper: Sequence[str] = ()) -> None:
        self.directory = directory
        self.host = host
        self.port = port if port is not None else _free_port()
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.host}:{self.port} did not start: see {self.directory / 'redis.log'}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        """redis-cli's answer to one command on this server (to look at keys from a test)."""
        done = subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *args], capture_output=True, timeout=5)
        return done.stdout.decode().strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(START_SECONDS)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail(f"{REDIS_SERVER} is missing: apt-get install redis-server (make test-deps)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
