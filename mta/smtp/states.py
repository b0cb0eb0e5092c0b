"""SMTP server session states and every transition between them, as data.

Rule 1: every SMTP state transition lives in this file.
Rule 2: a transition happens when we send a 2xx/3xx reply, never on receipt.
Rule 3: a command not allowed in a state gets the reply SEQUENCE_ERRORS names.

RSET and the reply to a finished message always return to READY (or stay in
GREETED before HELO/EHLO); NOOP, HELP, VRFY, EXPN, AUTH and QUIT never change the
state. A completed STARTTLS handshake returns to GREETED (RFC 3207 4.2: the client
must send EHLO again).
"""

from __future__ import annotations

import enum
from typing import Final

from mta.smtp import replies
from mta.smtp.commands import Bdat, Data, Ehlo, Helo, MailFrom, RcptTo, StartTls
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


ON_POSITIVE_REPLY: Final[dict[State, dict[type, State]]] = {
    State.GREETED: {Helo: State.READY, Ehlo: State.READY},
    State.READY: {Helo: State.READY, Ehlo: State.READY, MailFrom: State.MAIL},
    State.MAIL: {Helo: State.READY, Ehlo: State.READY, RcptTo: State.RCPT},
    State.RCPT: {Helo: State.READY, Ehlo: State.READY, RcptTo: State.RCPT, Data: State.DATA, Bdat: State.BDAT},
    State.BDAT: {Helo: State.READY, Ehlo: State.READY, Bdat: State.BDAT},
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


def after_positive(state: State, command: object) -> State:
    """The state after a positive reply to `command` in `state` (unchanged if none listed)."""
    return ON_POSITIVE_REPLY.get(state, {}).get(type(command), state)


def sequence_error(state: State, command: object) -> Reply | None:
    return SEQUENCE_ERRORS.get(state, {}).get(type(command))


def after_tls(state: State) -> State:
    return State.GREETED


def after_reset(state: State) -> State:
    return State.GREETED if state in (State.CONNECTED, State.GREETED) else State.READY
