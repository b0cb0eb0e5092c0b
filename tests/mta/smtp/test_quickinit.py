"""quick_init: the same values as the dataclass's own __init__ gives, made quicker."""

import dataclasses
import pickle

import pytest

from mta.smtp.address import Address
from mta.smtp.commands import Ehlo, MailFrom, RcptTo
from mta.smtp.quickinit import quick_init
from mta.smtp.server import Message


def _pair() -> tuple[type, type]:
    """One class body, with the dataclass's __init__ and with quick_init's."""
    def body() -> type:
        @dataclasses.dataclass(frozen=True, slots=True)
        class Value:
            first: str
            second: int | None = None
            third: tuple[str, ...] = ()
        return Value
    return body(), quick_init(body())


@pytest.mark.parametrize("args, kwargs", [(("a",), {}), (("a", 2), {}), (("a",), {"third": ("x",)}),
                                          ((), {"first": "a", "second": 3, "third": ()})])
def test_the_same_fields_as_the_dataclass_init(args: tuple, kwargs: dict) -> None:
    plain, quick = _pair()
    value = quick(*args, **kwargs)
    assert dataclasses.astuple(value) == dataclasses.astuple(plain(*args, **kwargs))
    assert repr(value).replace("quick", "") == repr(plain(*args, **kwargs)).replace("plain", "")
    assert value == quick(*args, **kwargs) and hash(value) == hash(quick(*args, **kwargs))
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.first = "b"  # type: ignore[misc]


def test_missing_and_unknown_arguments_are_refused_as_before() -> None:
    _, quick = _pair()
    with pytest.raises(TypeError):
        quick()
    with pytest.raises(TypeError):
        quick("a", fourth=1)


def test_the_values_made_per_command_use_it_and_survive_a_pickle() -> None:
    address = Address("alice", "example.org")
    values = [address, Ehlo("c.test"), MailFrom(address, size=10, smtputf8=True), RcptTo(address, ("NEVER",)),
              Message(MailFrom(address), (RcptTo(address),), b"x\r\n")]
    for value in values:
        assert "_set0" in type(value).__init__.__code__.co_names  # quick_init's, not the dataclass's
        assert pickle.loads(pickle.dumps(value)) == value
    assert MailFrom(address, size=10).size == 10 and MailFrom(address).body is None
