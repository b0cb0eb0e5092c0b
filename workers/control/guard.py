"""Which /api/ requests the control process answers: the checks run before any route.

In this order, the first that fails refuses the request:
  1. Host names this listener: its address alone or with its port (IPv6 in brackets;
     a wildcard listener: 127.0.0.1 and [::1]), or a name in [control] allowed_hosts.
     Else 421: a DNS-rebinding page reaches us under its own name and sends that.
  2. Not a cross-site browser request: an Origin must be http:// and a Host of rule 1
     (a page of another site or port is refused), Sec-Fetch-Site, when sent, same-origin
     or none. Else 403.
  3. Authorization: Bearer <token>, compared in constant time. Else 401, WWW-Authenticate.
  4. A POST carries Content-Type: application/json (what a page can send without a CORS
     preflight, a form or text/plain, is refused). Else 415.
/metrics, /healthz and /readyz are not checked: Prometheus and load balancers scrape them
under whatever name they were given, and they change nothing.

Pure: no I/O. A Refusal names its reason for the log, and never holds the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from mta.config import split_hostport

WILDCARDS = ("0.0.0.0", "::")
LOOPBACKS = ("127.0.0.1", "::1")  # a wildcard listener is asked here (mta queue does)
BROWSER_SAME_SITE = (b"same-origin", b"none")  # "none": the user typed the address


@dataclass(frozen=True)
class Refusal:
    status: bytes
    reason: str  # for the log: host, origin, fetch_site, token_missing, token_wrong, content_type
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


class Guard:
    def __init__(self, listen: str, allowed_hosts: Iterable[str], token: str) -> None:
        self.hosts = host_forms(listen, allowed_hosts)
        self._credential = token.encode()

    def check_request(self, method: bytes, headers: dict[bytes, bytes]) -> Refusal | None:
        host = headers.get(b"host", b"")
        if host.lower() not in self.hosts:
            return Refusal(b"421 Misdirected Request", "host", "the Host header does not name this server "
                           "(add the name to [control] allowed_hosts)", _shown(host))
        origin = headers.get(b"origin")
        if origin is not None:
            scheme, _, where = origin.partition(b"://")
            if scheme.lower() != b"http" or where.lower() not in self.hosts:
                return Refusal(b"403 Forbidden", "origin", "cross-origin requests are refused", _shown(origin))
        site = headers.get(b"sec-fetch-site")
        if site is not None and site.lower() not in BROWSER_SAME_SITE:
            return Refusal(b"403 Forbidden", "fetch_site", "cross-site requests are refused", _shown(site))
        given = headers.get(b"authorization")
        scheme, _, credential = (given or b"").partition(b" ")
        matches = hmac.compare_digest(credential.strip(), self._credential)  # constant time, always run
        if not (matches and scheme.lower() == b"bearer"):
            return Refusal(b"401 Unauthorized", "token_wrong" if given else "token_missing",
                           "a bearer token is required (mta queue reads it from [control] token or token_file)",
                           headers=b'WWW-Authenticate: Bearer realm="mta"\r\n')
        if method == b"POST":
            kind = headers.get(b"content-type", b"")
            if kind.partition(b";")[0].strip().lower() != b"application/json":
                return Refusal(b"415 Unsupported Media Type", "content_type", "a POST body must be "
                               "Content-Type: application/json", _shown(kind))
        return None


def _shown(value: bytes) -> str:
    return value[:200].decode("ascii", "replace")
