"""Run a checked Sieve script against one message: tests (RFC 5228 section 5), control
(if/elsif/else, stop) and actions (section 4, RFC 5429 reject/ereject, RFC 5230 vacation).

The result is the action list of mta/sieve/actions.py: duplicates removed (2.10.3:
keep once, one fileinto per folder, one redirect per address), `fileinto "INBOX"` read as
keep, and the implicit keep (2.10.2) added last unless discard, fileinto, redirect or
reject cancelled it. Action sets RFC 5228 2.10.6 and RFC 5429/5230 forbid raise
SieveRuntimeError: two rejects, reject with keep, fileinto, redirect or vacation, two vacations,
more than MAX_REDIRECTS redirects, a vacation :mime reason with 8-bit header fields.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parseaddr
from typing import Final

from mta.sieve.actions import Action, Discard, FileInto, Keep, Redirect, Reject, Vacation
from mta.sieve.commands import Call, Command, If, Script, field_name
from mta.sieve.errors import SieveRuntimeError
from mta.sieve.match import any_matches
from mta.sieve.message import MessageView, address_part

MAX_REDIRECTS: Final = 10
VACATION_DEFAULT_DAYS: Final = 7
VACATION_MIN_DAYS: Final = 1
_CANCEL_IMPLICIT_KEEP: Final = frozenset({"discard", "fileinto", "redirect", "reject", "ereject"})  # not vacation
# RFC 5429 2.4: reject MUST NOT go with vacation, and is NOT RECOMMENDED with what delivers.
_NOT_WITH_REJECT: Final = frozenset({Keep, FileInto, Redirect, Vacation})


@dataclass(frozen=True, slots=True)
class Context:
    """One delivery: the envelope (sender "" for <>) and the stored message (CRLF)."""
    envelope_from: str
    envelope_to: str
    message: bytes


class _Stop(Exception):
    """`stop`: end the script here (the implicit keep still applies)."""


def evaluate(script: Script, context: Context) -> list[Action]:
    run = _Run(context)
    try:
        run.block(script.commands)
    except _Stop:
        pass
    return run.result()


class _Run:
    def __init__(self, context: Context) -> None:
        self._context = context
        self._message = MessageView(context.message)
        self._actions: list[tuple[Action, int]] = []
        self._implicit_keep = True

    # -- control and actions -----------------------------------------------------------

    def block(self, commands: tuple[Command, ...]) -> None:
        for command in commands:
            if isinstance(command, If):
                for test, body in command.branches:
                    if test is None or self.test(test):
                        self.block(body)
                        break
            else:
                self.command(command)

    def command(self, call: Call) -> None:
        name = call.name
        if name == "stop":
            raise _Stop
        if name == "keep":
            self._add(Keep(), call.line)
        elif name == "discard":
            self._add(Discard(), call.line)
        elif name == "fileinto":
            folder = str(call.positional[0])
            self._add(Keep() if folder.upper() == "INBOX" else FileInto(folder, "create" in call.tags), call.line)
        elif name == "redirect":
            self._add(Redirect(parseaddr(str(call.positional[0]))[1]), call.line)  # "Bart <b@x>": b@x
        elif name in ("reject", "ereject"):
            self._add(Reject(str(call.positional[0]), extended=name == "ereject"), call.line)
        elif name == "vacation":
            action = _vacation(call)
            if action.mime and not action.reason.partition("\r\n\r\n")[0].partition("\n\n")[0].isascii():
                raise SieveRuntimeError(call.line, "vacation :mime reason has 8-bit header fields (RFC 5230 5)")
            self._add(action, call.line)
        else:
            raise AssertionError(f"sieve: command {name} passed the check but has no action")
        if name in _CANCEL_IMPLICIT_KEEP:
            self._implicit_keep = False

    def _add(self, action: Action, line: int) -> None:
        if any(_same(earlier, action) for earlier, _ in self._actions):
            return  # RFC 5228 2.10.3: once, and no error; the first stays as it was (as Pigeonhole)
        kinds = [type(a) for a, _ in self._actions]
        if isinstance(action, Reject) and Reject in kinds:
            raise SieveRuntimeError(line, "reject or ereject run twice")
        if isinstance(action, Vacation) and Vacation in kinds:
            raise SieveRuntimeError(line, "vacation run twice")
        if isinstance(action, Reject):
            clash = _NOT_WITH_REJECT & set(kinds)
        else:
            clash = {type(action)} & _NOT_WITH_REJECT if Reject in kinds else set()
        if clash:
            raise SieveRuntimeError(line, "reject cannot be combined with "
                                    + ", ".join(sorted(c.__name__.lower() for c in clash)))
        if isinstance(action, Redirect) and sum(k is Redirect for k in kinds) >= MAX_REDIRECTS:
            raise SieveRuntimeError(line, f"more than {MAX_REDIRECTS} redirects")
        self._actions.append((action, line))

    def result(self) -> list[Action]:
        actions = [a for a, _ in self._actions]
        if self._implicit_keep and Keep() not in actions:
            actions.append(Keep())
        return actions

    # -- tests -------------------------------------------------------------------------

    def test(self, call: Call) -> bool:
        name = call.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(call.tests[0])
        if name == "allof":
            return all(self.test(t) for t in call.tests)
        if name == "anyof":
            return any(self.test(t) for t in call.tests)
        if name == "size":
            limit = int(call.positional[0])  # type: ignore[call-overload]
            return self._message.size > limit if call.tags["relation"] == "over" else self._message.size < limit
        if name == "exists":
            return all(field_name(h) and self._message.has(h) for h in call.positional[0])  # type: ignore[attr-defined]
        names: tuple[str, ...] = call.positional[0]  # type: ignore[assignment]
        if name != "envelope":  # a name that is no field name matches nothing (RFC 5228 2.4.2.2)
            names = tuple(h for h in names if field_name(h))
        keys: tuple[str, ...] = call.positional[1]  # type: ignore[assignment]
        match = str(call.tags.get("match", "is"))
        comparator = str(call.tags.get("comparator", "i;ascii-casemap")).lower()
        part = str(call.tags.get("part", "all"))
        if name == "header":
            found = [v for h in names for v in self._message.values(h)]
        elif name == "address":
            found = [address_part(a, part) for h in names for a in self._message.addresses(h)]
        elif name == "envelope":
            found = [self._envelope(p.lower(), part) for p in names]
        else:
            raise AssertionError(f"sieve: test {name} passed the check but is not run")
        return any_matches([v for v in found if v is not None], keys, match, comparator)

    def _envelope(self, which: str, part: str) -> str | None:
        address = self._context.envelope_from if which == "from" else self._context.envelope_to
        address = address.strip().removeprefix("<").removesuffix(">")
        if not address:  # RFC 5228 5.4: the null reverse-path is "" whatever the part
            return ""
        return address_part(address, part)


def _same(a: Action, b: Action) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, FileInto) and isinstance(b, FileInto):
        return a.folder == b.folder
    if isinstance(a, Redirect) and isinstance(b, Redirect):
        return a.address.lower() == b.address.lower()
    return isinstance(a, (Keep, Discard))


def _vacation(call: Call) -> Vacation:
    tags = call.tags
    days = int(tags.get("days", VACATION_DEFAULT_DAYS))  # type: ignore[call-overload]
    return Vacation(
        reason=str(call.positional[0]),
        days=max(days, VACATION_MIN_DAYS),
        subject=str(tags["subject"]) if "subject" in tags else None,
        from_=str(tags["from"]) if "from" in tags else None,
        addresses=tuple(tags.get("addresses", ())),  # type: ignore[call-overload]
        mime="mime" in tags,
        handle=str(tags["handle"]) if "handle" in tags else None,
    )
