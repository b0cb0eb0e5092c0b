"""Which /api/ and /ui/ requests the control process answers: the checks run before any route.

First (check_transport): a client off loopback is answered only over TLS. Else 403.
Then, in this order, the first that fails refuses the request:
  1. Host names this listener: its address alone or with its port (IPv6 in brackets;
     a wildcard listener: 127.0.0.1 and [::1]), or a name in [control] allowed_hosts.
     Else 421: a DNS-rebinding page reaches us under its own name and sends that.
  2. Not a cross-site browser request: an Origin must be http:// (https:// when the
     listener has TLS) and a Host of rule 1 (a page of another site or port is refused),
     Sec-Fetch-Site, when sent, same-origin or none. Else 403.
  3. Authorization: Bearer <token>, compared in constant time; or, without an
     Authorization header, a web UI session (the mta_session cookie) and, for every
     method but GET and HEAD, its X-CSRF-Token. Else 401 (WWW-Authenticate), or 403 for
     a missing or wrong X-CSRF-Token.
  4. A POST carries Content-Type: application/json (what a page can send without a CORS
     preflight, a form or text/plain, is refused). Else 415.
/ui/ runs 1, 2 and 4 (check_browser, check_body); its routes need no credential to show
the page or to log in. A GET of the page's own files runs rule 1 only (check_host): they
are public and read no cookie, and a link from a wiki or a dashboard (Sec-Fetch-Site
cross-site) must open the page; framing stays refused (frame-ancestors 'none'). /metrics, /healthz and /readyz are not checked: Prometheus and
load balancers scrape them under whatever name they were given, and they change nothing.

Pure: no I/O. A Refusal names its reason for the log, and never holds the token.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from mta.config import split_hostport
from workers.control.websession import Session

WILDCARDS = ("0.0.0.0", "::")
LOOPBACKS = ("127.0.0.1", "::1")  # a wildcard listener is asked here (mta queue does)
BROWSER_SAME_SITE = (b"same-origin", b"none")  # "none": the user typed the address
SAFE_METHODS = (b"GET", b"HEAD")  # a session needs no X-CSRF-Token for these
NEEDS_TLS = ("the web UI and the admin API answer off loopback only over TLS: set [control] tls_cert_file "
             "and tls_key_file")


@dataclass(frozen=True)
class Refusal:
    status: bytes
    reason: str  # for the log: transport, host, origin, fetch_site, token_missing, token_wrong, csrf, content_type, size (main.py)
    message: str  # for the client
    seen: str | None = None  # the offending header value, for the log (never a token)
    headers: bytes = b""  # extra response header lines, each ending in CRLF


def host_forms(listen: str, allowed_hosts: Iterable[str]) -> frozenset[bytes]:
    """Every Host value this listener answers: each name alone and with the listen port."""
    host, port = split_hostport(listen)
    names = set(LOOPBACKS) if host in WILDCARDS else {host}
    names.update(name.strip("[]") for name in allowed_hosts)
    forms = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        forms.update((shown.lower().encode(), f"{shown}:{port}".lower().encode()))
    return frozenset(forms)


def check_transport(client: str | None, local: str | None, tls: bool) -> Refusal | None:
    """A client off loopback needs TLS. A client at the listener's own address (this host,
    through the kernel's loopback path) counts as loopback; so does any 127/8 address."""
    if tls or client is None or _loopback(client) or client == local:
        return None
    return Refusal(b"403 Forbidden", "transport", NEEDS_TLS, client)


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


class Guard:
    def __init__(self, listen: str, allowed_hosts: Iterable[str], token: str, tls: bool = False) -> None:
        self.hosts = host_forms(listen, allowed_hosts)
        self._credential = token.encode()
        self._scheme = b"https" if tls else b"http"

    def check_request(self, method: bytes, headers: dict[bytes, bytes],
                      session: Session | None = None) -> Refusal | None:
        """An /api/ request: rules 1-4; `session` is the one its cookie names, if any."""
        refusal = self.check_browser(headers)
        if refusal is not None:
            return refusal
        given = headers.get(b"authorization")
        if given is not None or session is None:
            refusal = self.check_token(given)
        elif method not in SAFE_METHODS and not session.check_csrf(headers.get(b"x-csrf-token")):
            refusal = Refusal(b"403 Forbidden", "csrf", "missing or wrong X-CSRF-Token")
        return refusal or check_body(method, headers)

    def check_browser(self, headers: dict[bytes, bytes]) -> Refusal | None:
        """Rules 1 and 2: the Host, the Origin, Sec-Fetch-Site."""
        refusal = self.check_host(headers)
        if refusal is not None:
            return refusal
        origin = headers.get(b"origin")
        if origin is not None:
            scheme, _, where = origin.partition(b"://")
            if scheme.lower() != self._scheme or where.lower() not in self.hosts:
                return Refusal(b"403 Forbidden", "origin", "cross-origin requests are refused", _shown(origin))
        site = headers.get(b"sec-fetch-site")
        if site is not None and site.lower() not in BROWSER_SAME_SITE:
            return Refusal(b"403 Forbidden", "fetch_site", "cross-site requests are refused", _shown(site))
        return None

    def check_host(self, headers: dict[bytes, bytes]) -> Refusal | None:
        """Rule 1."""
        host = headers.get(b"host", b"")
        if host.lower() not in self.hosts:
            return Refusal(b"421 Misdirected Request", "host", "the Host header does not name this server "
                           "(add the name to [control] allowed_hosts)", _shown(host))
        return None

    def check_token(self, given: bytes | None) -> Refusal | None:
        """Rule 3 for a Bearer client."""
        scheme, _, credential = (given or b"").partition(b" ")
        matches = hmac.compare_digest(credential.strip(), self._credential)  # constant time, always run
        if matches and scheme.lower() == b"bearer":
            return None
        return Refusal(b"401 Unauthorized", "token_wrong" if given else "token_missing",
                       "a bearer token is required (mta queue reads it from [control] token or token_file)",
                       headers=b'WWW-Authenticate: Bearer realm="mta"\r\n')

    def check_login_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._credential)


def check_body(method: bytes, headers: dict[bytes, bytes]) -> Refusal | None:
    """Rule 4."""
    if method == b"POST":
        kind = headers.get(b"content-type", b"")
        if kind.partition(b";")[0].strip().lower() != b"application/json":
            return Refusal(b"415 Unsupported Media Type", "content_type", "a POST body must be "
                           "Content-Type: application/json", _shown(kind))
    return None


def _shown(value: bytes) -> str:
    return value[:200].decode("ascii", "replace")
