"""`mta completion bash`: the bash completion script, generated from the argument parser.

The script knows every command path (`queue list`), each one's options, which options
take a value, and what that value is (a file, a directory, one of some choices:
mta/cliwalk.py decides). It finds the command being typed by walking the words
before the cursor, skipping option values, then completes a subcommand, an option, or
the value the previous option or the next argument wants. Nothing runs at completion
time but bash: no Python start per TAB.

The same text is installed by the wheel as share/bash-completion/completions/mta
(`make man` writes it; a test keeps the committed copy current).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable

from mta import cliwalk

HEADER = "# bash completion for mta. Generated from its argument parser by `mta completion bash`: do not edit.\n"


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = cliwalk.commands(parser)
    paths = [_key(c) for c in commands if c.path]
    valued = [(c, o) for c in commands for o in c.options if o.kind != "none"]
    out = [HEADER, "_mta()\n{\n",
           '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"\n',
           '    local path="" word i skip=0\n',
           "    for ((i = 1; i < COMP_CWORD; i++)); do\n",
           '        word="${COMP_WORDS[i]}"\n',
           "        if ((skip)); then skip=0; continue; fi\n",
           '        case "$path/$word" in\n',
           f"            {_alternatives(paths)}) path=\"$path/$word\"; continue ;;\n",
           "        esac\n"]
    if valued:
        out += ['        case "$path $word" in\n',
                f"            {_alternatives(f'{_key(c)} {flag}' for c, o in valued for flag in o.flags)}) skip=1 ;;\n",
                "        esac\n"]
    out.append("    done\n")
    if valued:
        out += ["    if ((skip)); then  # the word at the cursor is the value of $prev\n",
                '        case "$path $prev" in\n']
        by_action: dict[str, list[str]] = {}  # one branch per completion: files, directories, each choice list
        for c, o in valued:
            if o.kind != "text":  # free text (an id, a domain): nothing to offer
                by_action.setdefault(_complete(o), []).extend(f"{_key(c)} {flag}" for flag in o.flags)
        out.extend(f"            {_alternatives(pairs)}) {action} ;;\n" for action, pairs in by_action.items())
        out += ["        esac\n", "        return 0\n", "    fi\n"]
    out.append('    case "$path" in\n')
    for c in commands:
        options = " ".join(["-h", "--help", *(flag for o in c.options for flag in o.flags)])
        out.append(f"        {_quote(_key(c))})\n")
        out.append(f'            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W {_quote(options)} -- "$cur"))\n')
        if c.subcommands:
            out.append(f'            else COMPREPLY=($(compgen -W {_quote(" ".join(c.subcommands))} -- "$cur"))\n')
        elif (argument := _first_completable(c)) is not None:
            out.append(f"            else {_complete(argument)}\n")
        out.append("            fi ;;\n")
    out += ["    esac\n", "    return 0\n", "}\n", "complete -F _mta mta\n"]
    return "".join(out)


def _key(command: cliwalk.Command) -> str:
    """The command's path as the script spells it: "" for mta, "/queue/list"."""
    return "".join(f"/{name}" for name in command.path)


def _first_completable(command: cliwalk.Command) -> cliwalk.Argument | None:
    for argument in command.arguments:
        if not argument.flags and argument.kind in ("choice", "file", "dir"):
            return argument
    return None


def _complete(argument: cliwalk.Argument) -> str:
    if argument.kind == "choice":
        return f'COMPREPLY=($(compgen -W {_quote(" ".join(argument.choices))} -- "$cur"))'
    if argument.kind == "file":
        return 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
    return 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur"))'


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(_quote(w) for w in words)


def _quote(word: str) -> str:
    """A bash word that stands for `word` exactly (a case pattern matches it literally)."""
    return shlex.quote(word) if word else "''"
