"""The clamd client (mta/content/clamd.py) against a real clamd, and against peers that misbehave.

The clamd is Debian's, run by the session fixture with a database made by the test
(EICAR and a custom signature): nothing is downloaded. Every scan goes over both of its
sockets and under both event loops the server may run (asyncio's and uvloop's).
"""

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from mta.content.clamd import CHUNK_BYTES, ClamdAddress, ClamdFailed, ScanResult, parse_reply, scan
from tests.integration.conftest import free_port
from tests.mta.content.clamdpeer import CUSTOM_MARKER, EICAR, Clamd, running_clamd

pytestmark = pytest.mark.integration

STREAM_MAX_LENGTH_BYTES = 1 << 20
LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}
# clamd names a signature from a database outside its signed .cvd files with this suffix.
EICAR_FOUND = "Eicar-Signature.UNOFFICIAL"
CUSTOM_FOUND = "Mta.Test.Custom.UNOFFICIAL"


def message(body: bytes, attachment: bytes | None = None) -> bytes:
    head = (b"Received: from client.test ([192.0.2.7]) by mx.test with ESMTP id 0123456789ABCDEF\r\n"
            b"From: Sender <s@client.test>\r\nTo: r@example.test\r\nSubject: the report\r\n"
            b"Message-ID: <1@client.test>\r\nMIME-Version: 1.0\r\n")
    if attachment is None:
        return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (head + b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body +
            b"\r\n--b1\r\nContent-Type: application/octet-stream; name=\"report.com\"\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"report.com\"\r\n\r\n"
            + encoded + b"--b1--\r\n")


CLEAN = message(b"Quarterly figures attached.\r\n" * 300, attachment=b"%PDF-1.4\n" + bytes(range(256)) * 8)


def run(call: Callable[[], Awaitable[ScanResult]], loop: str = "asyncio") -> ScanResult:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(call())


