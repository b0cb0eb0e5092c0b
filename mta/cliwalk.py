"""The command line's argparse parser as data: every command, its options and arguments.

One walk over the parser (mta/cli.py build_parser()) that both generated references
read: `mta completion bash` (mta/completion.py) and the mta(8) man page
(mta/manpage.py), so neither can drift from the parser. It reads argparse's action
lists (stable since Python 3.2) and never its help formatter, whose layout changes
between Python releases and with the terminal's width.

Invariants: commands come depth first in the parser's order; a value's kind (file,
directory, choice, free text) is decided here once, from its metavar.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

FILE_METAVARS = frozenset({"FILE", "PATH"})  # complete file names
DIR_METAVARS = frozenset({"OUT", "DIR"})  # complete directory names


@dataclass(frozen=True)
class Argument:
    """An option (`flags` set) or a positional argument (`flags` empty)."""

    flags: tuple[str, ...]
    metavar: str  # "" for a flag that takes no value
    help: str
    choices: tuple[str, ...] = ()
    repeated: bool = False  # nargs * or + (positional), append (option)
    optional: bool = True

    @property
    def kind(self) -> str:
        """What its value is: "none", "choice", "file", "dir" or "text"."""
        if not self.metavar:
            return "none"
        if self.choices:
            return "choice"
        if self.metavar in FILE_METAVARS:
            return "file"
        return "dir" if self.metavar in DIR_METAVARS else "text"

    @property
    def synopsis(self) -> str:
        """`-c FILE`, `--json`, `ID ...`: as the usage line shows it, without brackets."""
        value = f"{self.metavar} ..." if self.repeated and not self.flags else self.metavar
        return " ".join(part for part in (self.flags[0] if self.flags else "", value) if part)


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # () is `mta` itself; ("queue", "list") is `mta queue list`
    help: str
    arguments: tuple[Argument, ...]  # without -h/--help, which every command has
    exclusive: tuple[tuple[Argument, ...], ...]  # required groups: exactly one of each
    subcommands: tuple[str, ...]

    @property
    def name(self) -> str:
        return " ".join(("mta", *self.path))

    @property
    def options(self) -> tuple[Argument, ...]:
        return tuple(a for a in self.arguments if a.flags)

    @property
    def usage(self) -> str:
        """`mta queue retry [-c FILE] (ID ... | --domain DOMAIN | --all)`"""
        grouped = {a for group in self.exclusive for a in group}
        parts = [self.name]
        for a in self.arguments:
            if a in grouped:
                continue
            parts.append(f"[{a.synopsis}]" if a.optional else a.synopsis)
        parts.extend("(" + " | ".join(a.synopsis for a in group) + ")" for group in self.exclusive)
        if self.subcommands:
            parts.append("COMMAND ...")
        return " ".join(parts)


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """Every command of `parser`, `mta` first, then depth first."""
    found: list[Command] = []
    _walk(parser, (), parser.description or "", found)
    return found


def leaves(parser: argparse.ArgumentParser) -> list[Command]:
    """The commands that do something (no subcommands of their own)."""
    return [c for c in commands(parser) if not c.subcommands]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...], help_text: str, found: list[Command]) -> None:
    arguments: list[Argument] = []
    by_action: dict[int, Argument] = {}
    children: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            children.extend((name, sub, helps.get(name, "")) for name, sub in action.choices.items())
            continue
        argument = _argument(action)
        arguments.append(argument)
        by_action[id(action)] = argument
    exclusive = tuple(tuple(by_action[id(a)] for a in group._group_actions)
                      for group in parser._mutually_exclusive_groups if group.required)
    found.append(Command(path, help_text, tuple(arguments), exclusive, tuple(name for name, _, _ in children)))
    for name, sub, sub_help in children:
        _walk(sub, (*path, name), sub_help, found)


def _argument(action: argparse.Action) -> Argument:
    if isinstance(action.metavar, str):
        metavar = action.metavar
    else:
        metavar = action.dest.upper() if action.nargs != 0 else ""
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    help_text = action.help if action.help and action.help != argparse.SUPPRESS else ""
    if choices:
        help_text = f"{help_text} (one of: {', '.join(choices)})" if help_text else f"one of: {', '.join(choices)}"
    repeated = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)
    if action.option_strings:
        optional = not action.required
    else:
        optional = action.nargs in ("?", "*")
    return Argument(tuple(action.option_strings), metavar, help_text, choices, repeated, optional)
