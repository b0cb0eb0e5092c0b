"""The tables of the configuration as mta/sections.py types them: table name -> dataclass."""

from __future__ import annotations

import dataclasses
import typing

from mta.config import Config


def section_types() -> dict[str, type | None]:
    """Config's fields: [server] -> ServerConfig, [[listener]] -> ListenerConfig (the item of the
    tuple), [domains."d"] -> DomainConfig (the value of the dict); None for a free-form map
    ([routes]: domain -> route)."""
    found: dict[str, type | None] = {}
    for name, hint in typing.get_type_hints(Config).items():
        if name == "source":
            continue
        args = typing.get_args(hint)
        item = args[-1] if typing.get_origin(hint) is dict else args[0] if args else hint
        found[name] = item if dataclasses.is_dataclass(item) else None
    return found
