#!/usr/bin/env python3
"""A null SMTP sink: the cheapest server that speaks enough SMTP for bench/loadgen.py.

Owns the measurement of the load generator's own ceiling (bench/run target
`null-sink`): with a server this cheap, the msg/s reached is the client's limit on
this machine, not a server's. It stores nothing and checks almost nothing: it answers
each command line with a canned reply, swallows DATA up to the "." line and says 250.
Never use it as a baseline for a real server.

It is also bench/run's fallback common next hop for `--e2e` when Postfix's smtp-sink
is not installed: with `--count` it writes "mesg=N\\r" on stdout (as `smtp-sink -c`
does) whenever messages arrived, N being the running total of "." lines received.
With `--ids HEADER` as well (bench/run --queue-scale) it also reads that header of each
message and writes "mesg=N ids=U dups=D\\r": U distinct values seen, D messages whose
value had been seen before (a duplicate delivery). Values are kept in a set for the
sink's life (about 70 bytes each).

Invariant: one reply per command line, in order, so pipelined clients stay in step.
Prints "ready" on stdout once listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from typing import ClassVar

import evloop

EHLO_REPLY = b"250-sink.bench\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
REPLIES = {b"MAIL": b"250 OK\r\n", b"RCPT": b"250 OK\r\n", b"DATA": b"354 go ahead\r\n",
           b"RSET": b"250 OK\r\n", b"NOOP": b"250 OK\r\n", b"HELO": b"250 sink.bench\r\n",
           b"EHLO": EHLO_REPLY}
HEADER_SEARCH_BYTES = 64 * 1024  # the header block is looked for this far into a message


class Counter:
    """Messages received so far by every connection; reported when `enabled`. With
    `ids` (a compiled pattern for one header), distinct values of it and repeats."""

    enabled = False
    messages = 0
    ids: re.Pattern[bytes] | None = None
    seen: ClassVar[set[bytes]] = set()
    dups = 0

    @classmethod
    def see(cls, value: bytes) -> None:
        if value in cls.seen:
            cls.dups += 1
        else:
            cls.seen.add(value)

    @classmethod
    def add(cls, n: int) -> None:
        cls.messages += n
        if cls.enabled:
            # One record per batch: cheap, and the last one is always the total.
            record = (b"mesg=%d\r" % cls.messages if cls.ids is None else
                      b"mesg=%d ids=%d dups=%d\r" % (cls.messages, len(cls.seen), cls.dups))
            sys.stdout.buffer.write(record)
            sys.stdout.buffer.flush()


class SinkProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        self.want_id = False  # in DATA with --ids: the header is still to be read
        transport.write(b"220 sink.bench ESMTP\r\n")

    def read_id(self, end: int) -> bool:
        """--ids: note the header's value once the header block (or the message's end)
        is in the buffer; False while neither has arrived (bounded by HEADER_SEARCH_BYTES)."""
        block = self.buffer.find(b"\r\n\r\n")
        if block < 0 and end < 0 and len(self.buffer) < HEADER_SEARCH_BYTES:
            return False
        limit = min(x for x in (block, end, len(self.buffer)) if x >= 0)
        assert Counter.ids is not None  # want_id is set only with --ids
        found = Counter.ids.search(self.buffer, 0, limit)
        if found:
            Counter.see(found.group(1))
        self.want_id = False
        return True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        received = 0  # messages whose "." this batch held
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if self.want_id and not self.read_id(end):
                    break  # the header block is not all here yet: keep the buffer whole
                if end < 0:
                    # Keep only a tail that could still hold the start of the terminator.
                    self.buffer = self.buffer[-4:]
                    break
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                out.append(b"250 OK queued\r\n")
                received += 1
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            verb = self.buffer[:4].upper()
            self.buffer = self.buffer[line_end + 2:]
            if verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))
                if received:
                    Counter.add(received)
                self.transport.close()
                return
            out.append(REPLIES.get(verb, b"500 unknown command\r\n"))
            if verb == b"DATA":
                self.in_data = True
                self.want_id = Counter.ids is not None
                # A CRLF before the body lets one search find "." as its first line too.
                self.buffer = b"\r\n" + self.buffer
        if out:
            self.transport.write(b"".join(out))
            if received:
                Counter.add(received)


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(SinkProtocol, host, port)
    await evloop.serve_until_signalled(server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spool", help="ignored; accepted so bench/run can treat targets alike")
    p.add_argument("--count", action="store_true",
                   help='write "mesg=N\\r" on stdout as messages arrive (like smtp-sink -c)')
    p.add_argument("--ids", metavar="HEADER",
                   help='with --count: also count distinct values of this header, and repeats '
                        '("mesg=N ids=U dups=D\\r")')
    a = p.parse_args(argv)
    if a.ids and not a.count:
        p.error("--ids goes with --count")
    Counter.enabled = a.count
    if a.ids:
        Counter.ids = re.compile(rb"\r\n" + re.escape(a.ids.encode("ascii")) + rb":[ \t]*([^\r\n]+)",
                                 re.IGNORECASE)
    evloop.run(serve(a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
