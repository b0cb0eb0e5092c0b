"""Frames between processes: typed messages (mta/messages.py) over SEQPACKET channels or
stream sockets.

Master <-> children: one message per SOCK_SEQPACKET packet, optionally with fds.
Scheduler <-> delivery workers, inbound workers, the control process and the CLI: a Unix
stream socket with each message prefixed by its length (4 bytes, big-endian); bursts are
written once (StreamFrames) and read at once (StreamFrameReader).

SEQPACKET keeps packet boundaries, so a frame never arrives split and the file
descriptors passed with it (SCM_RIGHTS) belong to exactly that frame. A frame that is
not a message of this build raises messages.MessageError (a ValueError) where it is
read, its descriptors closed. Sockets are non-blocking: send_frame returns False when the
frame cannot go now (the peer's buffer is full, or the kernel is short of memory or of
room for descriptors in flight; the caller decides: retry elsewhere, or later) and
raises OSError when the channel is broken (EPIPE, ECONNRESET, ENOTCONN...: the peer is
gone or going).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Sequence

from mta import messages
from mta.messages import Message

MAX_FRAME_BYTES = 64 * 1024
MAX_FDS = 8
MAX_STREAM_FRAME_BYTES = 16 * 1024 * 1024
# A send that fails with these says nothing about the peer: try again later or elsewhere.
NOT_NOW_ERRNOS = frozenset({errno.ENOBUFS, errno.ENOMEM, errno.ETOOMANYREFS})


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(master side, child side); both non-blocking, both close-on-exec."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setblocking(False)
    child.setblocking(False)
    return parent, child


def send_frame(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> bool:
    data = messages.encode(message)
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        if exc.errno in NOT_NOW_ERRNOS:
            return False
        raise
    return True


def recv_frame(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """The next message and its fds; None at EOF. Raises BlockingIOError when none is
    waiting, MessageError for a packet that is not a message (its fds closed)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_FRAME_BYTES, MAX_FDS)
    try:
        if data:
            return messages.decode(data), fds
    except messages.MessageError:
        _close(fds)
        raise
    _close(fds)  # never leak a descriptor that came with an empty packet
    return None


def _close(fds: list[int]) -> None:
    for fd in fds:
        socket.close(fd)


# --- stream sockets (the scheduler's Unix socket) ----------------------------------------
# The same messages, each prefixed with its length as 4 bytes big-endian.

_LENGTH = struct.Struct(">I")


def encode_stream_frame(message: Message) -> bytes:
    data = messages.encode(message)
    return _LENGTH.pack(len(data)) + data


async def read_stream_frame(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at a clean EOF between frames. MessageError (a
    ValueError) for a frame that is not a message or is over MAX_STREAM_FRAME_BYTES."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return messages.decode(await reader.readexactly(_length(head)))


class StreamFrameReader:
    """The frames of one stream, every whole one its reader holds at once: one await per
    burst instead of two per frame (a delivery worker's Done frames come many per turn).
    Frames come in order; the one after a frame that is not a message is never read."""

    READ_BYTES = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()
        self._error: messages.MessageError | None = None  # met after frames still to be handled

    async def read(self) -> list[Message] | None:
        """The next frames (at least one); None at a clean EOF between frames. MessageError
        for a frame that is not a message or is over MAX_STREAM_FRAME_BYTES (after the
        frames before it), IncompleteReadError at EOF inside a frame."""
        while True:
            if self._error is not None:
                raise self._error
            found = self._split()
            if found:
                return found
            chunk = await self._reader.read(self.READ_BYTES)
            if not chunk:
                if self._buffer:
                    raise asyncio.IncompleteReadError(bytes(self._buffer), None)
                return None
            self._buffer += chunk

    def _split(self) -> list[Message]:
        found: list[Message] = []
        buffer, at = self._buffer, 0
        try:
            while len(buffer) - at >= _LENGTH.size:
                end = at + _LENGTH.size + _length(buffer[at:at + _LENGTH.size])
                if len(buffer) < end:
                    break
                found.append(messages.decode(bytes(buffer[at + _LENGTH.size:end])))
                at = end
        except messages.MessageError as exc:
            if not found:
                raise
            self._error = exc  # raised at the next read, once these are handled
        del buffer[:at]
        return found


def recv_stream_frame(sock: socket.socket) -> Message:
    """The next message from a blocking stream socket (the CLI). ConnectionError at EOF."""
    return messages.decode(_recv_exactly(sock, _length(_recv_exactly(sock, _LENGTH.size))))


def _length(head: bytes) -> int:
    (length,) = _LENGTH.unpack(head)
    if length > MAX_STREAM_FRAME_BYTES:
        raise messages.MessageError(f"a frame of {length} bytes (the limit is {MAX_STREAM_FRAME_BYTES})")
    return int(length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return data


async def read_hello(reader: asyncio.StreamReader) -> messages.Hello | None:
    """The peer's first message, which must be a Hello of this build; None at EOF."""
    message = await read_stream_frame(reader)
    if message is None or isinstance(message, messages.Hello):
        return message
    raise messages.unexpected(message, "before a Hello")


class StreamFrames:
    """Frames to one stream, written together once per event-loop iteration: the
    scheduler's jobs to a delivery worker and the worker's outcomes back come in bursts
    (many sessions finish at once), and one write per burst saves a system call on
    each side per frame. Order is kept; nothing is written once the stream is closing."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()  # once: each ask costs a getpid() on Python 3.11

    def send(self, message: Message) -> None:
        if self.writer.is_closing():
            return
        self._out.append(encode_stream_frame(message))
        if len(self._out) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.writer.is_closing():
            self.writer.write(b"".join(out))
