"""Frames between processes: msgpack maps, over SEQPACKET channels or stream sockets.

Master <-> children: one msgpack map per SOCK_SEQPACKET packet, optionally with fds.
Scheduler <-> delivery workers, inbound workers and the CLI: a Unix stream socket
with each map prefixed by its length (4 bytes, big-endian).

SEQPACKET keeps packet boundaries, so a frame never arrives split and the file
descriptors passed with it (SCM_RIGHTS) belong to exactly that frame. Every frame is a
map with a "t" (type) key. Sockets are non-blocking: send_frame returns False when the
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
from typing import Any

import msgpack

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


def send_frame(sock: socket.socket, frame: dict[str, Any], fds: Sequence[int] = ()) -> bool:
    data = msgpack.packb(frame)
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


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next frame and its fds; None at EOF. Raises BlockingIOError when none is waiting."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_FRAME_BYTES, MAX_FDS)
    if not data:
        for fd in fds:  # never leak a descriptor that came with an empty packet
            socket.close(fd)
        return None
    return msgpack.unpackb(data), fds


# --- stream sockets (the scheduler's Unix socket) ----------------------------------------
# The same maps, each prefixed with its length as 4 bytes big-endian.

_LENGTH = struct.Struct(">I")


def encode_stream_frame(frame: dict[str, Any]) -> bytes:
    data = msgpack.packb(frame)
    return _LENGTH.pack(len(data)) + data


async def read_stream_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at a clean EOF between frames."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_STREAM_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_STREAM_FRAME_BYTES}")
    return msgpack.unpackb(await reader.readexactly(length))


class StreamFrames:
    """Frames to one stream, written together once per event-loop iteration: the
    scheduler's jobs to a delivery worker and the worker's outcomes back come in bursts
    (many sessions finish at once), and one write per burst saves a system call on
    each side per frame. Order is kept; nothing is written once the stream is closing."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._out: list[bytes] = []

    def send(self, frame: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self._out.append(encode_stream_frame(frame))
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.writer.is_closing():
            self.writer.write(b"".join(out))
