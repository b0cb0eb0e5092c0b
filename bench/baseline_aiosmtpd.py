#!/usr/bin/env python3
"""The Python baseline for bench/run: aiosmtpd on uvloop, one fsync'd file per message.

Owns the reference point that `mta` is compared against: what a plain asyncio SMTP
server does when it stores every message durably before saying 250. The handler
writes the message to a new file in the spool and fsyncs it in a worker thread
(`loop.run_in_executor`), so the event loop keeps serving other sessions while the
disk works, as a durable MTA would.

Modes (`--mode`): `fsync` (the baseline), `write` (no fsync), `discard` (store
nothing: a trivial sink, used to measure the load generator's own ceiling).

It advertises PIPELINING by default (aiosmtpd reads commands from a buffered stream,
so pipelined MAIL/RCPT/DATA are handled correctly; it just doesn't say so), so that
the baseline and `mta` are driven with the same number of round trips.
Prints "ready" on stdout once listening; stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session

import evloop


class SpoolHandler:
    """aiosmtpd handler: store the message per --mode, then answer 250."""

    def __init__(self, spool: str, mode: str, advertise_pipelining: bool):
        self.spool = spool
        self.mode = mode
        self.advertise_pipelining = advertise_pipelining
        self.names = itertools.count(1)
        self.prefix = f"{os.getpid()}."

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.advertise_pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.mode == "discard":
            return "250 OK"
        path = os.path.join(self.spool, self.prefix + str(next(self.names)))
        data = envelope.original_content or b""
        await asyncio.get_running_loop().run_in_executor(None, self.store, path, data)
        return "250 OK"

    def store(self, path: str, data: bytes) -> None:
        # Runs in a thread: open, write, fsync, close. An OSError propagates to aiosmtpd,
        # which answers 500 instead of 250: never 250 for a message not on disk.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            if self.mode == "fsync":
                os.fsync(fd)
        finally:
            os.close(fd)


async def serve(host: str, port: int, handler: SpoolHandler) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench", loop=loop), host, port)
    await evloop.serve_until_signalled(server)
    try:
        # Python >= 3.12 waits here for open sessions too; don't hang on a stuck client.
        await asyncio.wait_for(server.wait_closed(), 5.0)
    except asyncio.TimeoutError:
        print("baseline: sessions still open at exit", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spool", required=True, help="directory for one file per message")
    p.add_argument("--mode", choices=("fsync", "write", "discard"), default="fsync")
    p.add_argument("--pipelining", action=argparse.BooleanOptionalAction, default=True,
                   help="advertise PIPELINING in the EHLO reply")
    a = p.parse_args(argv)
    os.makedirs(a.spool, exist_ok=True)
    handler = SpoolHandler(a.spool, a.mode, a.pipelining)
    evloop.run(serve(a.host, a.port, handler))
    return 0


if __name__ == "__main__":
    sys.exit(main())
