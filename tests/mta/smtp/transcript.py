"""Golden SMTP transcripts run through the sans-I/O server, with no sockets.

File format (tests/mta/smtp/transcripts/*.txt):
    # comment
    ! max_message_bytes=100        option for ServerOptions (int, true/false, str; a str with spaces
                                   for auth_mechanisms is a tuple), before the first S:/C:; `! tls=true`: implicit TLS
    S: 220 mx.test ESMTP            a line we must send, exactly
    C: EHLO c.test                  a client line; CRLF is appended
    C< raw bytes                    client bytes with nothing appended
    M: expected\\r\\n              the data of the last message handed to the application
    X: closed                       the server has closed the session

Consecutive C lines are sent in ONE receive_data() call (that is what pipelining
looks like on the wire); the S lines after them are everything we must answer.
Escapes \\r \\n \\t \\\\ and \\xHH are decoded in C, C< and M lines.
The application is the real relay policy (workers.inbound.policy) with client
192.0.2.10, local_domains = local.test, relay_domains = relay.test, no mynetworks;
every message is answered `250 2.0.0 Ok: queued as Q<n>`; every STARTTLS handshake
succeeds; only alice / secret (no authzid, or authzid alice) authenticates; VRFY and
EXPN (when enabled) know only <alice@local.test>.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from mta.config import RelayConfig
from mta.smtp import replies
from mta.smtp.commands import Expn, MailFrom, RcptTo, StartTls, Vrfy
from mta.smtp.replies import Reply
from mta.smtp.server import CLOSED, Credentials, Message, ServerConnection, ServerOptions
from workers.inbound import policy

RELAY = RelayConfig(local_domains=("local.test",), relay_domains=("relay.test",), mynetworks=())
CLIENT = ipaddress.ip_address("192.0.2.10")
_ESCAPE = re.compile(rb"\\(r|n|t|\\|x[0-9a-fA-F]{2})")
_SIMPLE = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"\\": b"\\"}


def unescape(text: str) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        return _SIMPLE.get(code) or bytes([int(code[1:], 16)])
    return _ESCAPE.sub(one, text.encode("utf-8"))


@dataclass
class App:
    """Drives a ServerConnection the way workers/inbound/protocol.py does."""

    conn: ServerConnection
    messages: list[Message] = field(default_factory=list)
    closed: bool = False

    def feed(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        self.pump()
        return self.conn.data_to_send()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if isinstance(event, MailFrom):
                self.conn.reply(policy.check_mail_from(RELAY, CLIENT, event))
            elif isinstance(event, RcptTo):
                decision = policy.check_rcpt_to(RELAY, CLIENT, event, hostname="mx.test")
                self.conn.reply(decision.reply, decision.rcpt)
            elif isinstance(event, Message):
                self.messages.append(event)
                self.conn.reply(replies.queued(f"Q{len(self.messages)}"))
            elif isinstance(event, StartTls):
                self.conn.tls_started()
            elif isinstance(event, Credentials):
                good = (event.username, event.password) == ("alice", "secret") and event.authzid in ("", "alice")
                self.conn.reply(replies.AUTH_OK if good else replies.AUTH_FAILED)
            elif isinstance(event, (Vrfy, Expn)):
                known = event.argument.strip("<>").lower() == "alice@local.test"
                self.conn.reply(Reply(250, "2.1.5", "<alice@local.test>") if known
                                else Reply(550, "5.1.1", "User unknown"))
            else:
                self.closed = event is CLOSED
                return


def new_app(tls: bool = False, **options: object) -> tuple[App, bytes]:
    conn = ServerConnection(ServerOptions(hostname="mx.test", **options), tls=tls)  # type: ignore[arg-type]
    conn.greet()
    return App(conn), conn.data_to_send()


def _option(key: str, value: str) -> object:
    if value.isdigit():
        return int(value)
    if value in ("true", "false"):
        return value == "true"
    return tuple(value.split()) if key == "auth_mechanisms" else value


def run_transcript(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    options: dict[str, object] = {}
    steps: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("! "):
            key, _, value = line[2:].partition("=")
            options[key.strip()] = _option(key.strip(), value.strip())
            continue
        kind, text = line[:2], line[3:]
        if kind not in ("S:", "C:", "C<", "M:", "X:"):
            raise ValueError(f"{path.name}:{number}: unknown line kind {kind!r}")
        steps.append((kind, text))
    app, greeting = new_app(**options)
    pending_out = greeting
    i = 0
    while i < len(steps):
        kind, text = steps[i]
        if kind in ("C:", "C<"):
            chunk = b""
            while i < len(steps) and steps[i][0] in ("C:", "C<"):
                chunk += unescape(steps[i][1]) + (b"\r\n" if steps[i][0] == "C:" else b"")
                i += 1
            assert not pending_out, f"{path.name}: unexpected output before client step: {pending_out!r}"
            pending_out = app.feed(chunk)
            continue
        if kind == "S:":
            expected = []
            while i < len(steps) and steps[i][0] == "S:":
                expected.append(steps[i][1])
                i += 1
            got = pending_out.decode("utf-8").split("\r\n")[:-1] if pending_out else []
            assert got == expected, f"{path.name}: server said {got}, transcript expects {expected}"
            pending_out = b""
            continue
        if kind == "M:":
            assert app.messages, f"{path.name}: no message was handed to the application"
            assert app.messages[-1].data == unescape(text), (
                f"{path.name}: message data {app.messages[-1].data!r} != {unescape(text)!r}")
        elif kind == "X:":
            assert app.closed, f"{path.name}: the session is still open"
        i += 1
    assert not pending_out, f"{path.name}: unchecked server output at the end: {pending_out!r}"
