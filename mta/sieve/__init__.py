"""Sieve mail filtering (RFC 5228, with fileinto, envelope, encoded-character, reject/ereject
RFC 5429, vacation RFC 5230 and :create of RFC 5490): our own parser and interpreter, pure.

    script = parse(text)                     # SieveError(line, column, message)
    actions = evaluate(script, Context(envelope_from, envelope_to, message))
                                             # list of mta/sieve/actions.py; SieveRuntimeError

Modules: lexer (tokens), grammar (tree), commands (what each command accepts; the check),
encoded (${hex:..} and ${unicode:..}),
match (comparators, match types), message (header fields and addresses), interpreter,
actions, vacation (whether and what to reply), check (`mta sieve check FILE`).
"""

from mta.sieve.actions import Action, Discard, FileInto, Keep, Redirect, Reject, Vacation
from mta.sieve.commands import Script, parse
from mta.sieve.errors import SieveError, SieveRuntimeError
from mta.sieve.interpreter import Context, evaluate

__all__ = [
    "Action", "Context", "Discard", "FileInto", "Keep", "Redirect", "Reject", "Script", "SieveError",
    "SieveRuntimeError", "Vacation", "evaluate", "parse",
]
