"""Test helpers: a message from header fields, and a script run against it."""

from __future__ import annotations

from mta.sieve import Action, Context, evaluate, parse


def message(*fields: str, body: str = "Hello.\r\n") -> bytes:
    """The stored form: fields "Name: value", CRLF line ends, a blank line, the body."""
    return ("".join(f"{f}\r\n" for f in fields) + "\r\n" + body).encode("utf-8")


def run(script: str, msg: bytes, envelope_from: str = "sender@example.org",
        envelope_to: str = "me@example.com") -> list[Action]:
    return evaluate(parse(script), Context(envelope_from, envelope_to, msg))
