"""Sieve comparators (RFC 4790: i;octet, i;ascii-casemap) and match types (RFC 5228 2.7.1:
:is, :contains, :matches).

In :matches, `*` is any run of characters, `?` exactly one, and a backslash makes the next
character literal (a script writes "\\\\*" for a literal star: the lexer has already turned
it into `\\*`). Both comparators define a character as one octet (RFC 5228 2.7.1), so
:matches runs over the UTF-8 octets: `?` is one octet, "é" is `??`. Pure.
"""

from __future__ import annotations

from functools import lru_cache


def fold(text: str, comparator: str) -> str:
    """The form the comparator compares: i;ascii-casemap folds ASCII letters only."""
    if comparator == "i;octet":
        return text
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def matches(value: str, key: str, match: str, comparator: str) -> bool:
    """Whether value matches key under the match type and comparator."""
    value, key = fold(value, comparator), fold(key, comparator)
    if match == "is":
        return value == key
    if match == "contains":
        return key in value
    return _glob(value.encode("utf-8", "surrogatepass"), _pattern(key))


_ONE = -1   # ?
_ANY = -2   # *


@lru_cache(maxsize=256)
def _pattern(key: str) -> tuple[int, ...]:
    """The key as octets and the two wildcards (both comparators' character is an octet)."""
    out: list[int] = []
    raw = key.encode("utf-8", "surrogatepass")
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x5C and i + 1 < len(raw):  # backslash: the next octet is literal
            i += 1
            out.append(raw[i])
        elif c == 0x2A:
            out.append(_ANY)
        elif c == 0x3F:
            out.append(_ONE)
        else:
            out.append(c)
        i += 1
    return tuple(out)


def _glob(value: bytes, pattern: tuple[int, ...]) -> bool:
    """Wildcard match that backtracks only to the last *: O(len(value) * len(pattern))."""
    v = p = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and (pattern[p] == _ONE or pattern[p] == value[v]):
            v += 1
            p += 1
        elif p < len(pattern) and pattern[p] == _ANY:
            star, mark = p, v
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            v = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == _ANY:
        p += 1
    return p == len(pattern)


def any_matches(values: list[str], keys: tuple[str, ...], match: str, comparator: str) -> bool:
    return any(matches(v, k, match, comparator) for v in values for k in keys)
