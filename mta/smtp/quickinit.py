"""Quicker construction for the frozen values the server core makes per command.

A frozen dataclass's generated __init__ sets each field through object.__setattr__
(~110 ns a field on CPython 3.11; MailFrom has six). `quick_init` gives a frozen,
slotted dataclass an __init__ with the same signature that sets each field through its
slot descriptor instead (~50 ns): the value is the same in every way (fields, equality,
hash, repr, pickling, still frozen). mta/messages.py does the same job for the
inter-process messages, by another route (a mutable twin class).

    @quick_init
    @dataclass(frozen=True, slots=True)
    class RcptTo: ...

Only for classes without __post_init__, InitVar, keyword-only fields or default factories
(checked).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

_T = TypeVar("_T")


def quick_init(cls: type[_T]) -> type[_T]:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    assert params.frozen and "__slots__" in cls.__dict__ and not hasattr(cls, "__post_init__"), cls
    assert all(f.init and not f.kw_only and f.default_factory is dataclasses.MISSING for f in fields), cls
    env: dict[str, Any] = {}
    args, body = [], []
    for i, field in enumerate(fields):
        env[f"_set{i}"] = cls.__dict__[field.name].__set__  # the slot's member descriptor
        if field.default is dataclasses.MISSING:
            args.append(field.name)
        else:
            env[f"_default{i}"] = field.default
            args.append(f"{field.name}=_default{i}")
        body.append(f"    _set{i}(self, {field.name})")
    exec(f"def __init__(self, {', '.join(args)}):\n" + ("\n".join(body) or "    pass"), env)
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[misc]
    return cls
