"""`mta dkim keygen`, run as the operator runs it: the key file (0600, never over an
existing one), and the TXT record it prints, which parses as a zone file line and, once
published in the test's DNS server, verifies a message signed with the key."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest

from mta.dkim.keys import DkimKey
from mta.dkim.signer import sign
from tests.integration.dns_server import DnsServer
from tests.mta.dkim.verifiers import dkimpy_verifies, opendkim_results

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
MESSAGE = b"From: Joe <joe@example.test>\r\nSubject: hello\r\n\r\nbody\r\n"


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "queue")])}
    return subprocess.run([sys.executable, "-m", "mta", "dkim", "keygen", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def published(record: str) -> tuple[str, str]:
    """(owner, TXT data) of the line keygen printed, read by dnspython's zone-file parser
    (in a zone whose $TTL applies, as in the operator's)."""
    zone = dns.zone.from_text("$TTL 3600\n" + record, origin="test.", relativize=False, check_origin=False)
    [(name, node)] = list(zone.nodes.items())
    rdataset = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
    [rdata] = list(rdataset)
    assert all(len(s) <= 255 for s in rdata.strings)
    return name.to_text(omit_final_dot=True), rdata.to_text()


@pytest.mark.parametrize(("algorithm", "extra"), [("rsa", []), ("rsa", ["--bits", "3072"]), ("ed25519", [])])
def test_keygen_key_and_record_verify(algorithm: str, extra: list[str], tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "s1.pem"
    key_file.parent.mkdir()
    os.chmod(key_file.parent, 0o755)
    done = keygen("--domain", "Example.test", "--selector", "s1", "--key-file", str(key_file),
                  "--algorithm", algorithm, *extra)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "keys" / "s1.pem.tmp").exists()
    assert f"wrote {key_file}" in done.stderr and "[[dkim]]" in done.stderr
    owner, data = published(done.stdout)
    assert owner == "s1._domainkey.example.test"
    key = DkimKey.load("example.test", "s1", str(key_file))
    if extra:
        assert key.private.key_size == 3072  # type: ignore[union-attr]
    signed = sign(MESSAGE, key) + MESSAGE
    with DnsServer() as server:
        server.set(owner, "TXT", data)
        assert dkimpy_verifies(signed, server)
        assert not dkimpy_verifies(signed.replace(b"body", b"bodY"), server)
    assert opendkim_results(signed, [key], tmp_path / "opendkim") == ["pass"]


def test_keygen_never_replaces_a_key(tmp_path: Path) -> None:
    key_file = tmp_path / "s1.pem"
    key_file.write_bytes(b"the key in use\n")
    done = keygen("--domain", "example.test", "--selector", "s1", "--key-file", str(key_file))
    assert done.returncode == 1
    assert f"{key_file} exists; it is not replaced" in done.stderr and "new selector" in done.stderr
    assert done.stdout == ""
    assert key_file.read_bytes() == b"the key in use\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "1024"], "needs 2048 bits or more, not 1024"),
    (["--domain", "bad domain.test"], "is not a DNS name"),
])
def test_keygen_refusals(args: list[str], message: str, tmp_path: Path) -> None:
    base = {"--domain": "example.test", "--selector": "s1", "--key-file": str(tmp_path / "k.pem")}
    base.update(dict(zip(args[::2], args[1::2])))
    done = keygen(*[part for pair in base.items() for part in pair])
    assert done.returncode == 1 and message in done.stderr
    assert not (tmp_path / "k.pem").exists()