def scan_with(address: str, content: bytes, timeout: float = 10.0, loop: str = "asyncio") -> ScanResult:
    return run(lambda: scan(ClamdAddress.parse(address), content, timeout), loop)


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One private clamd for the session (it takes a while to load): StreamMaxLength 1 MiB."""
    with running_clamd(tmp_path_factory.mktemp("clamd"), STREAM_MAX_LENGTH_BYTES) as running:
        yield running


@pytest.fixture(params=["tcp", "unix"])
def address(request, clamd) -> str:
    return clamd.tcp if request.param == "tcp" else clamd.unix


# --- addresses and replies ---------------------------------------------------------------

@pytest.mark.parametrize("text,host,port,path", [
    ("tcp:127.0.0.1:3310", "127.0.0.1", 3310, ""),
    ("tcp:clamd.internal:3310", "clamd.internal", 3310, ""),
    ("tcp:[::1]:3310", "::1", 3310, ""),
    ("unix:/run/clamav/clamd.ctl", "", 0, "/run/clamav/clamd.ctl"),
])
def test_addresses(text, host, port, path):
    address = ClamdAddress.parse(text)
    assert (address.host, address.port, address.path) == (host, port, path)
    assert str(address) == text


@pytest.mark.parametrize("text", ["", "127.0.0.1:3310", "inet:127.0.0.1:3310", "tcp:127.0.0.1",
                                  "tcp::3310", "tcp:host:0", "tcp:host:65536", "tcp:host:x",
                                  "unix:relative.sock", "unix:"])
def test_bad_addresses_say_what_to_write(text):
    usage = r"use tcp:host:port or unix:/path \(tcp:\[::1\]:port for IPv6\)"
    with pytest.raises(ValueError, match=rf"^clamd address .*: {usage}$"):
        ClamdAddress.parse(text)


def test_replies():
    assert parse_reply(b"stream: OK") == ScanResult(None)
    assert parse_reply(b"stream: Eicar-Signature FOUND") == ScanResult("Eicar-Signature")
    # ExtendedDetectionInfo yes (Debian's default clamd.conf) adds the file's hash and size.
    assert parse_reply(b"stream: Win.Test.EICAR_HDB-1(44d88612fea8a8f36de82e1278abb02f:68) FOUND") == \
        ScanResult("Win.Test.EICAR_HDB-1")
    with pytest.raises(ClamdFailed, match="larger than clamd's StreamMaxLength"):
        parse_reply(b"INSTREAM size limit exceeded. ERROR")
    with pytest.raises(ClamdFailed, match="could not scan: stream: Can't allocate memory ERROR"):
        parse_reply(b"stream: Can't allocate memory ERROR")
    for garbage in (b"", b"PONG", b"stream: FOUND", b"stream: two words FOUND", b"UNKNOWN COMMAND"):
        with pytest.raises(ClamdFailed, match="not a scan result"):
            parse_reply(garbage)


# --- the real clamd ----------------------------------------------------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_a_clean_message_passes(address, loop):
    assert scan_with(address, CLEAN, loop=loop) == ScanResult(None)


@pytest.mark.parametrize("loop", LOOPS)
def test_eicar_in_a_base64_attachment_is_found(address, loop):
    infected = message(b"Please run the attached file.\r\n", attachment=EICAR)
    assert EICAR not in infected  # clamd finds it only by decoding the MIME part (ScanMail)
    assert scan_with(address, infected, loop=loop) == ScanResult(EICAR_FOUND)


def test_the_custom_signature_is_found_and_named(address):
    assert scan_with(address, message(b"Hello, " + CUSTOM_MARKER + b" here.\r\n")) == ScanResult(CUSTOM_FOUND)


def test_a_signature_across_a_chunk_boundary_is_found(address):
    # The marker straddles the first two INSTREAM chunks: clamd sees one stream, not chunks.
    head = message(b"")
    pad = b"x" * (CHUNK_BYTES - len(head) - len(CUSTOM_MARKER) // 2 - 2) + b"\r\n"
    content = head + pad + CUSTOM_MARKER + b"\r\n" + b"y" * 200_000 + b"\r\n"
    start = content.index(CUSTOM_MARKER)
    assert start < CHUNK_BYTES < start + len(CUSTOM_MARKER)
    assert scan_with(address, content) == ScanResult(CUSTOM_FOUND)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_message_over_streammaxlength_fails_and_clamd_serves_the_next(address, loop):
    exactly = message(b"").ljust(STREAM_MAX_LENGTH_BYTES, b"z")
    assert scan_with(address, exactly, loop=loop) == ScanResult(None)
    for over in (exactly + b"z", exactly * 3):  # the second is refused while it is still being sent
        with pytest.raises(ClamdFailed, match="larger than clamd's StreamMaxLength"):
            scan_with(address, over, loop=loop)
    assert scan_with(address, CLEAN, loop=loop) == ScanResult(None)


def test_concurrent_scans_each_get_their_own_verdict(clamd):
    async def both():
        return await asyncio.gather(*(
            scan(ClamdAddress.parse(where), content, 10)
            for where in (clamd.tcp, clamd.unix)
            for content in (CLEAN, message(b"", attachment=EICAR), message(CUSTOM_MARKER))))
    assert run(both, "uvloop") == [ScanResult(None), ScanResult(EICAR_FOUND), ScanResult(CUSTOM_FOUND)] * 2


def test_a_stopped_clamd_fails_fast(tmp_path):
    with running_clamd(tmp_path) as clamd:
        assert scan_with(clamd.tcp, CLEAN) == ScanResult(None)
    for where in (clamd.tcp, clamd.unix):
        started = time.monotonic()
        with pytest.raises(ClamdFailed, match=r"cannot be reached: (Connection refused|No such file or directory)$"):
            scan_with(where, CLEAN, timeout=30)
        assert time.monotonic() - started < 2


# --- peers that are not a working clamd --------------------------------------------------

def serve_then_scan(handler, content: bytes, timeout: float, loop: str = "asyncio",
                    host: str = "127.0.0.1") -> ScanResult:
    """Scan against an asyncio server on a loopback port that runs `handler` per connection.

    `handler(reader, writer, over)`: `over` is set once the scan returned. Each connection
    is closed by the server once its handler ends, and the scan's result waits for that:
    nothing of the peer outlives the test's event loop.
    """
    peers: list[asyncio.Task] = []
    over = asyncio.Event()

    async def peer(reader, writer):
        peers.append(asyncio.current_task())
        try:
            await handler(reader, writer, over)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def scenario():
        server = await asyncio.start_server(peer, host, 0)
        address = ClamdAddress(host=host, port=server.sockets[0].getsockname()[1])
        async with server:
            try:
                return await scan(ClamdAddress.parse(str(address)), content, timeout)
            finally:
                over.set()
                await asyncio.wait(peers, timeout=5)
    return run(scenario, loop)


async def never_answers(reader, writer, over):
    while await reader.read(65536):
        pass  # reads the whole stream, answers nothing, never hangs up: until the client does


@pytest.mark.parametrize("loop", LOOPS)
def test_a_clamd_that_never_answers_fails_at_the_deadline(loop):
    started = time.monotonic()
    with pytest.raises(ClamdFailed, match=r"gave no answer within 0.5s"):
        serve_then_scan(never_answers, CLEAN, 0.5, loop)
    assert 0.5 <= time.monotonic() - started < 2.5


@pytest.mark.parametrize("loop", LOOPS)
def test_the_deadline_covers_a_send_that_cannot_finish(loop):
    # Accepted in the kernel's backlog, never read: the send fills both socket buffers and stalls.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(ClamdFailed, match=r"gave no answer within 0.5s"):
            scan_with(f"tcp:127.0.0.1:{listener.getsockname()[1]}", b"x" * (32 << 20), 0.5, loop)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("loop", LOOPS)
def test_an_answer_before_the_end_of_the_stream_counts(loop):
    # The peer refuses at once and then neither reads nor hangs up: the send
    # stalls with 32 MiB to go, and the answer ends the scan anyway, long before the deadline.
    async def refuses_early(reader, writer, over):
        writer.transport.pause_reading()  # what arrives stays in the socket buffers, which fill
        writer.write(b"INSTREAM size limit exceeded. ERROR\0")
        await writer.drain()
        await over.wait()
    started = time.monotonic()
    with pytest.raises(ClamdFailed, match="larger than clamd's StreamMaxLength"):
        serve_then_scan(refuses_early, b"x" * (32 << 20), 10, loop)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("answer,why", [
    (b"", "closed the connection without an answer"),
    (b"stream: OK", "closed the connection without an answer"),  # no NUL: not a whole answer
    (b"HELLO\0", "not a scan result"),
    (b"x" * 5000, "has no end within 4096 bytes"),
], ids=["nothing", "no-nul", "not-a-result", "endless"])
def test_a_peer_that_answers_wrong(answer, why):
    async def peer(reader, writer, over):
        await reader.readuntil(b"\0\0\0\0")
        writer.write(answer)
        await writer.drain()
    with pytest.raises(ClamdFailed, match=why):
        serve_then_scan(peer, b"short", 5)


def test_an_ipv6_clamd():
    async def says_found(reader, writer, over):
        await reader.readuntil(b"\0\0\0\0")
        writer.write(b"stream: Eicar-Signature FOUND\0")
        await writer.drain()
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"this host has no IPv6 loopback (::1): {exc}")
    assert serve_then_scan(says_found, b"content", 5, "uvloop", host="::1") == ScanResult("Eicar-Signature")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_socket_is_closed_on_every_path(clamd):
    scan_with(clamd.unix, CLEAN)  # the loop's and the runner's own descriptors, once
    before = open_fds()
    for _ in range(3):
        scan_with(clamd.tcp, CLEAN)
        scan_with(clamd.unix, message(b"", attachment=EICAR))
        with pytest.raises(ClamdFailed):
            scan_with(clamd.tcp, message(b"z" * (2 * STREAM_MAX_LENGTH_BYTES)))
        with pytest.raises(ClamdFailed):
            scan_with(f"tcp:127.0.0.1:{free_port()}", CLEAN)
        with pytest.raises(ClamdFailed):
            serve_then_scan(never_answers, CLEAN, 0.2, "uvloop")
    assert open_fds() == before
