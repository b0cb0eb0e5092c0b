"""rspamd and OpenDKIM as real milter daemons on loopback, for library and end-to-end tests.

    with start_rspamd(tmp_path) as address:                  # "inet:127.0.0.1:PORT"
        result = await run_milter(MilterAddress.parse(address), envelope, message, 30)
    with start_opendkim(tmp_path, "example.test", "sel", key_file) as address: ...
    dns_server.set("sel._domainkey.example.test", "TXT", make_dkim_key(key_file, "ed25519"))

Each daemon runs in the foreground in its own process group, with its own config under
a fresh world-searchable directory in /tmp (the daemons drop to their own users, which
cannot enter pytest's 0700 tmp_path); at exit it is stopped, its log copied to tmp_path
and the directory removed. rspamd (its proxy worker in milter mode, scanning itself) asks
a private DnsServer, so no lookup leaves the machine; it needs no Redis (the modules that
do disable themselves). `rspamd_milter` is a session fixture: rspamd takes seconds to load
(about 14 s here). OpenDKIM starts at once but takes about 5 s to stop (libmilter's poll).
rspamd's config adds three test rules on the Subject (RULES) so that each action is reachable.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.integration.conftest import free_port
from tests.integration.dns_server import DnsServer

RSPAMD = "/usr/bin/rspamd"
OPENDKIM = "/usr/sbin/opendkim"
START_SECONDS = 60.0
STOP_SECONDS = 20.0  # rspamd's main process waits up to 16 s for its workers
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
REJECT_MESSAGE = "Spam message rejected by the test scanner"
# Subject -> rspamd action, through the test rules' scores (on top of a few points of
# rspamd's own heuristics for a test message): add_header 6, rewrite_subject 12, reject 15.
RULES = {"TEST-ADD-HEADER": 7.0, "TEST-REWRITE-SUBJECT": 11.0, "TEST-REJECT": 30.0}

_RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["{nameserver}"]; timeout = 1s; retransmits = 1; }}
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{ default = yes; self_scan = yes; }}
    count = 1;
    spam_header = "X-Spam";
    reject_message = "{reject_message}";
}}
"""
_MILTER_HEADERS = """\
use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id", "x-spam-status", "authentication-results"];
extended_spam_headers = true;
skip_local = false;  # the end-to-end tests' client is 127.0.0.1
"""
_ACTIONS = """\
reject = 15;
rewrite_subject = 12;
add_header = 6;
greylist = null;
subject = "***SPAM*** %s";
"""


def _require(command: str, user: str, package: str) -> None:
    if not Path(command).exists():
        pytest.fail(f"{command} is missing: run `make test-deps` (Debian package {package})")
    try:
        pwd.getpwnam(user)
    except KeyError:
        pytest.fail(f"user {user} is missing: reinstall the Debian package {package}")


def _root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def _owned(path: Path, user: str) -> Path:
    path.mkdir(exist_ok=True)
    shutil.chown(path, user=user, group=pwd.getpwnam(user).pw_gid)
    return path


@contextlib.contextmanager
def _daemon(argv: list[str], port: int, log: Path, kept_log: Path, what: str) -> Iterator[None]:
    """Run argv until the port listens; at exit stop it (SIGTERM, then SIGKILL) and keep its log."""
    with open(log.with_suffix(".out"), "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(proc, port, what, log)
        yield
    finally:
        _stop(proc)
        kept = [p for p in (log, log.with_suffix(".out")) if p.exists()]
        kept_log.write_bytes(b"".join(p.read_bytes() for p in kept))


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_SECONDS}s: {_tail(log)}")


