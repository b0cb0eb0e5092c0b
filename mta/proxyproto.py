"""PROXY protocol v1 and v2 headers (HAProxy's spec), parsed from a byte buffer.

    parse(buffer) -> (ProxyHeader, consumed) | None (need more bytes); ProxyError if bad

A v1 header is at most 107 octets including CRLF; a v2 header here at most
MAX_V2_BYTES (addresses plus TLVs, which we skip). `PROXY UNKNOWN` and v2 LOCAL
carry no client address: `source` is None and the caller treats the connection as
coming from the proxy itself. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1_BYTES = 107
MAX_V2_BYTES = 16 + 1024
_V2_FIXED = struct.Struct("!12sBBH")


class ProxyError(ValueError):
    """Not a valid PROXY header: close the connection without a greeting."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    source: tuple[str, int] | None  # the real client; None for UNKNOWN / LOCAL
    destination: tuple[str, int] | None


def parse(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    if buffer.startswith(V2_SIGNATURE):
        return _parse_v2(buffer)
    if buffer.startswith(V1_PREFIX):
        return _parse_v1(buffer)
    if V2_SIGNATURE.startswith(buffer[:12]) or V1_PREFIX.startswith(buffer[:6]):
        return None  # a prefix of a header: wait for more
    raise ProxyError("no PROXY protocol header")


def _parse_v1(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    end = buffer.find(b"\r\n", 0, MAX_V1_BYTES)
    if end < 0:
        if len(buffer) >= MAX_V1_BYTES:
            raise ProxyError("PROXY v1 header longer than 107 octets")
        return None
    try:
        words = buffer[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 header is not ASCII") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(1, None, None), end + 2
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 header")
    version = 4 if words[1] == "TCP4" else 6
    source = (_ip(words[2], version), _port(words[4]))
    destination = (_ip(words[3], version), _port(words[5]))
    return ProxyHeader(1, source, destination), end + 2


def _parse_v2(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    if len(buffer) < 16:
        return None
    _sig, ver_cmd, family, length = _V2_FIXED.unpack_from(buffer)
    total = 16 + length
    if ver_cmd >> 4 != 2:
        raise ProxyError("PROXY v2 header with an unknown version")
    if total > MAX_V2_BYTES:
        raise ProxyError(f"PROXY v2 header longer than {MAX_V2_BYTES} octets")
    if len(buffer) < total:
        return None
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the proxy's own connection (e.g. a health check)
        return ProxyHeader(2, None, None), total
    if command != 1:
        raise ProxyError("PROXY v2 header with an unknown command")
    body = buffer[16:total]
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(2, (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport)), total
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        return ProxyHeader(2, (str(ipaddress.IPv6Address(src)), sport),
                           (str(ipaddress.IPv6Address(dst)), dport)), total
    if family == 0x00:  # UNSPEC
        return ProxyHeader(2, None, None), total
    raise ProxyError("PROXY v2 header with an unsupported address family")


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad address in PROXY header: {text[:40]!r}") from None
    if address.version != version:
        raise ProxyError("PROXY header address does not match its protocol")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyError("bad port in PROXY header")
    return int(text)
