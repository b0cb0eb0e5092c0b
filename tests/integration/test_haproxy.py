"""mta behind a real HAProxy (send-proxy and send-proxy-v2): the real client address wins."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, free_port, queued_id, server_config, toml_dumps

pytestmark = pytest.mark.integration

HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp_v1
    bind 127.0.0.1:{v1}
    default_backend relay_v1

backend relay_v1
    server mta1 127.0.0.1:{mta} send-proxy

frontend smtp_v2
    bind 127.0.0.1:{v2}
    default_backend relay_v2

backend relay_v2
    server mta1 127.0.0.1:{mta} send-proxy-v2
"""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"haproxy did not listen on {port}: {log.read_text()}")


@pytest.fixture
def relay_behind_haproxy(mta_server, tmp_path: Path) -> Iterator[tuple[MtaServer, dict[str, int], int]]:
    if shutil.which("haproxy") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed: `make test` installs it")
        pytest.skip("haproxy is not installed (make test installs it)")
    server: MtaServer = mta_server(start=False)
    proxied = free_port()
    assert server.config_path is not None
    server.config_path.write_text(toml_dumps(server_config(
        server.port, server.spool,
        listener=[{"address": f"127.0.0.1:{server.port}"},
                  {"address": f"127.0.0.1:{proxied}", "proxy_protocol": True,
                   "trusted_proxies": ["127.0.0.1/32"]}],
        # The proxy's own address is in mynetworks on purpose: it must grant nothing.
        relay={"relay_domains": ["local.test"], "mynetworks": ["127.0.0.1/32", "127.0.0.5/32"]},
        server={"inbound_workers": 2},
    )))
    server.start()
    ports = {"v1": free_port(), "v2": free_port()}
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(mta=proxied, **ports))
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    try:
        for port in ports.values():
            _wait_listening(port, proc, log)
        yield server, ports, proxied
    finally:
        proc.terminate()
        proc.wait(10)


async def _client_from(source: str, port: int) -> SmtpClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    client = SmtpClient(reader, writer)
    client.greeting = await client.read_reply()
    assert (await client.command("EHLO c.test")).code == 250
    return client


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_client_address_through_haproxy(relay_behind_haproxy, version: str) -> None:
    server, ports, _proxied = relay_behind_haproxy

    async def scenario() -> dict[str, object]:
        trusted = await _client_from("127.0.0.5", ports[version])
        relayed = await trusted.send_mail("a@example.org", ["someone@foreign.test"], b"Subject: t\r\n\r\nx\r\n")
        await trusted.close()
        stranger = await _client_from("127.0.0.6", ports[version])
        refused = await stranger.command("MAIL FROM:<a@example.org>")
        refused = await stranger.command("RCPT TO:<someone@foreign.test>")
        await stranger.command("RSET")
        local = await stranger.send_mail("a@example.org", ["u@local.test"], b"Subject: t\r\n\r\ny\r\n")
        await stranger.close()
        return {"relayed": relayed, "refused": refused, "local": local}

    got = asyncio.run(scenario())
    relayed_id, local_id = queued_id(got["relayed"]), queued_id(got["local"])  # type: ignore[arg-type]
    assert relayed_id is not None, got["relayed"]
    assert str(got["refused"]) == "554 5.7.1 Relay access denied"
    assert local_id is not None, got["local"]
    assert b"from c.test ([127.0.0.5])" in server.queue_body(relayed_id)
    assert b"from c.test ([127.0.0.6])" in server.queue_body(local_id)
    assert b"event=connect client=127.0.0.6" in server.log_bytes()


def test_no_header_and_untrusted_peers_are_closed_without_greeting(relay_behind_haproxy) -> None:
    server, _ports, proxied = relay_behind_haproxy

    def read_all(source: str, send: bytes) -> tuple[bytes, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxied), timeout=15, source_address=(source, 0)) as sock:
            if send:
                sock.sendall(send)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:  # closed on unread input: a reset is a close too
                pass
        return data, time.monotonic() - started

    forged = b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\nEHLO x\r\n"
    data, elapsed = read_all("127.0.0.9", forged)  # not a trusted proxy
    assert data == b"" and elapsed < 2
    data, elapsed = read_all("127.0.0.1", b"EHLO no-header\r\n")  # trusted, but no header
    assert data == b"" and elapsed < 2
    data, elapsed = read_all("127.0.0.1", b"")  # trusted, silent: closed after 5 s
    assert data == b"" and 4 < elapsed < 10
    data, _ = read_all("127.0.0.1", b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\nQUIT\r\n")  # a real header
    assert data.startswith(b"220 mx.test") and b"221 2.0.0" in data
    log = server.log_bytes()
    assert b"event=proxy_refused client=127.0.0.9" in log and b"no PROXY header in time" in log


def test_header_split_over_packets_and_local_health_checks(relay_behind_haproxy) -> None:
    _server, _ports, proxied = relay_behind_haproxy
    header = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 5, 127, 0, 0, 1]) + b"\x9c\x40\x00\x19"
    with socket.create_connection(("127.0.0.1", proxied), timeout=10) as sock:
        for i in range(0, len(header), 5):
            sock.sendall(header[i:i + 5])
            time.sleep(0.05)
        assert sock.recv(100).startswith(b"220 ")
    local = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"  # v2 LOCAL, as HAProxy health checks send
    with socket.create_connection(("127.0.0.1", proxied), timeout=10) as sock:
        sock.sendall(local + b"EHLO check\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@foreign.test>\r\n")
        data = b""
        while data.count(b"\r\n") < 11:
            data += sock.recv(4096)
    assert data.startswith(b"220 ")
    assert b"554 5.7.1 Relay access denied" in data  # the proxy itself is never a relay client
