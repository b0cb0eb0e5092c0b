"""The Sieve grammar (RFC 5228 section 8.2) over lexer tokens: a tree of Nodes, before any
command is known. mta/sieve/commands.py gives the tree its meaning.

    command   = identifier arguments ( ";" / block )
    arguments = *argument [ test / test-list ]
    argument  = string-list / number / tag
    test      = identifier arguments
    test-list = "(" test *( "," test ) ")"
    block     = "{" *command "}"

Nesting (blocks and tests) is limited to MAX_NESTING so that no script, however odd,
exhausts the stack. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from mta.sieve.errors import SieveError
from mta.sieve.lexer import Lexer, Token

MAX_NESTING: Final = 64


@dataclass(frozen=True, slots=True)
class Arg:
    kind: str                       # "strings" (value: tuple[str, ...]), "number" (int), "tag" (str)
    value: tuple[str, ...] | int | str
    line: int
    column: int


@dataclass(slots=True)
class Node:
    """One command or test as written: name, arguments, tests, and (commands) a block."""
    name: str
    line: int
    column: int
    args: list[Arg] = field(default_factory=list)
    tests: list[Node] = field(default_factory=list)
    test_list: bool = False         # the tests were written in ( ... )
    block: list[Node] | None = None


class Grammar:
    def __init__(self, text: str) -> None:
        self._tokens = Lexer(text).tokens()
        self._i = 0

    def commands(self) -> list[Node]:
        nodes = self._commands(0)
        token = self._peek()
        if token.kind != "eof":
            raise _unexpected(token, "a command")
        return nodes

    def _peek(self) -> Token:
        return self._tokens[self._i]

    def _take(self) -> Token:
        token = self._tokens[self._i]
        if token.kind != "eof":
            self._i += 1
        return token

    def _is(self, punct: str) -> bool:
        token = self._peek()
        return token.kind == "punct" and token.value == punct

    def _expect(self, punct: str, what: str) -> Token:
        token = self._take()
        if token.kind != "punct" or token.value != punct:
            raise _unexpected(token, what)
        return token

    def _commands(self, depth: int) -> list[Node]:
        nodes: list[Node] = []
        while self._peek().kind == "ident":
            nodes.append(self._command(depth))
        return nodes

    def _command(self, depth: int) -> Node:
        node = self._test(depth)
        if self._is(";"):
            self._take()
            return node
        if self._is("{"):
            open_token = self._take()
            if depth >= MAX_NESTING:
                raise SieveError(open_token.line, open_token.column, f"blocks nested deeper than {MAX_NESTING}")
            node.block = self._commands(depth + 1)
            self._expect("}", "'}' or a command")
            return node
        last = self._tokens[self._i - 1]  # the fault is at the end of the command, not at what follows
        found = _unexpected(self._peek(), "").message.split(", found ")[1]
        raise SieveError(last.line, last.column, f"missing ';' after {node.name} (found {found} next)")

    def _test(self, depth: int) -> Node:
        """A command or a test: identifier, arguments, then a test or a test list."""
        if depth >= MAX_NESTING:
            token = self._peek()
            raise SieveError(token.line, token.column, f"tests nested deeper than {MAX_NESTING}")
        token = self._take()
        if token.kind != "ident":
            raise _unexpected(token, "a command or test name")
        node = Node(str(token.value), token.line, token.column)
        while (arg := self._argument()) is not None:
            node.args.append(arg)
        if self._peek().kind == "ident":
            node.tests.append(self._test(depth + 1))
        elif self._is("("):
            self._take()
            node.test_list = True
            node.tests.append(self._test(depth + 1))
            while self._is(","):
                self._take()
                node.tests.append(self._test(depth + 1))
            self._expect(")", "',' or ')' in the test list")
        return node

    def _argument(self) -> Arg | None:
        token = self._peek()
        if token.kind == "string":
            self._take()
            return Arg("strings", (str(token.value),), token.line, token.column)
        if token.kind == "number":
            self._take()
            return Arg("number", token.value, token.line, token.column)
        if token.kind == "tag":
            self._take()
            return Arg("tag", token.value, token.line, token.column)
        if self._is("["):
            self._take()
            values = [self._string()]
            while self._is(","):
                self._take()
                values.append(self._string())
            self._expect("]", "',' or ']' in the string list")
            return Arg("strings", tuple(values), token.line, token.column)
        return None

    def _string(self) -> str:
        token = self._take()
        if token.kind != "string":
            raise _unexpected(token, "a string")
        return str(token.value)


def _unexpected(token: Token, wanted: str) -> SieveError:
    found = "the end of the script" if token.kind == "eof" else repr(_shown(token))
    return SieveError(token.line, token.column, f"expected {wanted}, found {found}")


def _shown(token: Token) -> str:
    if token.kind == "tag":
        return f":{token.value}"
    if token.kind == "string":
        text = str(token.value)
        return f'"{text[:20]}..."' if len(text) > 20 else f'"{text}"'
    return str(token.value)