def _tail(log: Path) -> str:
    lines = [p.read_text(errors="replace") for p in (log, log.with_suffix(".out")) if p.exists()]
    return "\n".join("".join(lines).splitlines()[-20:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # a worker that outlived its main process
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def start_rspamd(tmp_path: Path, nameserver: str | None = None) -> Iterator[str]:
    """rspamd 3.x's proxy worker as a milter on 127.0.0.1: its address, "inet:127.0.0.1:PORT".

    `nameserver` ("127.0.0.1:PORT") is the DNS server rspamd asks; by default a private
    DnsServer that knows nothing outside "test." and refuses the rest."""
    _require(RSPAMD, "_rspamd", "rspamd")
    with contextlib.ExitStack() as stack:
        if nameserver is None:
            nameserver = stack.enter_context(DnsServer()).nameserver
        root = _root("mta-rspamd-")
        stack.callback(shutil.rmtree, root, True)
        for name in ("db", "run", "log"):
            _owned(root / name, "_rspamd")
        (root / "local.d").mkdir()
        (root / "override.d").mkdir()
        port = free_port()
        (root / "rspamd.conf").write_text(_RSPAMD_CONF.format(
            nameserver=nameserver, port=port, reject_message=REJECT_MESSAGE))
        (root / "local.d" / "milter_headers.conf").write_text(_MILTER_HEADERS)
        (root / "override.d" / "actions.conf").write_text(_ACTIONS)
        (root / "local.d" / "regexp.conf").write_text("".join(
            f'{name.replace("-", "_")} {{\n  re = "Subject=/{name}/";\n  score = {score};\n'
            f'  description = "mta test rule";\n}}\n' for name, score in RULES.items()))
        argv = [RSPAMD, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", str(root / "rspamd.conf")]
        for var, value in (("CONFDIR", "/etc/rspamd"), ("LOCAL_CONFDIR", root), ("DBDIR", root / "db"),
                           ("RUNDIR", root / "run"), ("LOGDIR", root / "log")):
            argv += ["--var", f"{var}={value}"]
        stack.enter_context(_daemon(argv, port, root / "log" / "rspamd.log", tmp_path / "rspamd.log", "rspamd"))
        yield f"inet:127.0.0.1:{port}"


@pytest.fixture(scope="session")
def rspamd_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One rspamd for the session (it takes seconds to load its rules): its milter address."""
    with start_rspamd(tmp_path_factory.mktemp("rspamd")) as address:
        yield address


@contextlib.contextmanager
def start_opendkim(tmp_path: Path, domain: str, selector: str, key_file: Path,
                   internal_hosts: tuple[str, ...] = ("127.0.0.1", "::1")) -> Iterator[str]:
    """OpenDKIM signing mail of `domain` with `key_file` (PEM) as milter: "inet:127.0.0.1:PORT".

    It signs a message whose From: is in `domain` when the SMTP client's address is one of
    `internal_hosts` or the session authenticated (the {auth_type} macro is set)."""
    _require(OPENDKIM, "opendkim", "opendkim")
    with contextlib.ExitStack() as stack:
        root = _root("mta-opendkim-")
        stack.callback(shutil.rmtree, root, True)
        key = root / "signing.key"
        shutil.copyfile(key_file, key)
        key.chmod(0o600)
        shutil.chown(key, user="opendkim")
        hosts = root / "internal-hosts"
        hosts.write_text("".join(f"{host}\n" for host in internal_hosts))
        run = _owned(root / "run", "opendkim")
        port = free_port()
        algorithm = "ed25519-sha256" if _is_ed25519(key_file) else "rsa-sha256"
        (root / "opendkim.conf").write_text(
            f"Mode s\nSignatureAlgorithm {algorithm}\nDomain {domain}\nSelector {selector}\nKeyFile {key}\n"
            f"Socket inet:{port}@127.0.0.1\nPidFile {run / 'opendkim.pid'}\nUserID opendkim\n"
            f"InternalHosts {hosts}\nCanonicalization relaxed/relaxed\n"
            # the test's key lives under /tmp, which other users can write; keep keys in
            # /etc/dkimkeys in production and leave RequireSafeKeys at its default (yes)
            "RequireSafeKeys false\nSyslog no\nLogWhy yes\n")
        argv = [OPENDKIM, "-f", "-x", str(root / "opendkim.conf")]
        stack.enter_context(_daemon(argv, port, root / "opendkim.log", tmp_path / "opendkim.log", "opendkim"))
        yield f"inet:127.0.0.1:{port}"


def make_dkim_key(path: Path, algorithm: str = "rsa") -> str:
    """Write a PEM private key (RSA 2048 or Ed25519) to `path`: its DNS TXT record's text."""
    if algorithm == "rsa":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(65537, 2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return dkim_txt_record(path)


def _is_ed25519(key_file: Path) -> bool:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return isinstance(key, ed25519.Ed25519PrivateKey)


def dkim_txt_record(key_file: Path) -> str:
    """The DKIM TXT record (RFC 6376 section 3.6.1; RFC 8463 for Ed25519) publishing key_file's public key."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    else:
        raw = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    text = f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode()}"
    return " ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))  # 255-octet strings
