"""Two independent DKIM verifiers for the tests: dkimpy, fetching the key from the test's
DNS server on loopback (dnspython), and OpenDKIM's own verifier (`opendkim -t`, its test
mode: the message through the filter's code, keys from a TestDNSData file)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype

from mta.dkim.keys import DkimKey
from tests.integration.dns_server import DnsServer


def publish(server: DnsServer, key: DkimKey) -> None:
    server.set(key.record_name, "TXT", key.txt_strings())


def dnspython_txt(server: DnsServer):
    """dkimpy's dnsfunc: the TXT record of `name`, asked of `server` over UDP (then TCP if truncated)."""
    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        name = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer, _ = dns.query.udp_with_fallback(query, "127.0.0.1", timeout=timeout, port=server.port)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None
    return dnsfunc


def dkimpy_verifies(message: bytes, server: DnsServer) -> bool:
    return bool(dkim.verify(message, dnsfunc=dnspython_txt(server)))


def opendkim_results(message: bytes, keys: list[DkimKey], workdir: Path) -> list[str]:
    """OpenDKIM's verdict on each signature: "pass", "fail", ... from the
    Authentication-Results header its test mode prints."""
    opendkim = shutil.which("opendkim") or shutil.which("opendkim", path="/usr/sbin:/sbin")
    assert opendkim, "opendkim is missing: run `make test-deps` (Debian package opendkim)"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dnsdata").write_text("".join(f"{k.record_name} {k.txt_value()}\n" for k in keys))
    (workdir / "opendkim.conf").write_text(f"Mode v\nSyslog no\nTestDNSData file:{workdir / 'dnsdata'}\n")
    (workdir / "message.eml").write_bytes(message)
    done = subprocess.run([opendkim, "-vvv", "-x", str(workdir / "opendkim.conf"), "-t", str(workdir / "message.eml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    results = re.findall(r"\bdkim=(\w+)", out)
    assert results, out
    return results
