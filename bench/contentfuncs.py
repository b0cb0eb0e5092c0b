"""Micro-benchmark of the content library's three calls on a 10 KiB message.

    PYTHONPATH=.:queue python3 bench/contentfuncs.py [--size-bytes 10240] [--runs 5] [--json]

Each call runs on a stored-form message (CRLF, a Received field first) of about
`--size-bytes`: multipart/mixed holding multipart/alternative (quoted-printable text,
HTML) and a base64 PDF; for convert_tnef the PDF arrives packed in a winmail.dat.
forbidden_attachment with ["exe", "vbs", "js", "scr"] (no match: the whole message is
walked); add_footer with a text and an HTML footer; convert_tnef. The figure is the
median over `--runs` runs of µs per call (each run times a loop of ~0.2 s), on one core.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / "mta" / "content"),
                str(Path(__file__).resolve().parent.parent)]

from mta.content.attachments import forbidden_attachment  # noqa: E402
from mta.content.footer import add_footer  # noqa: E402
from mta.content.tnefconvert import convert_tnef  # noqa: E402
from tnefwriter import tnef_stream  # noqa: E402  (the tests' MS-OXTNEF writer)


def sample(size: int, tnef: bool) -> bytes:
    text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. =C3=A9\r\n" * 20)
    html = "<html><body>" + "<p>Lorem ipsum dolor sit amet, consectetur.</p>\r\n" * 20 + "</body></html>"
    head = (b"Received: from c.test (c.test [192.0.2.1])\r\n\tby mx.test with ESMTP id 0001\r\n"
            b"From: a@c.test\r\nTo: b@x.test\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n')
    alternative = ('--m\r\nContent-Type: multipart/alternative; boundary="a"\r\n\r\n'
                   "--a\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   f"{text}--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--a--\r\n").encode()
    filler = max(0, size - len(head) - len(alternative) - 400) * 3 // 4
    pdf = b"%PDF-1.4\n" + bytes(i % 251 for i in range(filler))
    if tnef:
        data = tnef_stream([("REPORT~1.PDF", "report.pdf", pdf)])
        attached = b'Content-Type: application/ms-tnef; name="winmail.dat"\r\n'
    else:
        data = pdf
        attached = b'Content-Type: application/pdf; name="report.pdf"\r\n'
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (head + alternative + b"--m\r\n" + attached + b"Content-Transfer-Encoding: base64\r\n\r\n"
            + body + b"--m--\r\n")


def per_call_us(call: Callable[[], object]) -> float:
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            call()
        took = time.perf_counter() - start
        if took > 0.2:
            return took / n * 1e6
        n *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-bytes", type=int, default=10240)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    plain, packed = sample(args.size_bytes, False), sample(args.size_bytes, True)
    blocked = frozenset({"exe", "vbs", "js", "scr"})
    assert add_footer(plain, "f", "<p>f</p>") and convert_tnef(packed) != packed
    calls = {
        "forbidden_attachment": lambda: forbidden_attachment(plain, blocked),
        "add_footer": lambda: add_footer(plain, "-- \nSent via example.net", "<p>Sent via example.net</p>"),
        "convert_tnef": lambda: convert_tnef(packed),
        "convert_tnef (no TNEF part)": lambda: convert_tnef(plain),
    }
    results = {}
    for name, call in calls.items():
        print(f"timing {name} ({args.runs} runs)", file=sys.stderr)
        results[name] = statistics.median(per_call_us(call) for _ in range(args.runs))
    if args.json:
        print(json.dumps({"size_bytes": [len(plain), len(packed)], "us_per_call": results}))
        return
    print(f"message: {len(plain)} bytes ({len(packed)} with the winmail.dat)")
    for name, us in results.items():
        print(f"{name:30} {us:9.1f} µs per call")


if __name__ == "__main__":
    main()
