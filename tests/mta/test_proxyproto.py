"""PROXY protocol v1/v2 parsing: real headers as HAProxy sends them, and bad ones."""

import struct

import pytest

from mta import proxyproto
from mta.proxyproto import ProxyError, ProxyHeader

V2 = proxyproto.V2_SIGNATURE


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2 + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def test_v1_tcp4_and_leftover_bytes() -> None:
    data = b"PROXY TCP4 192.0.2.7 203.0.113.1 51000 25\r\nEHLO x\r\n"
    header, used = proxyproto.parse(data)
    assert header == ProxyHeader(1, ("192.0.2.7", 51000), ("203.0.113.1", 25))
    assert data[used:] == b"EHLO x\r\n"


def test_v1_tcp6_and_unknown() -> None:
    header, _ = proxyproto.parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 25\r\n")
    assert header.source == ("2001:db8::7", 4000)
    header, used = proxyproto.parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert header.source is None and used == 35


def test_v2_inet_inet6_local_with_tlvs() -> None:
    body = bytes([192, 0, 2, 9, 10, 0, 0, 1]) + struct.pack("!HH", 40000, 25) + b"\x04\x00\x01x"  # + a NOOP TLV
    header, used = proxyproto.parse(v2(1, 0x11, body) + b"rest")
    assert header == ProxyHeader(2, ("192.0.2.9", 40000), ("10.0.0.1", 25)) and used == 16 + len(body)
    body6 = b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x07" + b"\x00" * 15 + b"\x01" + struct.pack("!HH", 1, 2)
    assert proxyproto.parse(v2(1, 0x21, body6))[0].source == ("2001:db8::7", 1)
    assert proxyproto.parse(v2(0, 0x00, b""))[0].source is None  # LOCAL: a health check


@pytest.mark.parametrize("split", [1, 5, 12, 15, 20])
def test_split_headers_need_more(split: int) -> None:
    data = v2(1, 0x11, bytes(12))
    assert proxyproto.parse(data[:split]) is None
    assert proxyproto.parse(b"PROXY TCP4 1.2.3.4"[:split]) is None


@pytest.mark.parametrize("data", [
    b"EHLO hi\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
    b"PROXY TCP4 " + b"1" * 120,
    V2 + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 signature
    V2 + b"\x21\x11\xff\xff",  # oversized
    V2 + b"\x22\x11\x00\x0c" + bytes(12),  # unknown command
])
def test_bad_headers_are_errors(data: bytes) -> None:
    with pytest.raises(ProxyError):
        proxyproto.parse(data)
