"""Sieve tokens (RFC 5228 section 8.1): identifiers, :tags, numbers with K/M/G, quoted and
"text:" multi-line strings, punctuation; # and /* */ comments are skipped.

Lines end with CRLF or LF (scripts written on Unix). A quoted string keeps what is between
its quotes with every backslash pair `\\x` turned into `x` (RFC 5228 2.4.2); a multi-line
string is its lines up to the lone "." with the first dot of a leading ".." removed
(dot-stuffing; ".foo" stays ".foo"), each line ending in CRLF. NUL is refused anywhere.
Pure: text in, tokens out; every fault is a SieveError with the line and column where
the token starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mta.sieve.errors import SieveError

PUNCTUATION: Final = frozenset(";,()[]{}")
QUANTIFIERS: Final = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_NUMBER: Final = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Token:
    kind: str          # "ident", "tag", "number", "string", "punct", "eof"
    value: str | int
    line: int
    column: int


def _ident_start(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z")


def _ident_char(c: str) -> bool:
    return _ident_start(c) or ("0" <= c <= "9")


class Lexer:
    """One pass over the script text; `tokens()` returns them all, ending with "eof"."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1
        self._line_start = 0

    def tokens(self) -> list[Token]:
        if (nul := self._text.find("\0")) >= 0:  # RFC 5228 2.1: never permitted
            line = self._text.count("\n", 0, nul) + 1
            raise SieveError(line, nul - (self._text.rfind("\n", 0, nul) + 1) + 1, "NUL character in the script")
        out: list[Token] = []
        while True:
            token = self._next()
            out.append(token)
            if token.kind == "eof":
                return out

    # -- positions ---------------------------------------------------------------------

    def _column(self, pos: int | None = None) -> int:
        return (self._pos if pos is None else pos) - self._line_start + 1

    def _error(self, message: str, line: int | None = None, column: int | None = None) -> SieveError:
        return SieveError(self._line if line is None else line, self._column() if column is None else column,
                          message)

    def _newline_at(self, pos: int) -> None:
        """The character at pos is a LF: the next line starts after it."""
        self._line += 1
        self._line_start = pos + 1

    # -- tokens ------------------------------------------------------------------------

    def _next(self) -> Token:
        self._skip_space_and_comments()
        text, pos = self._text, self._pos
        line, column = self._line, self._column()
        if pos >= len(text):
            return Token("eof", "", line, column)
        c = text[pos]
        if c in PUNCTUATION:
            self._pos += 1
            return Token("punct", c, line, column)
        if c == '"':
            return Token("string", self._quoted(), line, column)
        if c == ":":
            self._pos += 1
            if self._pos >= len(text) or not _ident_start(text[self._pos]):
                raise self._error("':' must start a tag such as :is", line, column)
            return Token("tag", self._identifier().lower(), line, column)
        if "0" <= c <= "9":
            return Token("number", self._number(), line, column)
        if _ident_start(c):
            name = self._identifier()
            if name.lower() == "text" and text.startswith(":", self._pos):
                self._pos += 1
                return Token("string", self._multiline(line, column), line, column)
            return Token("ident", name.lower(), line, column)
        raise self._error(f"unexpected character {c!r}")

    def _skip_space_and_comments(self) -> None:
        text = self._text
        while self._pos < len(text):
            c = text[self._pos]
            if c == "\n":
                self._newline_at(self._pos)
                self._pos += 1
            elif c in " \t\r":
                self._pos += 1
            elif c == "#":
                end = text.find("\n", self._pos)
                self._pos = len(text) if end < 0 else end
            elif text.startswith("/*", self._pos):
                line, column = self._line, self._column()
                end = text.find("*/", self._pos + 2)
                if end < 0:
                    raise self._error("unterminated /* comment", line, column)
                self._advance_to(end + 2)
            else:
                return

    def _advance_to(self, end: int) -> None:
        """Move to end, counting the lines passed."""
        text = self._text
        nl = text.find("\n", self._pos, end)
        while nl >= 0:
            self._newline_at(nl)
            nl = text.find("\n", nl + 1, end)
        self._pos = end

    def _identifier(self) -> str:
        start = self._pos
        text = self._text
        while self._pos < len(text) and _ident_char(text[self._pos]):
            self._pos += 1
        return text[start:self._pos]

    def _number(self) -> int:
        start = self._pos
        text = self._text
        while self._pos < len(text) and "0" <= text[self._pos] <= "9":
            self._pos += 1
        digits = text[start:self._pos].lstrip("0") or "0"
        if len(digits) > len(str(MAX_NUMBER)):  # before int(): Python refuses over 4300 digits
            raise self._error("number too large", column=self._column(start))
        value = int(digits)
        if self._pos < len(text) and text[self._pos].lower() in QUANTIFIERS:
            value *= QUANTIFIERS[text[self._pos].lower()]
            self._pos += 1
        if value > MAX_NUMBER:
            raise self._error("number too large", column=self._column(start))
        return value

    def _quoted(self) -> str:
        line, column = self._line, self._column()
        text = self._text
        self._pos += 1
        out: list[str] = []
        while self._pos < len(text):
            c = text[self._pos]
            if c == '"':
                self._pos += 1
                return "".join(out)
            if c == "\\":
                self._pos += 1
                if self._pos >= len(text):
                    break
                c = text[self._pos]
            if c == "\n":
                self._newline_at(self._pos)
            out.append(c)
            self._pos += 1
        raise self._error("unterminated string (a '\"' is missing)", line, column)

    def _multiline(self, line: int, column: int) -> str:
        """After "text:": blanks, an optional # comment, a line end, then the lines up to "."."""
        text = self._text
        while self._pos < len(text) and text[self._pos] in " \t":
            self._pos += 1
        if text.startswith("#", self._pos):
            end = text.find("\n", self._pos)
            self._pos = len(text) if end < 0 else end
        elif text.startswith("\r", self._pos):
            self._pos += 1
        if not text.startswith("\n", self._pos):
            raise self._error("\"text:\" must be followed by the end of the line")
        lines: list[str] = []
        while True:
            self._newline_at(self._pos)
            self._pos += 1
            end = text.find("\n", self._pos)
            if end < 0:  # the last line of the file, with no line end
                end = len(text)
                if text[self._pos:].removesuffix("\r") != ".":
                    raise self._error("multi-line string not ended by a line with a single '.'", line, column)
            content = text[self._pos:end].removesuffix("\r")
            self._pos = end
            if content == ".":
                if self._pos < len(text):
                    self._newline_at(self._pos)
                    self._pos += 1
                return "".join(lines)
            lines.append((content[1:] if content.startswith("..") else content) + "\r\n")
