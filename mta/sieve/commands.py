"""What each Sieve command and test accepts, and the check of a parsed tree against it:
the result is a Script the interpreter can run without meeting a malformed call.

Commands and tests are data (SPECS): their positional arguments, their tags and the slot
each tag fills (`:is`, `:contains`, `:matches` all fill "match", so two of them conflict),
and the extension a script must `require` to use them. Checked here, so that `mta sieve
check` finds them: unknown or un-required names, a `require` after other commands, an
extension we do not support, if/elsif/else order, tags after positional arguments, an
address test on a header that holds no addresses, envelope parts other than from/to,
redirect and vacation :from addresses that are not addresses. With "encoded-character"
required, string arguments are decoded here (mta/sieve/encoded.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import getaddresses, parseaddr
from typing import Final

from mta.sieve.encoded import decode_encoded
from mta.sieve.errors import SieveError
from mta.sieve.grammar import Arg, Grammar, Node

EXTENSIONS: Final = frozenset({
    "fileinto", "reject", "ereject", "envelope", "vacation", "mailbox", "encoded-character",
    "comparator-i;octet", "comparator-i;ascii-casemap",
})
COMPARATORS: Final = frozenset({"i;octet", "i;ascii-casemap"})
ENVELOPE_PARTS: Final = frozenset({"from", "to"})
# RFC 5228 5.1: the address test is for headers that hold addresses (at least these).
ADDRESS_HEADERS: Final = frozenset({
    "from", "to", "cc", "bcc", "sender", "resent-from", "resent-to", "resent-cc", "resent-bcc",
    "resent-sender", "reply-to", "return-path", "errors-to", "delivered-to", "envelope-to",
    "x-original-to", "mail-followup-to", "mail-reply-to", "disposition-notification-to",
    "original-recipient", "apparently-to",
})

_MATCH = {"is": ("match", None), "contains": ("match", None), "matches": ("match", None)}
_COMPARATOR = {"comparator": ("comparator", "string")}
_PART = {"localpart": ("part", None), "domain": ("part", None), "all": ("part", None)}


@dataclass(frozen=True)
class Spec:
    kind: str                                   # "command", "test", "control"
    positional: tuple[str, ...] = ()            # "string" (one string), "strings", "number"
    tags: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # tag -> (slot, value kind)
    extension: str | None = None
    tag_extensions: dict[str, str] = field(default_factory=dict)
    tests: str = "none"                         # "none", "one", "list"
    block: bool = False


SPECS: Final[dict[str, Spec]] = {
    "require": Spec("control", ("strings",)),
    "if": Spec("control", tests="one", block=True),
    "elsif": Spec("control", tests="one", block=True),
    "else": Spec("control", block=True),
    "stop": Spec("command"),
    "keep": Spec("command"),
    "discard": Spec("command"),
    "redirect": Spec("command", ("string",)),
    "fileinto": Spec("command", ("string",), {"create": ("create", None)}, "fileinto",
                     tag_extensions={"create": "mailbox"}),
    "reject": Spec("command", ("string",), extension="reject"),
    "ereject": Spec("command", ("string",), extension="ereject"),
    "vacation": Spec("command", ("string",), {
        "days": ("days", "number"), "subject": ("subject", "string"), "from": ("from", "string"),
        "addresses": ("addresses", "strings"), "mime": ("mime", None), "handle": ("handle", "string"),
    }, "vacation"),
    "address": Spec("test", ("strings", "strings"), {**_MATCH, **_COMPARATOR, **_PART}),
    "envelope": Spec("test", ("strings", "strings"), {**_MATCH, **_COMPARATOR, **_PART}, "envelope"),
    "header": Spec("test", ("strings", "strings"), {**_MATCH, **_COMPARATOR}),
    "exists": Spec("test", ("strings",)),
    "size": Spec("test", ("number",), {"over": ("relation", None), "under": ("relation", None)}),
    "allof": Spec("test", tests="list"),
    "anyof": Spec("test", tests="list"),
    "not": Spec("test", tests="one"),
    "true": Spec("test"),
    "false": Spec("test"),
}
POSITIONAL_NAMES: Final = {"string": "a string", "strings": "a string or string list", "number": "a number"}


@dataclass(frozen=True, slots=True)
class Call:
    """A checked command or test: its tag slots (flags hold the tag name), positionals, tests."""
    name: str
    line: int
    tags: dict[str, object]
    positional: tuple[object, ...]
    tests: tuple[Call, ...] = ()


@dataclass(frozen=True, slots=True)
class If:
    """if / elsif ... / else: the first branch whose test holds runs (test None: else)."""
    line: int
    branches: tuple[tuple[Call | None, tuple[Command, ...]], ...]


Command = Call | If


@dataclass(frozen=True, slots=True)
class Script:
    commands: tuple[Command, ...]
    requires: frozenset[str]


def parse(text: str) -> Script:
    """The script, checked; SieveError(line, column, message) at the first fault."""
    nodes = Grammar(text).commands()
    requires: set[str] = set()
    start = 0
    for node in nodes:
        if node.name != "require":
            break
        call = _bind(node, SPECS["require"], requires)
        for name in call.positional[0]:  # type: ignore[attr-defined]
            if name.lower() not in EXTENSIONS:
                raise SieveError(node.line, node.column, f"require: unsupported extension {name!r} "
                                 f"(supported: {', '.join(sorted(EXTENSIONS))})")
            requires.add(name.lower())
        start += 1
    return Script(_block(nodes[start:], frozenset(requires)), frozenset(requires))


def _block(nodes: list[Node], requires: frozenset[str]) -> tuple[Command, ...]:
    out: list[Command] = []
    i = 0
    while i < len(nodes):
        node = nodes[i]
        spec = _spec(node, requires)
        if node.name == "require":
            raise SieveError(node.line, node.column, "require must come before every other command")
        if node.name in ("elsif", "else"):
            raise SieveError(node.line, node.column, f"{node.name} without a preceding if")
        if spec.kind == "test":
            raise SieveError(node.line, node.column, f"{node.name} is a test, not a command")
        if node.name == "if":
            line = node.line
            branches = []
            while True:
                call = _bind(node, _spec(node, requires), requires)
                test = call.tests[0] if call.tests else None
                branches.append((test, _block(node.block or [], requires)))
                nxt = nodes[i + 1] if i + 1 < len(nodes) else None
                if node.name == "else" or nxt is None or nxt.name not in ("elsif", "else"):
                    break
                i += 1
                node = nxt
            out.append(If(line, tuple(branches)))
        else:
            out.append(_bind(node, spec, requires))
        i += 1
    return tuple(out)


def _spec(node: Node, requires: frozenset[str] | set[str]) -> Spec:
    spec = SPECS.get(node.name)
    if spec is None:
        raise SieveError(node.line, node.column, f"unknown command or test {node.name!r}")
    if spec.extension and spec.extension not in requires:
        raise SieveError(node.line, node.column, f'{node.name} needs require "{spec.extension}"')
    return spec


def _bind(node: Node, spec: Spec, requires: frozenset[str] | set[str]) -> Call:
    where = f"{node.name}:"
    if spec.block and node.block is None:
        raise SieveError(node.line, node.column, f"{where} a block {{ ... }} must follow")
    if not spec.block and node.block is not None:
        raise SieveError(node.line, node.column, f"{where} takes no block (a ';' is missing?)")
    tags: dict[str, object] = {}
    positional: list[Arg] = []
    args = node.args
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.kind != "tag":
            positional.append(arg)
            continue
        name = str(arg.value)
        if positional:  # RFC 5228 2.6.2
            raise SieveError(arg.line, arg.column, f"{where} tag :{name} after a positional argument "
                             "(tags come first)")
        if name not in spec.tags:
            raise SieveError(arg.line, arg.column, f"{where} unknown tag :{name}")
        if (ext := spec.tag_extensions.get(name)) and ext not in requires:
            raise SieveError(arg.line, arg.column, f'{where} :{name} needs require "{ext}"')
        slot, kind = spec.tags[name]
        if slot in tags:
            raise SieveError(arg.line, arg.column, f"{where} :{name} conflicts with an earlier tag")
        if kind is None:
            tags[slot] = name
            continue
        if i >= len(args) or not _fits(args[i], kind):
            raise SieveError(arg.line, arg.column, f"{where} :{name} needs {POSITIONAL_NAMES[kind]}")
        tags[slot] = _value(args[i], kind, requires)
        i += 1
    if len(positional) != len(spec.positional):
        wanted = ", ".join(POSITIONAL_NAMES[k] for k in spec.positional) or "no arguments"
        raise SieveError(node.line, node.column, f"{where} takes {wanted}; found {len(positional)} arguments")
    values = []
    for arg, kind in zip(positional, spec.positional):
        if not _fits(arg, kind):
            raise SieveError(arg.line, arg.column, f"{where} expected {POSITIONAL_NAMES[kind]}")
        values.append(_value(arg, kind, requires))
    tests = _tests(node, spec, requires)
    call = Call(node.name, node.line, tags, tuple(values), tests)
    _check_values(node, call)
    return call


def _fits(arg: Arg, kind: str) -> bool:
    if kind == "number":
        return arg.kind == "number"
    if kind == "string":
        return arg.kind == "strings" and len(arg.value) == 1  # type: ignore[arg-type]
    return arg.kind == "strings"


def _value(arg: Arg, kind: str, requires: frozenset[str] | set[str]) -> object:
    if kind == "number":
        return arg.value
    strings: tuple[str, ...] = arg.value  # type: ignore[assignment]
    if "encoded-character" in requires:
        try:
            strings = tuple(decode_encoded(s) for s in strings)
        except ValueError as exc:
            raise SieveError(arg.line, arg.column, str(exc)) from None
    return strings[0] if kind == "string" else strings


def _tests(node: Node, spec: Spec, requires: frozenset[str] | set[str]) -> tuple[Call, ...]:
    where = f"{node.name}:"
    if spec.tests == "none" and node.tests:
        raise SieveError(node.line, node.column, f"{where} takes no test; found {node.tests[0].name}")
    if spec.tests == "one" and (len(node.tests) != 1 or (node.test_list and node.name != "not")):
        raise SieveError(node.line, node.column, f"{where} needs exactly one test")
    if spec.tests == "list" and not node.tests:
        raise SieveError(node.line, node.column, f"{where} needs a test list ( ... )")
    out = []
    for test in node.tests:
        test_spec = _spec(test, requires)
        if test_spec.kind != "test":
            raise SieveError(test.line, test.column, f"{test.name} is not a test")
        if test.block is not None:
            raise SieveError(test.line, test.column, f"{test.name}: a test takes no block")
        out.append(_bind(test, test_spec, requires))
    return tuple(out)


def _check_values(node: Node, call: Call) -> None:
    """What the argument kinds alone do not say."""
    where = f"{node.name}:"
    comparator = call.tags.get("comparator")
    if comparator is not None and str(comparator).lower() not in COMPARATORS:
        raise SieveError(node.line, node.column, f"{where} unknown comparator {comparator!r} "
                         "(i;ascii-casemap and i;octet are supported)")
    if node.name == "address":  # (an invalid field name is no error: it matches nothing, RFC 5228 2.4.2.2)
        for name in call.positional[0]:  # type: ignore[attr-defined]
            if field_name(name) and name.lower() not in ADDRESS_HEADERS:
                raise SieveError(node.line, node.column, f"{where} header {name!r} holds no addresses")
    if node.name == "envelope":
        for part in call.positional[0]:  # type: ignore[attr-defined]
            if part.lower() not in ENVELOPE_PARTS:
                raise SieveError(node.line, node.column, f"{where} unknown envelope part {part!r} "
                                 "(from and to are supported)")
    if node.name == "size" and "relation" not in call.tags:
        raise SieveError(node.line, node.column, f"{where} needs :over or :under")
    if node.name == "redirect" and not valid_address(str(call.positional[0])):
        raise SieveError(node.line, node.column, f"{where} {call.positional[0]!r} is not a mail address")
    if node.name == "vacation" and "from" in call.tags and not valid_address(str(call.tags["from"])):
        raise SieveError(node.line, node.column, f"{where} :from {call.tags['from']!r} is not a mail address")


def field_name(name: str) -> bool:
    """Whether name is a valid header field name (RFC 5322 ftext)."""
    return bool(name) and all(33 <= ord(c) <= 126 and c != ":" for c in name)


def valid_address(text: str) -> bool:
    """An RFC 5322 address (`user@domain`, or `Name <user@domain>`) with one @ and no blanks."""
    if len(getaddresses([text])) != 1:  # one address; a list is a string list (RFC 5228 2.4.2.3)
        return False
    _, addr = parseaddr(text)
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain and "@" not in domain and ("@" not in local or local.startswith('"'))
                and not any(c.isspace() or c in "<>,;" for c in addr) and "." not in (domain[0], domain[-1]))
