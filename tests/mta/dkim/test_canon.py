"""Relaxed canonicalisation and the signed data against the RFCs' own examples: RFC 6376
3.4.5, and RFC 8463 A.3, whose Ed25519 signature is deterministic, so the bytes we hash
are proved by reproducing its b= exactly; and against dkimpy's canonicalisation on
generated input."""

import base64
import hashlib
import re

from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.dkim.canon import relaxed_body, relaxed_header
from mta.dkim.fields import select, split_message
from mta.dkim.keys import DkimKey

# RFC 8463 A.2 (the key) and A.3 (the signed message), CRLF line ends.
RFC8463_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_B = "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
RFC8463_MESSAGE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"
)


def test_rfc6376_example_headers() -> None:
    # RFC 6376 3.4.5: "A: X" and "B : Y<HTAB><CRLF><HTAB>Z  " -> "a:X", "b:Y Z"
    assert relaxed_header(b"A", b" X\r\n") == b"a:X\r\n"
    assert relaxed_header(b"B ", b" Y\t\r\n\tZ  \r\n") == b"b:Y Z\r\n"


def test_rfc6376_example_body() -> None:
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"


def test_body_ends() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n  \r\n") == b""       # only blank lines: the empty body
    assert relaxed_body(b"last line") == b"last line\r\n"
    assert relaxed_body(b"a\r\n\r\nb\r\n\r\n") == b"a\r\n\r\nb\r\n"  # inner blank lines stay
    assert relaxed_body(b"caf\xc3\xa9 \xff\r\n") == b"caf\xc3\xa9 \xff\r\n"  # 8-bit bytes as they are


def test_rfc8463_body_hash() -> None:
    _, body = split_message(RFC8463_MESSAGE)
    assert base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()) == b"2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    assert relaxed_body(body + b"\r\n\r\n") == relaxed_body(body.replace(b"  ", b" \t "))


def test_rfc8463_signature_reproduced() -> None:
    """The data our modules hash for RFC 8463's own header, signed with its key, is its b=."""
    fields, _ = split_message(RFC8463_MESSAGE)
    signature, message_fields = fields[0], fields[1:]
    h, signed = select(message_fields, ("From", "To", "Subject", "Date", "Message-ID"))
    assert h == ["from", "from", "to", "subject", "date", "message-id"]
    data = b"".join(relaxed_header(f.name, f.value) for f in signed)
    emptied = re.sub(rb"b=[^;]*$", b"b=", signature.value.removesuffix(b"\r\n"))
    data += relaxed_header(signature.name, emptied).removesuffix(b"\r\n")
    key = DkimKey.from_pem("football.example.com", "brisbane", _ed25519_pem(RFC8463_SEED))
    assert key.public_p() == RFC8463_PUBLIC
    assert base64.b64encode(key.sign(data)).decode() == RFC8463_B


def _ed25519_pem(seed: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed))
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


_BYTES = st.lists(st.sampled_from([b" ", b"\t", b"\r\n", b"\r", b"\n", b"a", b"\xc3\xa9", b"\r\n\r\n", b"  \t "]),
                  max_size=40).map(b"".join)
_FIELD_VALUE = st.lists(st.sampled_from([b" ", b"\t", b"a", b"\xc3\xa9", b"\r\n ", b"\r\n\t", b"  \t "]),
                        max_size=30).map(lambda parts: b"".join(parts) + b"\r\n")  # folds: CRLF then WSP


@settings(max_examples=400, deadline=None)
@given(_BYTES)
def test_body_as_dkimpy_canonicalises_it(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([b"Subject", b"SUBJECT ", b"X-A\t"]), _FIELD_VALUE)
def test_header_as_dkimpy_canonicalises_it(name: bytes, value: bytes) -> None:
    [(theirs_name, theirs_value)] = Relaxed.canonicalize_headers([(name, value)])
    assert relaxed_header(name, value) == theirs_name + b":" + theirs_value
