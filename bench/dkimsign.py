#!/usr/bin/env python3
"""The cost of DKIM signing one message: mta's sign() (OpenSSL through `cryptography`)
per algorithm, split into the body hash and the signature, and dkimpy's dkim.sign on the
same message for comparison. CPU time of this process, one core; nothing is asserted.

    PYTHONPATH=.:queue python3 bench/dkimsign.py [--size-kib 10] [--seconds 2] [--json]

Each case runs for --seconds (after a short warm-up) and reports µs per message as the
median of 5 rounds. Progress goes to stderr; the table (or JSON) to stdout.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "queue")]

from mta.dkim.canon import relaxed_body  # noqa: E402
from mta.dkim.fields import split_message  # noqa: E402
from mta.dkim.keys import DkimKey  # noqa: E402
from mta.dkim.signer import sign  # noqa: E402

ROUNDS = 5


def message(size: int) -> bytes:
    """A plain message of about `size` bytes: the usual headers, 72-column text lines."""
    head = (b"From: Joe <joe@example.test>\r\nTo: Suzie <suzie@shopping.test>\r\nSubject: the weekly report\r\n"
            b"Date: Mon, 7 Dec 2026 04:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog;  sphinx of black quartz   \r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def per_call_us(call: Callable[[], object], seconds: float) -> float:
    """Median over ROUNDS of CPU µs per call, each round about seconds / ROUNDS long."""
    call()
    results = []
    for _ in range(ROUNDS):
        n = 0
        start = time.process_time()
        deadline = time.perf_counter() + seconds / ROUNDS
        while time.perf_counter() < deadline:
            call()
            n += 1
        results.append((time.process_time() - start) / n * 1e6)
    return statistics.median(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-kib", type=float, default=10.0, help="message size (default 10 KiB)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per case (default 2)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    content = message(int(args.size_kib * 1024))
    _, body = split_message(content)
    rows: list[tuple[str, float]] = []
    for alg in ("rsa", "ed25519"):
        pem = DkimKey.generate(alg)
        key = DkimKey.from_pem("example.test", "bench", pem)
        cases: list[tuple[str, Callable[[], object]]] = [
            (f"mta sign() {key.algorithm}", lambda: sign(content, key, now=1_765_000_000)),
            ("  of which: body canonicalised + hashed",
             lambda: base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())),
            ("  of which: the signature (OpenSSL)", lambda: key.sign(content[:600])),
        ]
        try:
            import dkim
            theirs = pem if alg == "rsa" else base64.b64encode(key.private.private_bytes_raw())  # type: ignore[union-attr]
            cases.append((f"dkimpy dkim.sign {key.algorithm}",
                          lambda: dkim.sign(content, b"bench", b"example.test", theirs,
                                            signature_algorithm=key.algorithm.encode(),
                                            canonicalize=(b"relaxed", b"relaxed"))))
        except ImportError:
            print("dkimpy is not installed: its line is left out", file=sys.stderr)
        for name, call in cases:
            print(f"dkimsign: {name.strip()} ...", file=sys.stderr)
            rows.append((name, per_call_us(call, args.seconds)))
    if args.json:
        json.dump({"message_bytes": len(content), "us_per_message": dict(rows)}, sys.stdout, indent=1)
        print()
        return 0
    print(f"DKIM signing, one {len(content)}-byte message, CPU µs per message (median of {ROUNDS} rounds)")
    for name, us in rows:
        print(f"  {name:<42} {us:>9.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
