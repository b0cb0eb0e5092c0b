"""Sieve comparators (RFC 4790: i;octet, i;ascii-casemap) and match types (RFC 5228 2.7.1:
:is, :contains, :matches).

In :matches, `*` is any run of characters, `?` exactly one, and a backslash makes the next
character literal (a script writes "\\\\*" for a literal star: the lexer has already turned
it into `\\*`). A character is a Unicode code point. Pure.
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
    return _glob(value, _pattern(key))


_ONE = object()   # ?
_ANY = object()   # *


@lru_cache(maxsize=256)
def _pattern(key: str) -> tuple[object, ...]:
    """The key as literal characters and the two wildcards."""
    out: list[object] = []
    i = 0
    while i < len(key):
        c = key[i]
        if c == "\\" and i + 1 < len(key):
            i += 1
            out.append(key[i])
        elif c == "*":
            out.append(_ANY)
        elif c == "?":
            out.append(_ONE)
        else:
            out.append(c)
        i += 1
    return tuple(out)


def _glob(value: str, pattern: tuple[object, ...]) -> bool:
    """Wildcard match that backtracks only to the last *: O(len(value) * len(pattern))."""
    v = p = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and (pattern[p] is _ONE or pattern[p] == value[v]):
            v += 1
            p += 1
        elif p < len(pattern) and pattern[p] is _ANY:
            star, mark = p, v
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            v = mark
        else:
            return False
    while p < len(pattern) and pattern[p] is _ANY:
        p += 1
    return p == len(pattern)


def any_matches(values: list[str], keys: tuple[str, ...], match: str, comparator: str) -> bool:
    return any(matches(v, k, match, comparator) for v in values for k in keys)
