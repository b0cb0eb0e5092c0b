"""Property tests: no input makes the core raise, and every command line gets a reply."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.smtp.server import ServerConnection, ServerOptions
from tests.mta.smtp.transcript import App

VERBS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "RSET", "NOOP", "HELP", "VRFY", "EXPN",
         "QUIT", "DATA", "BDAT", "XYZZY", "mail from:", "rcpt to:", "STARTTLS", "AUTH", "*", ""]
ARGS = st.one_of(
    st.just(""),
    st.sampled_from(["<a@local.test>", "<>", "<@x,@y:a@b.test>", "<\"q q\"@local.test>", "<a@[1.2.3.4]>",
                     "<ü@local.test> SMTPUTF8", "<a@b> SIZE=99999999999", "<a@b> NOTIFY=NEVER",
                     "<a@b> ORCPT=rfc822;x+41", " c.test", "10", "0 LAST", "<a@b> RET=FULL ENVID=x",
                     "PLAIN", "LOGIN", "PLAIN AGFsaWNlAHNlY3JldA==", "LOGIN YWxpY2U=", "c2VjcmV0", "="]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40),
)


def _new() -> App:
    conn = ServerConnection(ServerOptions(hostname="mx.test", max_errors=1000, max_message_bytes=4096,
                                          max_junk_commands=1000, starttls=True, auth_mechanisms=("PLAIN", "LOGIN"),
                                          auth_plaintext=True))
    conn.greet()
    conn.data_to_send()
    return App(conn)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=1, max_value=400), max_size=20))
def test_random_bytes_in_random_splits_never_raise(data: bytes, cuts: list[int]) -> None:
    app = _new()
    pos = 0
    for cut in cuts + [len(data)]:
        app.feed(data[pos:pos + cut])
        pos += cut
        if app.closed:
            break
    app.conn.receive_eof()
    app.pump()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(VERBS), ARGS), min_size=1, max_size=30))
def test_every_command_line_gets_exactly_one_reply(commands: list[tuple[str, str]]) -> None:
    """Lines that do not enter DATA or BDAT each get one final reply, in order."""
    app = _new()
    in_sasl = False
    for verb, arg in commands:
        if verb in ("DATA", "BDAT"):
            continue  # these switch to content framing: covered by transcripts
        line = (verb + (" " if arg and not verb.endswith(":") else "") + arg).encode("utf-8", "replace")
        out = app.feed(line.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n")
        finals = [ln for ln in out.split(b"\r\n")[:-1] if ln[3:4] == b" "]
        if verb == "QUIT" and not arg and not in_sasl:
            assert finals and finals[0].startswith(b"221")
            return
        in_sasl = out.startswith(b"334 ")  # the next line is a SASL response, whatever it says
        assert len(finals) == 1, (line, out)
        assert finals[0][:1] in b"2345"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=1, max_value=300), max_size=10))
def test_data_content_survives_any_split(body: bytes, cuts: list[int]) -> None:
    """Properly stuffed content, split anywhere, is delivered byte-exact (or rejected for bare CR/LF)."""
    app = _new()
    app.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@local.test>\r\n")
    app.feed(b"DATA\r\n")
    content = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    stuffed = (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
    pos, out = 0, b""
    for cut in cuts + [len(stuffed)]:
        out += app.feed(stuffed[pos:pos + cut])
        pos += cut
    clean = content.count(b"\n") == content.count(b"\r\n") == content.count(b"\r")
    if len(content) > 4096:
        assert out.startswith(b"552 5.3.4")
    elif clean:
        assert out.startswith(b"250 2.0.0") and app.messages[-1].data == content
    else:
        assert out.startswith(b"550 5.5.2")


LINES = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a", b"...\r", b"\r", b"x\n.y", b"."]),
                 max_size=12)


@settings(max_examples=400, deadline=None)
@given(LINES, st.lists(st.integers(min_value=1, max_value=9), max_size=40))
def test_content_in_any_split_arrives_unstuffed_and_canonical(lines: list[bytes], cuts: list[int]) -> None:
    """Whatever the lines (dots anywhere, bare CR or LF) and however the stuffed content is cut
    into reads, the server ends DATA at CRLF.CRLF and hands over the content the client meant."""
    from mta.smtp.client import canonical_body, stuff_body

    content = b"".join(line + b"\r\n" for line in lines)
    app = _new()
    app.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n")
    wire = stuff_body(content) + b"NOOP\r\n"
    pos, out = 0, b""
    for cut in cuts + [len(wire)]:
        out += app.feed(wire[pos:pos + cut])
        pos += cut
    assert [m.data for m in app.messages] == [canonical_body(content) if content else b""], out
    assert out.endswith(b"250 2.0.0 Ok\r\n")  # the NOOP after the content is a command again


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([b".", b"..", b".x", b"a", b"\r", b"x\n."]), min_size=50, max_size=200),
       st.lists(st.integers(min_value=1, max_value=300), max_size=40))
def test_many_dot_lines_unstuff_the_same(lines: list[bytes], cuts: list[int]) -> None:
    """Past the dot lines tracked one by one (MAX_TRACKED_DOTS), the rest is unstuffed in one
    pass: the content is the same either way."""
    test_content_in_any_split_arrives_unstuffed_and_canonical.hypothesis.inner_test(lines, cuts)  # type: ignore[attr-defined]

