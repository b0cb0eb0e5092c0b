"""ServerOptions: what one listener's SMTP server core offers and enforces (made from its config).

Re-exported by server.py, whose ServerConnection takes it. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerOptions:
    hostname: str
    max_message_bytes: int = 25 * 1024**2
    max_recipients: int = 100
    max_errors: int = 20
    max_received_headers: int = 50
    bare_newline: str = "reject"  # or "normalize"
    max_junk_commands: int = 100  # NOOP/RSET/HELP/VRFY/EXPN per session, then 421 4.7.0
    starttls: bool = False  # a certificate is there: offer STARTTLS until TLS is active
    auth_mechanisms: tuple[str, ...] = ()  # e.g. ("PLAIN", "LOGIN"); empty: AUTH not offered
    auth_plaintext: bool = False  # offer AUTH without TLS as well
    auth_required: bool = False  # MAIL needs a successful AUTH first (submission)
    vrfy: bool = False  # hand VRFY to the application (else 252 for everyone)
    expn: bool = False  # hand EXPN to the application (else 502)
