"""The control listener over TLS ([control] tls_cert_file / tls_key_file), and the rule that
/ui/ and /api/ answer a client off loopback only over TLS.

Real `mta serve` with the test PKI's certificate; a real TLS client that verifies it
against the test CA. "Off loopback" is a real client in a network namespace of its own
(a veth pair, addresses in 10.78.S.0/30 that the root namespace does not route yet).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, wait_until
from tests.integration.test_webui_login import queue_one
from tests.integration.tlscerts import make_pki
from tests.integration.webclient import call, login, wait_for_control

pytestmark = pytest.mark.integration

TOKEN = "configured-token-0123456789"


def test_over_tls_the_cookie_is_secure_plain_http_gets_nothing_and_mta_queue_pins_the_certificate(
        mta_server, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = mta_server(control={"token": TOKEN, "tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key)})
    tls = pki.client_context()
    wait_for_control(server, tls=tls)
    msgid = queue_one(server)
    answer = call(server, "POST", "/ui/login", {"token": TOKEN}, tls=tls)
    assert answer.status == 200 and "; Secure" in answer.cookies[0] and "HttpOnly" in answer.cookies[0]
    headers, _ = login(server, {"token": TOKEN}, tls=tls)
    port = int(server.config_path.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])  # type: ignore[union-attr]
    hold = {"ids": [msgid]}
    assert call(server, "POST", "/api/queue/hold", hold, {**headers, "Origin": f"http://127.0.0.1:{port}"},
                tls=tls).status == 403  # the page's origin is https:// now
    done = call(server, "POST", "/api/queue/hold", hold, {**headers, "Origin": f"https://127.0.0.1:{port}"}, tls=tls)
    assert done.status == 200 and done.headers["content-security-policy"].startswith("default-src 'none'")
    with pytest.raises((ConnectionError, OSError)):  # plain HTTP to a TLS listener: no answer
        call(server, "GET", "/api/queue?limit=1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert call(server, "GET", "/metrics", tls=tls).status == 200

    # mta queue talks HTTPS to it, and checks it is our certificate.
    assert [r["state"] for r in server.queue_list()[0]["recipients"]] == ["held"]
    assert server.mta("queue", "release", msgid).returncode == 0
    assert [r["state"] for r in server.queue_list()[0]["recipients"]] == ["ready"]
    assert b"event=api method=POST path=/api/queue/release status=200" in server.log_bytes()

    # SIGHUP: new connections get the new certificate, the old one is refused by a client of the old CA.
    other = make_pki(tmp_path / "pki2")
    shutil.copy(other.cert, pki.cert)
    shutil.copy(other.key, pki.key)
    os.kill(server.master_pid, signal.SIGHUP)

    def renewed() -> bool:
        try:
            return call(server, "GET", "/healthz", tls=other.client_context()).status == 200
        except (ssl.SSLError, OSError):
            return False
    wait_until(renewed, 15, "the control listener to present the new certificate", server)
    with pytest.raises(ssl.SSLError):
        call(server, "GET", "/healthz", tls=tls)
    assert server.mta("queue", "hold", msgid).returncode == 0  # pinned to the file, which is the new one
    impostor = tmp_path / "impostor.pem"
    impostor.write_bytes(pki.ca.read_bytes())
    text = server.config_path.read_text()  # type: ignore[union-attr]
    server.config_path.write_text(text.replace(str(pki.cert), str(impostor)))  # type: ignore[union-attr]
    refused = server.mta("queue", "list", check=False)  # the CLI reads the file; the server still has the old
    assert refused.returncode != 0 and b"presented another certificate than [control] tls_cert_file" in refused.stderr


def test_a_broken_control_certificate_stops_the_start_with_a_reason(mta_server, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = mta_server(start=False, control={"token": TOKEN, "tls_cert_file": str(pki.cert),
                                              "tls_key_file": str(tmp_path / "missing.key")})
    result = server.mta("config", "check", check=False)
    assert result.returncode != 0 and b"[control] tls_key_file" in result.stderr and b"no such file" in result.stderr
    half = mta_server(start=False, control={"token": TOKEN, "tls_cert_file": str(pki.cert)})
    result = half.mta("config", "check", check=False)
    assert result.returncode != 0 and b"set tls_cert_file and tls_key_file together" in result.stderr


class Namespace:
    """A network namespace joined to the root one by a veth pair: root side .1, inside .2."""

    def __init__(self) -> None:
        used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
        subnet = next(s for s in range(1, 250) if f"10.78.{s}." not in used)
        self.tag = f"q19w{os.getpid() % 100000}"
        self.root_address, self.inside_address = f"10.78.{subnet}.1", f"10.78.{subnet}.2"

    @contextlib.contextmanager
    def up(self) -> Iterator[Namespace]:
        try:
            ip("netns", "add", self.tag)
            ip("link", "add", f"{self.tag}r", "type", "veth", "peer", "name", "eth0", "netns", self.tag)
            ip("addr", "add", f"{self.root_address}/30", "dev", f"{self.tag}r")
            ip("link", "set", f"{self.tag}r", "up")
            ip("-n", self.tag, "addr", "add", f"{self.inside_address}/30", "dev", "eth0")
            ip("-n", self.tag, "link", "set", "eth0", "up")
            ip("-n", self.tag, "link", "set", "lo", "up")
            yield self
        finally:
            subprocess.run(["ip", "link", "del", f"{self.tag}r"], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.tag], capture_output=True)

    def fetch(self, url: str, ca: Path | None = None, token: str = TOKEN) -> tuple[int, str]:
        """GET `url` from inside the namespace: (status, body); status 0 and the error when none came."""
        program = textwrap.dedent(f"""
            import ssl, sys, urllib.request, urllib.error
            context = ssl.create_default_context(cafile={str(ca)!r}) if {ca is not None} else None
            if context: context.check_hostname = False
            request = urllib.request.Request({url!r}, headers={{"Authorization": "Bearer {token}"}})
            try:
                with urllib.request.urlopen(request, timeout=10, context=context) as r:
                    print(r.status); print(r.read().decode())
            except urllib.error.HTTPError as e:
                print(e.code); print(e.read().decode())
            except OSError as e:
                print(0); print(e)
            """)
        out = subprocess.run(["ip", "netns", "exec", self.tag, sys.executable, "-c", program],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        status, _, body = out.partition("\n")
        return int(status), body


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip")
def test_off_loopback_the_ui_and_the_api_answer_only_over_tls(mta_server, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with Namespace().up() as ns:
        port = free_port()
        listen = f"{ns.root_address}:{port}"
        plain = mta_server(control={"token": TOKEN, "listen": listen})
        wait_for_control(plain, host=ns.root_address)
        status, body = ns.fetch(f"http://{listen}/api/queue?limit=1")
        assert status == 403 and "off loopback only over TLS: set [control] tls_cert_file and tls_key_file" in body
        assert ns.fetch(f"http://{listen}/ui/")[0] == 403
        assert ns.fetch(f"http://{listen}/metrics")[0] == 200  # not the UI or the API: as before
        log = plain.log_bytes()
        assert f"client={ns.inside_address} refused=transport".encode() in log
        # From this host, at the listener's own address: not off loopback.
        assert call(plain, "GET", "/api/queue?limit=1", headers={"Authorization": f"Bearer {TOKEN}"},
                    host=ns.root_address).status == 200
        plain.stop()

        secure = mta_server(control={"token": TOKEN, "listen": listen, "tls_cert_file": str(pki.cert),
                                     "tls_key_file": str(pki.key)})
        wait_for_control(secure, host=ns.root_address, tls=_no_name_check(pki.client_context()))
        status, body = ns.fetch(f"https://{listen}/api/queue?limit=1", ca=pki.ca)
        assert status == 200 and '"messages": []' in body
        status, body = ns.fetch(f"https://{listen}/api/queue?limit=1", ca=pki.ca, token="wrong")
        assert status == 401
        secure.stop()


def _no_name_check(context: ssl.SSLContext) -> ssl.SSLContext:
    context.check_hostname = False  # the test certificate names 127.0.0.1, not the veth address
    return context
