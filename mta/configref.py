"""The configuration reference: README.md's Configuration block, read as data.

That block (every table, every key with its default and a comment) is the one source
of the configuration's documentation: mta.toml(5) is generated from it
(mta/manpage.py), and tests/mta/test_config_reference.py holds it to mta/sections.py
(every field listed, with the default the field has).

The block's grammar: a table header (`[server]`, `[[listener]]`, `[domains."d"]`) with
an optional comment; `key = value  # comment` lines; indented `# ...` lines continue
the comment of the line above; a blank line ends a table. A value is TOML or a
`<placeholder>` for a default that is computed (`<CPU count>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

START = "## Configuration"  # the README section holding the block
_HEADER = re.compile(r"^(\[\[?([A-Za-z_]+)[^\]]*\]\]?)$")
_KEY = re.compile(r'^("[^"]+"|[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+)$')


class ConfigReferenceError(ValueError):
    """The README's block is missing or does not follow the grammar above."""


@dataclass(frozen=True)
class Key:
    name: str
    value: str  # as shown: TOML, or a <placeholder>
    comment: str


@dataclass
class Section:
    header: str  # as written: [server], [[listener]], [domains."example.net"]
    name: str  # the Config field: server, listener, domains
    comment: str = ""
    keys: list[Key] = field(default_factory=list)


def read(readme: str) -> list[Section]:
    """The tables of the Configuration block of `readme` (the README's text), in order."""
    sections: list[Section] = []
    last: Section | Key | None = None
    for number, line in enumerate(_block(readme), 1):
        code, comment = _split_comment(line)
        if not code:
            if comment is not None and line[:1].isspace() and last is not None:
                last = _continue(sections, last, comment)
            elif not line.strip():
                last = None
            continue
        if (header := _HEADER.match(code)) is not None:
            sections.append(Section(header.group(1), header.group(2), comment or ""))
            last = sections[-1]
        elif (key := _KEY.match(code)) is not None and sections:
            last = Key(key.group(1).strip('"'), key.group(2).strip(), comment or "")
            sections[-1].keys.append(last)
        else:
            raise ConfigReferenceError(f"README.md Configuration block, line {number}: cannot read {line!r}")
    return sections


def _block(readme: str) -> list[str]:
    try:
        after = readme[readme.index(f"\n{START}\n"):]
        body = after[after.index("```toml\n") + len("```toml\n"):]
        return body[:body.index("```")].splitlines()
    except ValueError:
        raise ConfigReferenceError(f"README.md has no ```toml block under {START!r}") from None


def _continue(sections: list[Section], last: Section | Key, comment: str) -> Section | Key:
    """A `# ...` line under `last`: its comment goes on."""
    if isinstance(last, Section):
        last.comment = f"{last.comment} {comment}".strip()
        return last
    keys = sections[-1].keys
    keys[-1] = Key(last.name, last.value, f"{last.comment} {comment}".strip())
    return keys[-1]


def _split_comment(line: str) -> tuple[str, str | None]:
    """(the code, the comment or None) of one line: the first # outside a "string"."""
    quoted = False
    for i, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:i].strip(), line[i + 1:].strip()
    return line.strip(), None
