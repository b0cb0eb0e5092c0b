"""The aliases file: local addresses that forward to other addresses.

One alias per line; `#` starts a comment line; blank lines are ignored:

    # the team
    info@example.com: alice@example.com, bob@example.net
    postmaster: admin

A bare name (`postmaster`) applies to every local domain; a bare target takes the
domain of the address being expanded. Keys are case-insensitive and defined once.
Targets may be aliases themselves: `expand` follows them depth first and returns the
final addresses, each once (case-insensitively), in order. A target naming the alias
itself is its own mailbox (`alice: alice, archive`); any other cycle, or more than
MAX_DEPTH levels, is an AliasError. Pipes, files and :include: are refused at load.

Only whole-line comments exist: `#` is legal inside an address.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Final

MAX_DEPTH: Final = 10


class AliasError(ValueError):
    """A bad aliases file (names the file and line) or an alias that cannot expand."""


class Aliases:
    def __init__(self, entries: Mapping[str, tuple[str, ...]], path: str | None = None) -> None:
        self._entries = dict(entries)  # lower-cased key -> targets as written
        self._path = path

    @classmethod
    def load(cls, path: str | None) -> Aliases:
        """Read and check the file; None -> no aliases. OSError if it cannot be read."""
        if path is None:
            return cls({})
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise AliasError(f"{path}:{line}: not UTF-8") from None
        return cls(_parse(text, path), path)

    def __contains__(self, address: object) -> bool:
        """The file defines this key: a full address, or a bare local part."""
        return isinstance(address, str) and _key(address) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def expand(self, address: str, local_domains: Collection[str]) -> list[str] | None:
        """None if `address` is not an alias; else its final target addresses."""
        domains = {d.lower().rstrip(".") for d in local_domains}
        if self._lookup(address, domains) is None:
            return None
        final: list[str] = []
        seen: set[str] = set()
        self._expand(address, domains, [], final, seen)
        return final

    def _lookup(self, address: str, domains: set[str]) -> tuple[str, ...] | None:
        key = _key(address)
        targets = self._entries.get(key)
        if targets is None and "@" in key:
            local, _, domain = key.rpartition("@")
            if domain in domains:
                targets = self._entries.get(local)
        return targets

    def _expand(self, address: str, domains: set[str], chain: list[str], final: list[str],
                seen: set[str]) -> None:
        chain = chain + [_key(address)]
        if len(chain) > MAX_DEPTH:
            raise AliasError(f"{self._where()}aliases nest deeper than {MAX_DEPTH} levels: "
                             + " -> ".join(chain))
        targets = self._lookup(address, domains)
        assert targets is not None, address
        domain = address.rpartition("@")[2] if "@" in address else ""
        for target in targets:
            if "@" not in target and domain:
                target = f"{target}@{domain}"
            key = _key(target)
            if key != chain[-1] and self._lookup(target, domains) is not None:
                if key in chain:
                    raise AliasError(f"{self._where()}alias loop: " + " -> ".join(chain + [key]))
                self._expand(target, domains, chain, final, seen)
            elif key not in seen:
                seen.add(key)
                final.append(target)

    def _where(self) -> str:
        return f"{self._path}: " if self._path else ""


def _parse(text: str, path: str) -> dict[str, tuple[str, ...]]:
    entries: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue

        def bad(problem: str) -> AliasError:
            return AliasError(f"{path}:{number}: {problem}")

        name, colon, rest = stripped.partition(":")
        name = name.strip()
        if not colon:
            raise bad("expected 'name: target, target, ...'")
        if not _is_address(name):
            raise bad(f"bad alias name {name!r}")
        key = _key(name)
        if key in entries:
            raise bad(f"{name} is already defined on line {first_line[key]}")
        targets = [t.strip() for t in rest.split(",")]
        if targets == [""]:
            raise bad(f"{name} has no targets")
        for target in targets:
            if not target:
                raise bad("empty target (two commas, or a comma at the end)")
            if target[0] in "|/\"" or target.lower().startswith(":include:"):
                raise bad(f"unsupported target {target!r}: only addresses are allowed")
            if not _is_address(target):
                raise bad(f"bad target address {target!r}")
        entries[key] = tuple(targets)
        first_line[key] = number
    return entries


def _is_address(text: str) -> bool:
    """`local` or `local@domain`: no spaces, controls, brackets or extra `@`/`:`."""
    if not text or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c in "<>,:;\"" for c in text):
        return False
    local, at, domain = text.rpartition("@") if "@" in text else (text, "", "")
    return bool(local) and "@" not in local and (not at or bool(domain.rstrip(".")))


def _key(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local.lower()}@{domain.lower().rstrip('.')}" if at else address.lower()
