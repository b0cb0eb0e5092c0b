"""The milter wire's vocabulary: command codes, action and protocol flags, stages, packets.

Values from libmilter's mfdef.h (sendmail 8.14+, protocol version 6). A packet is a
4-octet big-endian length of what follows, one code octet, then the code's data.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

VERSION: Final = 6
MAX_BODY_CHUNK: Final = 65535  # MILTER_CHUNK_SIZE
MAX_PACKET: Final = 1 << 20  # octets after the length; libmilter's largest (SMFIP_MDS_1M)
LENGTH = struct.Struct(">I")
OPTNEG = struct.Struct(">III")


class Cmd(bytes, enum.Enum):
    """SMFIC_*: what the MTA sends."""

    ABORT = b"A"
    BODY = b"B"
    CONNECT = b"C"
    MACRO = b"D"
    BODYEOB = b"E"
    HELO = b"H"
    QUIT_NC = b"K"
    HEADER = b"L"
    MAIL = b"M"
    EOH = b"N"
    OPTNEG = b"O"
    QUIT = b"Q"
    RCPT = b"R"
    DATA = b"T"


class Action(enum.IntFlag):
    """SMFIF_*: the modifications a milter may make at end of message."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class Proto(enum.IntFlag):
    """SMFIP_*: steps the milter does not want (NO*), or answers not (NR*)."""

    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


ACTIONS_OFFERED: Final = Action(0x1FF)
# Everything but RCPT_REJ: we only ever show a milter the recipients we accepted.
PROTO_OFFERED: Final = Proto(0x1FFFFF) & ~Proto.RCPT_REJ


class Family(bytes, enum.Enum):
    """The client's address family in SMFIC_CONNECT."""

    UNKNOWN = b"U"
    UNIX = b"L"
    INET = b"4"
    INET6 = b"6"


class Stage(enum.IntEnum):
    """SMFIM_*: the steps a milter may ask macros for (SMFIR_SETSYMLIST)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


def packet(code: bytes, data: bytes = b"") -> bytes:
    """One packet: length, code, data."""
    return LENGTH.pack(len(data) + 1) + code + data
