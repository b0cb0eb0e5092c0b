"""A real SMTP/LMTP sink for delivery tests: a TCP server on its own thread and event loop.

    with SmtpSink("127.0.0.2", size_limit=1000) as sink:      # binds and serves at once
        ... deliver to sink.address:sink.port ...
        [message] = sink.wait_for_messages(1, timeout=5)
        assert message.recipients == ["a@x.test"] and message.data == b"..."

It advertises PIPELINING, SIZE, 8BITMIME, SMTPUTF8, DSN, ENHANCEDSTATUSCODES (each
can be switched off) and STARTTLS when given a certificate; `lmtp=True` speaks LMTP
(LHLO, one reply per accepted recipient after the final dot). It is strict the way
a client test wants: a MAIL/RCPT parameter that was not advertised gets 555.

Recipient behaviour comes from the local part, or from `rcpt_rule`/`data_rule`
(`mail_rule` likewise refuses senders):
`r450-x@d` is refused at RCPT with 450 4.2.0 (any `rNNN-`; table STATUS), `d552-x@d`
is accepted at RCPT and given 552 after the final dot (under SMTP the first such
recipient decides the one reply). Options: the greeting code (421 closes at once,
554 waits for QUIT) and a delay before it, a delay before the final reply, dropping the connection after
the content (no reply) or at the MAIL after N messages (`drop_mail_after`), a broken
STARTTLS (`starttls_fault`).

Records every message (envelope, parameters, content exactly as received after
unstuffing, the stuffed wire form, TLS or not), every command line, connections in
total, current and peak, and how often commands came pipelined (also right behind a
message's content). All server state lives on the sink's thread; the test
thread reads it (list appends and int updates are atomic under the GIL). What the
client sent last may not be processed yet when the client returns: wait with
`wait_for_messages` or `wait_until` before asserting on it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIB = 1024 * 1024
READ_BYTES = 65536
START_SECONDS = 5.0
STOP_SECONDS = 5.0

ReplyTuple = tuple[int, str, str]  # code, enhanced status, text

STATUS: dict[int, str] = {
    421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.5.3",
    550: "5.1.1", 551: "5.1.6", 552: "5.2.2", 553: "5.1.3", 554: "5.7.1",
}
_RULE = re.compile(r"^([rd])([245]\d\d)-")


def reply_for(code: int, text: str = "sink rule") -> ReplyTuple:
    return code, STATUS.get(code, f"{code // 100}.0.0"), text


def prefix_rule(kind: str, address: str) -> ReplyTuple | None:
    """`r550-x@d` -> the RCPT reply for kind "r"; `d451-x@d` -> the final reply for kind "d"."""
    match = _RULE.match(address)
    if match is None or match.group(1) != kind:
        return None
    return reply_for(int(match.group(2)))


@dataclass
class SinkMessage:
    connection: int  # 1-based connection number
    sender: str
    mail_params: dict[str, str | None]
    recipients: list[str]  # accepted at RCPT, in order
    rcpt_params: list[dict[str, str | None]]
    data: bytes  # unstuffed content, exactly as received
    wire: bytes  # the content as it came over the wire (stuffed, up to and including CRLF.CRLF)
    tls: bool
    replies: list[ReplyTuple] = field(default_factory=list)  # final reply per recipient (one under SMTP)
    dropped: bool = False  # the sink dropped the connection instead of replying
    received_at: float = field(default_factory=time.monotonic)  # when its content was complete


class SmtpSink:
    def __init__(self, address: str = "127.0.0.1", port: int = 0, *, hostname: str = "sink.test",
                 lmtp: bool = False, size_limit: int | None = 10 * MIB, pipelining: bool = True,
                 eightbitmime: bool = True, smtputf8: bool = True, dsn: bool = True,
                 enhanced_status: bool = True, ehlo: bool = True,
                 tls_cert: tuple[str, str] | None = None, starttls_fault: str | None = None,
                 greeting_code: int = 220, greeting_delay_seconds: float = 0.0,
                 delay_seconds: float = 0.0, drop_after_data: bool = False,
                 drop_mail_after: int | None = None,
                 mail_rule: Callable[[str], ReplyTuple | None] | None = None,
                 rcpt_rule: Callable[[str], ReplyTuple | None] | None = None,
                 data_rule: Callable[[str], ReplyTuple | None] | None = None) -> None:
        self.host = address
        self.port = port
        self.hostname = hostname
        self.lmtp = lmtp
        self.size_limit = size_limit
        self.pipelining = pipelining
        self.eightbitmime = eightbitmime
        self.smtputf8 = smtputf8
        self.dsn = dsn
        self.enhanced_status = enhanced_status
        self.ehlo = ehlo  # False: EHLO gets 502, HELO works
        self.greeting_code = greeting_code
        self.greeting_delay_seconds = greeting_delay_seconds  # a slow server: time before the greeting
        self.delay_seconds = delay_seconds
        self.drop_after_data = drop_after_data
        # A server that closed a connection the client kept for its next message: after
        # this many MAIL commands on one connection, the next MAIL finds it gone (no reply).
        self.drop_mail_after = drop_mail_after
        self.mail_rule = mail_rule or (lambda a: None)
        self.rcpt_rule = rcpt_rule or (lambda a: prefix_rule("r", a))
        self.data_rule = data_rule or (lambda a: prefix_rule("d", a))
        self.starttls_fault = starttls_fault  # "inject": more replies with the 220; "garbage": no TLS after it
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(*tls_cert)
        self.messages: list[SinkMessage] = []
        self.commands: list[tuple[int, str]] = []  # (connection, command line)
        self.connections = 0
        self.current_connections = 0
        self.peak_connections = 0
        self.tls_connections = 0  # connections that completed STARTTLS
        self.pipelined_commands = 0  # commands that arrived while an earlier one was unanswered
        self.commands_after_content = 0  # contents followed at once by the next command, unanswered
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # --- the test's side -----------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.host

    def start(self) -> SmtpSink:
        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            try:
                loop.run_until_complete(self._listen())
            except OSError as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"smtp-sink-{self.host}", daemon=True)
        self._thread.start()
        if not started.wait(START_SECONDS):
            raise TimeoutError("the sink did not start")
        if failure:
            self._thread.join()
            self._loop = None
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop listening, cut every connection, stop the thread. Idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(STOP_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(STOP_SECONDS)

    def __enter__(self) -> SmtpSink:
        return self.start() if self._loop is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_messages(self, n: int, timeout: float = 5.0) -> list[SinkMessage]:
        """Block until at least n messages arrived; return them all. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.messages)} of {n} messages after {timeout} s")
                self._cond.wait(left)
            return list(self.messages)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until predicate() holds (checked on every command and message). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink condition not met after {timeout} s")
                self._cond.wait(left)

    def verbs(self, connection: int | None = None) -> list[str]:
        """The command verbs received (upper case), optionally of one connection."""
        return [line.split(" ", 1)[0].upper() for c, line in self.commands
                if connection is None or c == connection]

    # --- the sink's thread ---------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0.01)  # let the aborted transports' connection_lost callbacks run

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        self.current_connections += 1
        self.peak_connections = max(self.peak_connections, self.current_connections)
        try:
            await _Session(self, number, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away: nothing to answer
        finally:
            self.current_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    def _record(self, message: SinkMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()


class _Dropped(Exception):
    pass


class _Session:
    def __init__(self, sink: SmtpSink, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.sink = sink
        self.number = number
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.tls = False
        self.greeted = False
        self.esmtp = False
        self.mails = 0  # MAIL commands on this connection
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.mail_params: dict[str, str | None] = {}
        self.recipients: list[str] = []
        self.rcpt_params: list[dict[str, str | None]] = []

    async def _fill(self) -> None:
        chunk = await self.reader.read(READ_BYTES)
        if not chunk:
            raise _Dropped()
        self.buf += chunk

    async def _line(self) -> str:
        while (end := self.buf.find(b"\n")) < 0:
            await self._fill()
        raw = bytes(self.buf[:end]).rstrip(b"\r")
        del self.buf[: end + 1]
        if self.buf:
            self.sink.pipelined_commands += 1
        return raw.decode("utf-8", "replace")

    def _send(self, code: int, status: str, *texts: str) -> None:
        prefix = f"{status} " if status and self.sink.enhanced_status else ""
        lines = [f"{code}-{prefix}{t}" for t in texts[:-1]] + [f"{code} {prefix}{texts[-1]}"]
        self.writer.write("".join(line + "\r\n" for line in lines).encode("utf-8"))

    async def run(self) -> None:
        try:
            await self._converse()
        except _Dropped:
            return

    async def _converse(self) -> None:
        sink = self.sink
        code = sink.greeting_code
        await asyncio.sleep(sink.greeting_delay_seconds)
        if code == 421:
            self._send(421, "4.3.2", f"{sink.hostname} Service not available, closing")
            await self.writer.drain()
            return
        if code != 220:
            self._send(code, "5.3.2" if code >= 500 else "4.3.2", f"{sink.hostname} No SMTP service here")
        else:
            self._send(220, "", f"{sink.hostname} {'LMTP' if sink.lmtp else 'ESMTP'} sink")
        while True:
            await self.writer.drain()
            line = await self._line()
            with sink._cond:
                sink.commands.append((self.number, line))
                sink._cond.notify_all()
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                self._send(221, "2.0.0", "Bye")
                await self.writer.drain()
                return
            if code != 220:
                self._send(503, "5.5.1", "Error: no service, send QUIT")
                continue
            handler = getattr(self, f"_do_{verb.lower()}", None) if verb.isalpha() else None
            if handler is None:
                self._send(500, "5.5.2", "Error: command not recognized")
                continue
            if await handler(arg) is False:
                return

    async def _do_ehlo(self, arg: str) -> None:
        sink = self.sink
        if sink.lmtp or not sink.ehlo:
            self._send(502 if not sink.lmtp else 500, "5.5.2", "Error: command not recognized")
            return
        self._hello(esmtp=True)

    async def _do_lhlo(self, arg: str) -> None:
        if not self.sink.lmtp:
            self._send(500, "5.5.2", "Error: command not recognized")
            return
        self._hello(esmtp=True)

    async def _do_helo(self, arg: str) -> None:
        if self.sink.lmtp:
            self._send(500, "5.5.2", "Error: command not recognized")
            return
        self._hello(esmtp=False)

    def _hello(self, esmtp: bool) -> None:
        sink = self.sink
        self._reset()
        self.greeted = True
        self.esmtp = esmtp
        if not esmtp:
            self.writer.write(f"250 {sink.hostname}\r\n".encode())
            return
        lines = [sink.hostname]
        lines += ["PIPELINING"] if sink.pipelining else []
        lines += [f"SIZE {sink.size_limit}"] if sink.size_limit is not None else []
        lines += ["8BITMIME"] if sink.eightbitmime else []
        lines += ["SMTPUTF8"] if sink.smtputf8 else []
        lines += ["DSN"] if sink.dsn else []
        lines += ["ENHANCEDSTATUSCODES"] if sink.enhanced_status else []
        lines += ["STARTTLS"] if sink._tls is not None and not self.tls else []
        self.writer.write("".join(f"250-{t}\r\n" for t in lines[:-1]).encode() + f"250 {lines[-1]}\r\n".encode())

    def _advertised(self, key: str) -> bool:
        sink = self.sink
        if not self.esmtp:
            return False
        return {"SIZE": sink.size_limit is not None, "BODY": sink.eightbitmime, "SMTPUTF8": sink.smtputf8,
                "RET": sink.dsn, "ENVID": sink.dsn, "NOTIFY": sink.dsn, "ORCPT": sink.dsn}.get(key, False)

    def _params(self, text: str) -> dict[str, str | None] | None:
        params: dict[str, str | None] = {}
        for word in text.split():
            key, eq, value = word.partition("=")
            if not self._advertised(key.upper()):
                self._send(555, "5.5.4", f"Error: unsupported parameter {key}")
                return None
            params[key.upper()] = value if eq else None
        return params

    async def _do_starttls(self, arg: str) -> bool | None:
        sink = self.sink
        if sink._tls is None or self.tls:
            self._send(502, "5.5.1", "Error: STARTTLS not available")
            return None
        if sink.starttls_fault == "inject":  # one write: the client reads both at once
            self.writer.write(b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 injected before the handshake\r\n")
            await self.writer.drain()
            return False
        self._send(220, "2.0.0", "Ready to start TLS")
        if sink.starttls_fault == "garbage":
            await self.writer.drain()
            await self.reader.read(READ_BYTES)  # the ClientHello: the client is in its handshake
            self.writer.write(b"this is not a TLS record\r\n" * 4)
            await self.writer.drain()
            return False
        self.buf.clear()  # anything sent before the handshake is discarded (no plaintext injection)
        await self.writer.start_tls(sink._tls)
        self.tls = True
        self.greeted = self.esmtp = False
        self._reset()
        sink.tls_connections += 1
        return None

    async def _do_mail(self, arg: str) -> None:
        if self.sink.drop_mail_after is not None and self.mails >= self.sink.drop_mail_after:
            raise _Dropped()
        self.mails += 1
        if not self.greeted:
            self._send(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self.sender is not None:
            self._send(503, "5.5.1", "Error: nested MAIL command")
            return
        if not arg[:5].upper() == "FROM:" or ">" not in arg:
            self._send(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        path, _, rest = arg[5:].strip().partition(">")
        params = self._params(rest)
        if params is None:
            return
        sender = path.lstrip("<")
        if not sender.isascii() and "SMTPUTF8" not in params:
            self._send(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
            return
        size = params.get("SIZE")
        if size is not None and self.sink.size_limit is not None and int(size) > self.sink.size_limit:
            self._send(552, "5.3.4", "Error: message size exceeds fixed limit")
            return
        rule = self.sink.mail_rule(sender)
        if rule is not None and rule[0] >= 400:
            self._send(*rule)
            return
        self.sender, self.mail_params = sender, params
        self._send(250, "2.1.0", "Ok")

    async def _do_rcpt(self, arg: str) -> None:
        if self.sender is None:
            self._send(503, "5.5.1", "Error: need MAIL command")
            return
        if not arg[:3].upper() == "TO:" or ">" not in arg:
            self._send(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        path, _, rest = arg[3:].strip().partition(">")
        params = self._params(rest)
        if params is None:
            return
        address = path.lstrip("<")
        if not address.isascii() and "SMTPUTF8" not in self.mail_params:
            self._send(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
            return
        rule = self.sink.rcpt_rule(address)
        if rule is not None and rule[0] >= 400:
            self._send(*rule)
            return
        self.recipients.append(address)
        self.rcpt_params.append(params)
        self._send(250, "2.1.5", "Ok")

    async def _do_rset(self, arg: str) -> None:
        self._reset()
        self._send(250, "2.0.0", "Ok")

    async def _do_noop(self, arg: str) -> None:
        self._send(250, "2.0.0", "Ok")

    async def _do_data(self, arg: str) -> bool | None:
        sink = self.sink
        if self.sender is None:
            self._send(503, "5.5.1", "Error: need MAIL command")
            return None
        if not self.recipients:
            self._send(554, "5.5.1", "Error: no valid recipients")
            return None
        self._send(354, "", "End data with <CR><LF>.<CR><LF>")
        await self.writer.drain()
        self.buf[:0] = b"\r\n"  # the CRLF that ended DATA starts the first line
        while (end := self.buf.find(b"\r\n.\r\n")) < 0:
            await self._fill()
        wire = bytes(self.buf[2: end + 5])
        content = bytes(self.buf[: end + 2])
        del self.buf[: end + 5]
        if self.buf:  # the client sent on before the reply to its final dot (RFC 2920 3.1)
            sink.commands_after_content += 1
        data = content.replace(b"\r\n.", b"\r\n")[2:]
        message = SinkMessage(self.number, self.sender, self.mail_params, self.recipients, self.rcpt_params,
                              data, wire, self.tls)
        self._reset()
        if sink.drop_after_data:
            message.dropped = True
            sink._record(message)
            self.writer.transport.abort()
            return False
        if sink.delay_seconds:
            await asyncio.sleep(sink.delay_seconds)
        ok = (250, "2.0.0", "Ok: queued")
        if sink.size_limit is not None and len(data) > sink.size_limit:
            finals = [(552, "5.3.4", "Error: message size exceeds fixed limit")] * len(message.recipients)
        else:
            finals = [sink.data_rule(r) or ok for r in message.recipients]
        if not sink.lmtp:
            finals = [next((f for f in finals if f[0] >= 400), ok)]
        message.replies = finals
        sink._record(message)
        for final in finals:
            self._send(*final)
        return None
