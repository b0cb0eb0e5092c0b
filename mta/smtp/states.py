"""SMTP server session states and every transition between them, as data.

Rule 1: every SMTP state transition lives in this file: server.py assigns its state
        only from `after_positive` and `after` below.
Rule 2: a transition happens when we send a 2xx/3xx reply to a command
        (ON_POSITIVE_REPLY), never on receipt, except the named steps of ON_STEP:
        GREETING      our 220 greeting: positive, but it answers no command.
        MESSAGE_DONE  the reply to a message's content ends the transaction whatever
                      its code (RFC 5321 4.1.1.4: the end of data completes it either
                      way), so a 5xx after DATA returns to READY as a 250 does.
        CHUNK_REFUSED a BDAT chunk refused while it is being read (too big, or the
                      application cannot hold it): READY at once, though the reply
                      waits for the chunk's end (RFC 3030 2: its octets are read
                      anyway), so the rest of it belongs to no transaction.
        TLS_STARTED   STARTTLS takes effect when the handshake completes, not at our
                      220 (until then nothing is read); the session starts over in
                      GREETED (RFC 3207 4.2: the client must send EHLO again).
        CLOSE         a reply that ends the session, negative ones too (421, too many
                      errors, a synchronisation error), and the peer's EOF, which no
                      reply answers.
Rule 3: a command not allowed in a state gets the reply SEQUENCE_ERRORS names.

RSET returns to READY (or stays in GREETED before HELO/EHLO); NOOP, HELP, VRFY,
EXPN and AUTH never change the state; QUIT closes. A step from a state its row does
not list is our bug: `after` raises.
"""

from __future__ import annotations

import enum
from typing import Final

from mta.smtp import replies
from mta.smtp.commands import Bdat, Data, Ehlo, Helo, MailFrom, Quit, RcptTo, Rset, StartTls
from mta.smtp.replies import Reply


class State(enum.Enum):
    CONNECTED = "connected"  # greeting not sent yet
    GREETED = "greeted"  # 220 sent, waiting for HELO/EHLO
    READY = "ready"  # no transaction
    MAIL = "mail"  # sender accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # 354 sent, reading content until CRLF.CRLF
    BDAT = "bdat"  # at least one non-LAST chunk accepted
    CLOSED = "closed"  # 221/421 sent or the peer went away

    # Members are singletons compared by identity: hash them by identity too (Enum's own
    # __hash__ is Python code hashing the name, and the tables below are read per command).
    __hash__ = object.__hash__


class Step(enum.Enum):
    """What moves the state besides a positive reply to a command (rule 2's exceptions)."""

    GREETING = "greeting"
    MESSAGE_DONE = "message_done"
    CHUNK_REFUSED = "chunk_refused"
    TLS_STARTED = "tls_started"
    CLOSE = "close"

    __hash__ = object.__hash__  # as State's


ON_POSITIVE_REPLY: Final[dict[State, dict[type, State]]] = {
    State.GREETED: {Helo: State.READY, Ehlo: State.READY, Rset: State.GREETED, Quit: State.CLOSED},
    State.READY: {Helo: State.READY, Ehlo: State.READY, Rset: State.READY, Quit: State.CLOSED,
                  MailFrom: State.MAIL},
    State.MAIL: {Helo: State.READY, Ehlo: State.READY, Rset: State.READY, Quit: State.CLOSED,
                 RcptTo: State.RCPT},
    State.RCPT: {Helo: State.READY, Ehlo: State.READY, Rset: State.READY, Quit: State.CLOSED,
                 RcptTo: State.RCPT, Data: State.DATA, Bdat: State.BDAT},
    State.BDAT: {Helo: State.READY, Ehlo: State.READY, Rset: State.READY, Quit: State.CLOSED,
                 Bdat: State.BDAT},
}

ON_STEP: Final[dict[Step, dict[State, State]]] = {
    Step.GREETING: {State.CONNECTED: State.GREETED},
    # RCPT: a BDAT LAST chunk that was the transaction's first.
    Step.MESSAGE_DONE: {State.RCPT: State.READY, State.DATA: State.READY, State.BDAT: State.READY},
    Step.CHUNK_REFUSED: {State.RCPT: State.READY, State.BDAT: State.READY},
    # CLOSED: closed (timeout, shutdown) while the handshake ran; it stays closed.
    Step.TLS_STARTED: {State.READY: State.GREETED, State.CLOSED: State.CLOSED},
    Step.CLOSE: {state: State.CLOSED for state in State},
}

_RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT")
_TLS_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")

SEQUENCE_ERRORS: Final[dict[State, dict[type, Reply]]] = {
    State.GREETED: {MailFrom: replies.NEED_HELO, RcptTo: replies.NEED_HELO,
                    Data: replies.NEED_HELO, Bdat: replies.NEED_HELO, StartTls: replies.NEED_HELO},
    State.READY: {RcptTo: replies.NEED_MAIL, Data: replies.NEED_MAIL, Bdat: replies.NEED_MAIL},
    State.MAIL: {MailFrom: replies.NESTED_MAIL, Data: replies.NEED_RCPT, Bdat: replies.NEED_RCPT,
                 StartTls: _TLS_IN_TRANSACTION},
    State.RCPT: {MailFrom: replies.NESTED_MAIL, StartTls: _TLS_IN_TRANSACTION},
    State.BDAT: {MailFrom: replies.NESTED_MAIL, RcptTo: _RCPT_AFTER_BDAT, Data: replies.MIXED_BDAT_DATA,
                 StartTls: _TLS_IN_TRANSACTION},
}


# The tables above with a row, maybe empty, for every state: one lookup per command.
_POSITIVE_ROWS: Final = {state: ON_POSITIVE_REPLY.get(state, {}) for state in State}
_SEQUENCE_ROWS: Final = {state: SEQUENCE_ERRORS.get(state, {}) for state in State}


def after_positive(state: State, command: object) -> State:
    """The state after a positive reply to `command` in `state` (unchanged if none listed)."""
    return _POSITIVE_ROWS[state].get(type(command), state)


def after(state: State, step: Step) -> State:
    """The state after `step` in `state`; a step its row does not allow is our bug."""
    target = ON_STEP[step].get(state)
    if target is None:
        raise RuntimeError(f"SMTP state: no {step.value} from {state.value}")
    return target


def sequence_error(state: State, command: object) -> Reply | None:
    return _SEQUENCE_ROWS[state].get(type(command))
