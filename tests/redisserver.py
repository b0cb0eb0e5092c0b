"""A private redis-server for tests: its own loopback port, directory and no persistence.

Never the system's Redis. stop() and start() again keep the port (a node's [cluster]
redis URL stays valid across a restart); nothing is saved, so a restart starts empty.
With `pki` (tests/integration/tlscerts.py) it listens with TLS only, requiring a client
certificate signed by the test CA (tls-auth-clients yes, Redis's default); its url is rediss://.
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

from tests.integration.conftest import free_port
from tests.integration.tlscerts import Pki

REDIS_SERVER = "/usr/bin/redis-server"
START_SECONDS = 10.0


class RedisServer:
    def __init__(self, directory: Path, pki: Pki | None = None, extra: tuple[str, ...] = (),
                 host: str = "127.0.0.1", port: int | None = None, wrapper: Sequence[str] = ()) -> None:
        self.directory = directory
        self.host = host
        self.port = port if port is not None else free_port()
        self.pki = pki
        self.extra = extra  # more redis-server arguments, e.g. ("--replicaof", "127.0.0.1", "6379")
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.pki else 'redis'}://{self.host}:{self.port}/0"

    def _tls_args(self, server: bool) -> list[str]:
        if self.pki is None:
            return []
        pki = self.pki
        if server:
            return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(pki.cert),
                    "--tls-key-file", str(pki.key), "--tls-ca-cert-file", str(pki.ca)]
        return ["--tls", "--cacert", str(pki.ca), "--cert", str(pki.cert), "--key", str(pki.key)]

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory), *self._tls_args(server=True), *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
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
        if self.pki is not None:
            return self.cli("PING") == "PONG"
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        """redis-cli's answer to one command on this server (to look at keys from a test)."""
        done = subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *self._tls_args(server=False), *args],
                              capture_output=True, timeout=5)
        return done.stdout.decode().strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(START_SECONDS)
        self.proc = None


class RedisSentinel(RedisServer):
    """A Sentinel (the same redis-server binary, --sentinel) watching `master` as MASTER_NAME,
    quorum 1, a master down after DOWN_AFTER_MS. Sentinel rewrites its config file: one per instance."""

    MASTER_NAME = "mta"
    DOWN_AFTER_MS = 1000

    def __init__(self, directory: Path, master: RedisServer) -> None:
        super().__init__(directory)
        self.master = master

    def start(self) -> RedisSentinel:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                        f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds {self.MASTER_NAME} {self.DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {self.MASTER_NAME} 10000\n")
        self.extra = ()
        log = (self.directory / "sentinel.log").open("ab")
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis sentinel on port {self.port} did not start: see {self.directory / 'sentinel.log'}")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.MASTER_NAME}/0"

    def master_port(self) -> int:
        """The port of the master this sentinel names now."""
        return int(self.cli("SENTINEL", "get-master-addr-by-name", self.MASTER_NAME).split()[-1])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail(f"{REDIS_SERVER} is missing: apt-get install redis-server (make test-deps)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
