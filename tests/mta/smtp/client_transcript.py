"""Golden SMTP/LMTP transcripts run through the sans-I/O client core, with no sockets.

File format (tests/mta/smtp/client_transcripts/*.txt):
    # comment
    ! lmtp=true                    option, before the first S:/C: (lmtp=true|false, tls=none|may|encrypt|verify)
    M: from=a@c.test to=b@x.test,c@x.test body=Hi\\r\\n
                                   a message to send, in order (keys: from, to, body, smtputf8=true,
                                   body_type, ret, envid, notify=SUCCESS+FAILURE, orcpt=rfc822;b@x.test)
    S: 250 2.1.0 Ok                a server reply line; consecutive S lines arrive in ONE read
    C: MAIL FROM:<a@c.test>        a line the client must send; consecutive C lines are
                                   everything it wrote since the last S lines, exactly
    R: b@x.test 250 2.0.0 Ok       the result of each recipient of the messages done, in order
    E: greeting 554 5.3.2 go away  the opening failed: stage, code, status, text (a SessionError)
    X: closed                      the server closes the connection here

The client is driven the way workers/delivery/session.py drives it: OutboundOpening,
then one OutboundTransaction per message; with PIPELINING the next message rides the
content; QUIT after the last message when the connection is still good. Escapes
\\r \\n \\t \\\\ and \\xHH are decoded in M values.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from mta.smtp.client import CLOSED, ClientConnection, ServerReply
from mta.smtp.transaction import (
    _CONTENT,
    _DONE,
    Outbound,
    OutboundOpening,
    OutboundRecipient,
    OutboundTransaction,
    RecipientResult,
    SessionError,
)
from tests.mta.smtp.transcript import unescape

REMOTE = "mx.test[192.0.2.1]:25"
Done = list[RecipientResult] | SessionError


class _Dropped(Exception):
    pass


def parse_message(text: str) -> Outbound:
    fields = dict(part.partition("=")[::2] for part in text.split())
    notify = tuple(fields["notify"].split("+")) if "notify" in fields else None
    return Outbound(msgid="m", sender=fields.get("from", ""), body=unescape(fields.get("body", "Hi\\r\\n")),
                    recipients=[OutboundRecipient(a, notify, fields.get("orcpt")) for a in fields["to"].split(",")],
                    smtputf8=fields.get("smtputf8") == "true", body_type=fields.get("body_type"),
                    ret=fields.get("ret"), envid=fields.get("envid"))


def _reply(conn: ClientConnection) -> Generator[None, None, ServerReply]:
    while True:
        event = conn.next_event()
        if isinstance(event, ServerReply):
            return event
        if event is CLOSED:
            raise _Dropped()
        yield


def _moved(txn: OutboundTransaction, command: bytes = b"") -> bytes:
    """The transaction's rule for `waiting` (set with each stage, not worked out from it)
    holds after every step: a reply is due in every stage but the content and done."""
    assert txn.waiting is (txn.doing is not _CONTENT and txn.doing is not _DONE), (txn.doing, txn.waiting)
    return command


def client(conn: ClientConnection, tls: str, messages: list[Outbound], out: list[bytes],
           done: list[Done]) -> Generator[None, None, None]:
    """session.py's loop, synchronous: yields when it needs more of the server's bytes."""
    opening = OutboundOpening(conn, tls, REMOTE)
    command = b""
    while not opening.done:
        out.append(command)
        command = opening.receive((yield from _reply(conn)))
        if opening.failure is not None:
            out.append(command)
            done.append(opening.failure)
            return
        if opening.handshake_due:
            command = opening.tls_established()
    ahead: OutboundTransaction | None = None
    for k, message in enumerate(messages):
        txn, ahead = ahead or OutboundTransaction(conn, message), None
        try:
            out.append(_moved(txn, txn.start()))
            while txn.waiting:
                out.append(_moved(txn, txn.receive((yield from _reply(conn)))))
            if txn.content_due:
                following = messages[k + 1] if k + 1 < len(messages) and txn.may_announce else None
                after = OutboundTransaction(conn, following) if following is not None else None
                out.extend(txn.content(after))
                _moved(txn)
                ahead = after if after is not None and after.announced else None
                while txn.waiting:
                    _moved(txn, txn.receive((yield from _reply(conn))))
        except _Dropped:
            txn.fail(451, "4.4.2", "lost connection")
            _moved(txn)
            done.append(txn.recipient_results())
            return
        done.append(txn.recipient_results())
        if txn.closing is not None or txn.rset_refused:
            return
    out.append(conn.quit())
    yield from _reply(conn)


def _result_line(r: RecipientResult) -> str:
    return " ".join(str(part) for part in (r.address, r.code, r.status, r.text) if part)


def run_client_transcript(path: Path) -> None:
    options = {"lmtp": "false", "tls": "none"}
    messages: list[Outbound] = []
    steps: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("! "):
            key, _, value = line[2:].partition("=")
            options[key.strip()] = value.strip()
        elif line.startswith("M: "):
            messages.append(parse_message(line[3:]))
        elif line[:2] in ("S:", "C:", "R:", "E:", "X:"):
            steps.append((line[:2], line[3:]))
        else:
            raise ValueError(f"{path.name}:{number}: unknown line {line!r}")
    conn = ClientConnection("relay.test", lmtp=options["lmtp"] == "true")
    out: list[bytes] = []
    done: list[Done] = []
    driver = client(conn, options["tls"], messages, out, done)
    next(driver, None)
    i = 0
    while i < len(steps):
        kind = steps[i][0]
        block = []
        while i < len(steps) and steps[i][0] == kind:
            block.append(steps[i][1])
            i += 1
        if kind in ("S:", "X:"):
            assert not b"".join(out), f"{path.name}: unchecked client output before {kind} {block}: {out}"
            if kind == "S:":
                conn.receive_data("".join(f"{line}\r\n" for line in block).encode("utf-8"))
            else:
                conn.receive_eof()
            next(driver, None)
        elif kind == "C:":
            got = b"".join(out).decode("utf-8").split("\r\n")[:-1]
            out.clear()
            assert got == block, f"{path.name}: client sent {got}, transcript expects {block}"
        elif kind == "R:":
            while block:  # message by message
                assert done and isinstance(done[0], list), f"{path.name}: no message done for {block}"
                results = [_result_line(r) for r in done.pop(0)]
                assert results == block[:len(results)], f"{path.name}: results {results}, transcript expects {block}"
                block = block[len(results):]
        else:
            assert done and isinstance(done[0], SessionError), f"{path.name}: the opening did not fail"
            error = done.pop(0)
            got = " ".join(str(part) for part in (error.stage, error.code, error.status, error.text) if part)
            assert [got] == block, f"{path.name}: opening failed with {got!r}, transcript expects {block}"
    assert not b"".join(out), f"{path.name}: unchecked client output at the end: {out}"
    assert not done, f"{path.name}: unchecked results at the end: {done}"
