"""The clamd client: one message, one INSTREAM scan, one connection.

    address = ClamdAddress.parse("tcp:127.0.0.1:3310")
    result = await scan(address, content, timeout_seconds=30)
    if result.virus is not None: ...   # the signature's name, e.g. "Eicar-Signature"

The wire (clamd(8)): `zINSTREAM\\0`, then the content in chunks, each behind its length as
4 bytes big-endian, then a zero length; clamd answers one NUL-terminated line,
`stream: OK`, `stream: <signature> FOUND`, or `... ERROR` (among them `INSTREAM size
limit exceeded. ERROR` once the stream passes its StreamMaxLength; clamd then hangs up).

Invariants: a connection per scan (clamd's default; no IDSESSION); one deadline over
connect, send and answer; the socket is closed on every path. The answer is read while
the content is still being sent and counts whenever it comes: an early one (the size
limit) ends the scan at once, and is not lost to the reset that follows it. Anything but a clean or a FOUND answer raises ClamdFailed:
what then happens is the caller's on_error policy.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Final

from mta.peeraddress import PeerAddress

CHUNK_BYTES: Final = 65536  # below clamd's own read buffer; the total is StreamMaxLength's business
MAX_REPLY_BYTES: Final = 4096  # a reply longer than this is not clamd's
COMMAND: Final = b"zINSTREAM\0"
END: Final = struct.pack("!I", 0)
SIZE_LIMIT: Final = "INSTREAM size limit exceeded. ERROR"

# "stream: Eicar-Signature FOUND"; with ExtendedDetectionInfo, "stream: Name(md5:size) FOUND".
_FOUND = re.compile(r"stream: (?P<name>\S+?)(?:\([0-9a-f]+:\d+\))? FOUND")


class ClamdFailed(Exception):
    """clamd gave no verdict: down, timed out, over its size limit, or an answer we cannot read."""


@dataclass(frozen=True, slots=True)
class ClamdAddress(PeerAddress):
    """`tcp:host:port` (IPv6 as `tcp:[::1]:port`) or `unix:/path`, as clamd.conf's sockets."""

    KINDS: ClassVar[tuple[str, ...]] = ("tcp",)
    WHAT: ClassVar[str] = "clamd"


@dataclass(frozen=True, slots=True)
class ScanResult:
    virus: str | None  # the signature clamd named, or None when the content is clean


def parse_reply(reply: bytes) -> ScanResult:
    """clamd's answer to INSTREAM, without its NUL: a ScanResult, or ClamdFailed saying why."""
    text = reply.decode("utf-8", "replace").strip()
    if text == "stream: OK":
        return ScanResult(None)
    found = _FOUND.fullmatch(text)
    if found is not None:
        return ScanResult(found["name"])
    if text == SIZE_LIMIT:
        raise ClamdFailed("the message is larger than clamd's StreamMaxLength")
    if text.endswith(" ERROR"):
        raise ClamdFailed(f"clamd could not scan: {text}")
    raise ClamdFailed(f"clamd answered what is not a scan result: {text[:200]!r}")


async def scan(address: ClamdAddress, content: bytes, timeout_seconds: float) -> ScanResult:
    """Scan `content` with the clamd at `address`, all within `timeout_seconds`."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            sock = await _connect(loop, address)
            return parse_reply(await _exchange(loop, sock, content))
    except TimeoutError as exc:
        raise ClamdFailed(f"clamd {address} gave no answer within {timeout_seconds}s") from exc
    except OSError as exc:
        raise ClamdFailed(f"clamd {address} failed: {exc}") from exc
    finally:
        if sock is not None:
            sock.close()


async def _connect(loop: asyncio.AbstractEventLoop, address: ClamdAddress) -> socket.socket:
    if address.path:
        targets = [(socket.AF_UNIX, address.path)]
    else:
        found = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        targets = [(family, sockaddr) for family, _, _, _, sockaddr in found]
    why = "no address"
    for family, sockaddr in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise  # cancelled (the deadline): nothing left open
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            continue
        return sock
    raise ClamdFailed(f"clamd {address} cannot be reached: {why}")


async def _exchange(loop: asyncio.AbstractEventLoop, sock: socket.socket, content: bytes) -> bytes:
    """Send the stream and read the answer at once; the answer, without its NUL.

    The answer counts whenever it comes: clamd refuses an over-long stream before it has
    all of it. A send that fails still yields the answer clamd sent before it hung up.
    """
    answer = asyncio.create_task(_read_reply(loop, sock))
    sending = asyncio.create_task(_send(loop, sock, content))
    try:
        await asyncio.wait([answer, sending], return_when=asyncio.FIRST_COMPLETED)
        send_failure = sending.exception() if sending.done() else None
        if send_failure is not None:
            await asyncio.wait([answer])
            if answer.exception() is not None:
                raise send_failure  # clamd said nothing we can read: the send's failure is why
        return await answer
    finally:
        for task in (answer, sending):
            task.cancel()
        await asyncio.wait([answer, sending])  # both off the socket before it closes
        for task in (answer, sending):
            if not task.cancelled():
                task.exception()  # a failure not chosen as the reason above is not news


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, content: bytes) -> None:
    for frame in _frames(content):
        await loop.sock_sendall(sock, frame)


def _frames(content: bytes) -> Iterator[bytes]:
    """The INSTREAM stream as writes: the command and the end ride with the first and last chunk."""
    view = memoryview(content)
    starts = range(0, len(view), CHUNK_BYTES)
    head = COMMAND
    for start in starts:
        chunk = view[start:start + CHUNK_BYTES]
        yield head + struct.pack("!I", len(chunk)) + chunk + (END if start == starts[-1] else b"")
        head = b""
    if not starts:
        yield COMMAND + END


async def _read_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    reply = bytearray()
    while True:
        data = await loop.sock_recv(sock, MAX_REPLY_BYTES)
        if not data:
            raise ClamdFailed(f"clamd closed the connection without an answer{_so_far(reply)}")
        reply += data
        end = reply.find(b"\0")
        if end != -1:
            return bytes(reply[:end])
        if len(reply) > MAX_REPLY_BYTES:
            raise ClamdFailed(f"clamd's answer has no end within {MAX_REPLY_BYTES} bytes{_so_far(reply)}")


def _so_far(reply: bytearray) -> str:
    return f" (after {bytes(reply[:200])!r})" if reply else ""
