"""The scheduler's socket with real processes: every peer says Hello with its build's
message protocol version; one of another build, or a frame that is not a message for
the scheduler, is logged and its connection dropped while mail keeps flowing. The CLI
refuses a scheduler of another build with a clear error."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from pathlib import Path

import msgpack
import pytest

from mta import frames, messages
from tests.integration.conftest import MtaServer, SmtpClient, free_port, queued_id, run_mta, server_config, \
    toml_dumps, wait_until
from tests.integration.sink import SmtpSink

pytestmark = pytest.mark.integration

OTHER_VERSION = messages.PROTOCOL_VERSION + 1


def relaying(mta_server, sink: SmtpSink) -> MtaServer:  # type: ignore[no-untyped-def]
    return mta_server(server={"inbound_workers": 1}, delivery={"workers": 1},
                      relay={"relay_domains": ["remote.test"], "mynetworks": ["127.0.0.1/32"]},
                      routes={"remote.test": f"{sink.address}:{sink.port}"})


def connect(server: MtaServer) -> socket.socket:
    """A connection to the scheduler's socket (the server greets before the scheduler listens)."""
    def attempt() -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(server.spool / "scheduler.sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        return sock
    return wait_until(attempt, 10, "the scheduler's socket", server)


def closed_after(sock: socket.socket) -> bool:
    """Everything the scheduler sent was read and then it closed the connection."""
    return sock.recv(1) == b""


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def relay_one(server: MtaServer, sink: SmtpSink, n: int) -> None:
    async def send() -> str | None:
        client = await SmtpClient.connect(server.port)
        try:
            return queued_id(await client.send_mail("a@client.test", [f"u{n}@remote.test"], b"Subject: t\r\n\r\nx\r\n"))
        finally:
            await client.close()
    assert asyncio.run(send())
    wait_until(lambda: any(m.recipients == [f"u{n}@remote.test"] for m in sink.messages), 15, f"message {n}", server)


def test_a_delivery_worker_of_another_build_is_refused_loudly(mta_server) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relaying(mta_server, sink)
        relay_one(server, sink, 1)
        with connect(server) as sock:
            sock.sendall(frame(msgpack.packb((0, OTHER_VERSION, "delivery", 4242, 500))))
            hello = frames.recv_stream_frame(sock)  # the scheduler's own, for us to check too
            assert hello == messages.Hello(messages.PROTOCOL_VERSION, "scheduler", hello.pid)
            assert closed_after(sock)
        log = server.log_bytes().decode()
        [line] = [x for x in log.splitlines() if "event=protocol_mismatch" in x]
        assert "proc=scheduler" in line and f"speaks message protocol {OTHER_VERSION}" in line and "pid 4242" in line
        assert "worker_pid=4242" not in log  # never taken as a delivery worker: no job goes to it
        relay_one(server, sink, 2)  # the real worker still delivers


@pytest.mark.parametrize(("sends", "says"), [
    (frame(messages.encode(messages.New(("0005F2C1A2B3C4D5E6F70A1B2C",)))), "unexpected New before a Hello"),
    (frame(messages.encode(messages.hello("cli"))) + frame(b"\xc1"), "not msgpack"),
    (frame(msgpack.packb({"t": "cmd", "op": "active"})), "an untyped 'cmd' frame"),
    (frame(messages.encode(messages.hello("cli"))) + frame(messages.encode(messages.Done(1, 1, ()))),
     "unexpected Done from a cli peer"),
    (frame(messages.encode(messages.hello("cli"))) + struct.pack(">I", 2**30), "a frame of 1073741824 bytes"),
], ids=["no-hello", "garbage", "untyped", "wrong-kind", "oversized"])
def test_a_frame_that_is_not_for_the_scheduler_drops_only_that_connection(mta_server, sends: bytes,
                                                                           says: str) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = relaying(mta_server, sink)
        with connect(server) as sock:
            sock.sendall(sends)
            assert isinstance(frames.recv_stream_frame(sock), messages.Hello)
            assert closed_after(sock)
        wait_until(lambda: re.search(rf"proc=scheduler .*event=bad_frame .*{re.escape(says)}",
                                     server.log_bytes().decode()), 5, "the bad_frame line", server)
        with connect(server) as sock:  # the scheduler still answers well-formed peers
            sock.sendall(frame(messages.encode(messages.hello("cli"))) + frame(messages.encode(messages.ActiveQuery())))
            assert isinstance(frames.recv_stream_frame(sock), messages.Hello)
            assert frames.recv_stream_frame(sock) == messages.ActiveJobs({})
        relay_one(server, sink, 1)
        assert "Traceback" not in server.log_bytes().decode()


def test_the_cli_refuses_a_scheduler_of_another_build(tmp_path: Path) -> None:
    """With the server stopped (nothing on [control] listen) the CLI asks the scheduler's
    socket; a scheduler of another build answers a Hello the CLI refuses, naming both
    versions, and nothing is applied to the spool behind its back."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    config = tmp_path / "mta.toml"
    config.write_text(toml_dumps(server_config(free_port(), spool)))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(spool / "scheduler.sock"))
    listener.listen()
    heard: list[bytes] = []

    def other_build() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(frame(msgpack.packb((0, OTHER_VERSION, "scheduler", 99, 0, "a later field"))))
            heard.append(conn.recv(4096))

    peer = threading.Thread(target=other_build)
    peer.start()
    try:
        done = run_mta("queue", "hold", "--all", "-c", str(config), check=False)
    finally:
        peer.join(10)
        listener.close()
    assert done.returncode == 1, done
    error = done.stderr.decode()
    assert error.startswith("mta queue: the scheduler at ") and f"speaks message protocol {OTHER_VERSION}" in error
    assert f"this build {messages.PROTOCOL_VERSION}" in error and "Traceback" not in error
    assert b"applied to the spool" not in done.stdout
    (length,) = struct.unpack(">I", heard[0][:4])
    hello = messages.decode(heard[0][4:4 + length])  # the CLI said its own Hello first
    assert isinstance(hello, messages.Hello) and (hello.version, hello.role) == (messages.PROTOCOL_VERSION, "cli")
