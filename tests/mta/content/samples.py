"""Messages as the spool stores them (CRLF, our Received field first), built for the tests."""

RECEIVED = (b"Received: from c.test (c.test [192.0.2.1])\r\n"
            b"\tby mx.test with ESMTP id 0001; Mon, 7 Dec 2026 04:00:00 +0000\r\n")


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def message(header: str, body: str) -> bytes:
    """Our Received field, then `header` and `body` (LF in the source, CRLF in the result)."""
    return RECEIVED + crlf(header) + b"\r\n" + crlf(body)


def mixed(*parts: str, boundary: str = "b1") -> bytes:
    """multipart/mixed with the given body parts (each its header, a blank line, its body)."""
    body = "This is a MIME message.\n" + "".join(f"--{boundary}\n{p}\n" for p in parts) + f"--{boundary}--\n"
    return message(f'From: a@c.test\nTo: b@x.test\nSubject: s\nMIME-Version: 1.0\n'
                   f'Content-Type: multipart/mixed; boundary="{boundary}"\n', body)


TEXT_PART = "Content-Type: text/plain; charset=us-ascii\n\nHello.\n"


def attachment(disposition_params: str, content_type: str = "application/octet-stream") -> str:
    return (f"Content-Type: {content_type}\nContent-Disposition: attachment;{disposition_params}\n"
            "Content-Transfer-Encoding: base64\n\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
