"""`mta sieve check FILE`: parse a Sieve script as delivery would and report the first
error with its line number (exit 1), or "FILE: ok" (exit 0). Reads no configuration.
"""

from __future__ import annotations

import argparse
import sys

from mta.sieve.commands import parse
from mta.sieve.errors import SieveError


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sieve", help="Sieve filter scripts (reads no configuration)")
    ssub = p.add_subparsers(metavar="ACTION")
    c = ssub.add_parser("check", help="parse a Sieve script (e.g. <mailbox>/.dovecot.sieve) and report "
                                      "errors with line numbers (exit 1 on an error)")
    c.add_argument("file", metavar="FILE", help="the script")
    c.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    path = args.file
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        print(f"mta sieve check: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        print(f"{path}: line {line}: not UTF-8 (a Sieve script is UTF-8 text)", file=sys.stderr)
        return 1
    try:
        parse(text)
    except SieveError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0
