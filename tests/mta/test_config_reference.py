"""README.md's Configuration block, the source of mta.toml(5), against mta/sections.py: every
table and every key listed, none that does not exist, each with the default its field has.

The block's conventions: `<...>` stands for a computed default (a default_factory, or None
decided by another key); a comment that starts "an example" marks a value that is not the
default; under [domains."d"] a key whose field is None shows the [delivery] value it
inherits.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mta import configref
from mta.config import DeliveryConfig
from tests.mta.configtables import section_types

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sections() -> list[configref.Section]:
    return configref.read((ROOT / "README.md").read_text(encoding="utf-8"))


def test_every_table_and_key_is_documented_and_none_is_invented(sections: list[configref.Section]) -> None:
    names = [s.name for s in sections]
    assert sorted(names) == sorted(section_types()), "README.md's Configuration block and mta/sections.py differ"
    for section in sections:
        fields_of = section_types()[section.name]
        if fields_of is None:
            continue
        documented = [k.name for k in section.keys]
        assert len(documented) == len(set(documented)), f"{section.header}: a key is listed twice"
        fields = [f.name for f in dataclasses.fields(fields_of)]
        assert set(documented) - set(fields) == set(), f"{section.header}: keys the code does not know"
        assert set(fields) - set(documented) == set(), f"{section.header}: keys README.md does not list"


def test_every_default_shown_is_the_fields_default(sections: list[configref.Section]) -> None:
    from mta.config import ServerConfig  # first, the check itself: 25 where the code says 30 is caught
    drain = {f.name: f for f in dataclasses.fields(ServerConfig)}["drain_timeout_seconds"]
    assert _check("server", drain, configref.Key(drain.name, "25", "")) == "the default is 30.0"
    assert _check("server", drain, configref.Key(drain.name, "30", "")) is None
    wrong = []
    for section in sections:
        fields_of = section_types()[section.name]
        if fields_of is None:
            continue
        by_name = {f.name: f for f in dataclasses.fields(fields_of)}
        for key in section.keys:
            if (problem := _check(section.name, by_name[key.name], key)) is not None:
                wrong.append(f"{section.header} {key.name} = {key.value}: {problem}")
    assert not wrong, "\n".join(wrong)


def _check(table: str, field: dataclasses.Field[Any], key: configref.Key) -> str | None:
    computed = field.default is dataclasses.MISSING or field.default is None
    if key.value.startswith("<"):
        return None if computed else f"a placeholder, but the default is {field.default!r}"
    if key.comment.startswith("an example"):
        return None
    default = field.default
    if default is None and table == "domains":
        default = getattr(DeliveryConfig(), field.name)  # inherited from [delivery]
    elif computed:
        return "the default is computed: show it as <...>"
    shown = tomllib.loads(f"v = {key.value}")["v"]
    want = _as_toml(default)
    if type(shown) is bool or type(want) is bool:
        return None if shown is want else f"the default is {want!r}"
    return None if shown == want else f"the default is {want!r}"


def _as_toml(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_as_toml(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value
