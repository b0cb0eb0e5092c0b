"""Sieve errors: a script that breaks the language (SieveError, found by parse) and one that
fails while it runs (SieveRuntimeError, RFC 5228 2.10.6).

Both name the script line; the caller logs them and keeps the message in INBOX.
"""

from __future__ import annotations


class SieveError(Exception):
    """The script is not valid Sieve: a syntax error, an unknown command or test, a bad
    argument, or an extension used without `require` (or not supported)."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(line, column, message)
        self.line = line
        self.column = column
        self.message = message

    def __str__(self) -> str:
        return f"line {self.line}: {self.message} (column {self.column})"


class SieveRuntimeError(Exception):
    """The script was valid but its actions are not (RFC 5228 2.10.6): reject twice, reject
    with keep or vacation, two vacations, too many redirects."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(line, message)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"
