"""The part walker's spans: where each part's header and body lie in the stored bytes."""

from mta.content.mime import MAX_DEPTH, encode_body, header_fields, parse_parts, splice, walk
from tests.mta.content.samples import TEXT_PART, message, mixed


def test_spans_of_a_nested_multipart_and_a_forwarded_message() -> None:
    forwarded = "Content-Type: message/rfc822\n\nSubject: inner\n\ninner text\n"
    content = mixed(TEXT_PART, forwarded)
    root = parse_parts(content)
    text, rfc822 = root.children
    assert content[text.start:text.end] == b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello.\r\n"
    assert content[text.body_start:text.end] == b"Hello.\r\n"
    (inner,) = rfc822.children
    assert content[inner.start:inner.header_end] == b"Subject: inner\r\n"
    assert content[inner.body_start:inner.end] == b"inner text\r\n"
    assert [p.content_type for p in walk(root)] == ["multipart/mixed", "text/plain", "message/rfc822", "text/plain"]


def test_a_delimiter_must_start_a_line_and_match_the_whole_boundary() -> None:
    body = "--b\nContent-Type: text/plain\n\nsee --b and\n--bx not a delimiter\n--b--\nepilogue\n"
    content = message('Content-Type: multipart/mixed; boundary="b"\n', body)
    (part,) = parse_parts(content).children
    assert content[part.body_start:part.end] == b"see --b and\r\n--bx not a delimiter"


def test_header_fields_keep_their_folding() -> None:
    content = message("Subject: a\n folded\nContent-Type: text/plain\n", "x\n")
    fields = header_fields(content, parse_parts(content))
    assert [n for n, _, _ in fields] == ["received", "subject", "content-type"]
    _, s, e = fields[1]
    assert content[s:e] == b"Subject: a\r\n folded\r\n"


def test_no_blank_line_means_all_header_and_deep_nesting_stops() -> None:
    assert parse_parts(b"Subject: x\r\n").body_start == len(b"Subject: x\r\n")
    nested = b"Subject: x\r\n\r\nbody\r\n"
    for _ in range(MAX_DEPTH + 5):
        nested = b"Content-Type: message/rfc822\r\n\r\n" + nested
    assert len(list(walk(parse_parts(nested)))) == MAX_DEPTH + 1


def test_splice_and_encoding() -> None:
    assert splice(b"abcdef", [(4, 5, b"E"), (0, 0, b">"), (1, 3, b"")]) == b">adEf"
    assert encode_body(b"x" * 100, "base64").split(b"\r\n")[0] == b"eHh4" * 19
    assert encode_body("a=ü\r\nb\r\n".encode(), "quoted-printable") == b"a=3D=C3=BC\r\nb\r\n"


def test_an_empty_part_and_blanks_after_a_delimiter() -> None:
    body = "--b \n--b\t\nContent-Type: text/plain\n\nlast\n--b-- \nepilogue\n"
    content = message('Content-Type: multipart/mixed; boundary="b"\n', body)
    empty, last = parse_parts(content).children
    assert empty.start == empty.end
    assert content[last.body_start:last.end] == b"last"
