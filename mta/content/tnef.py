"""A TNEF reader (MS-OXTNEF, Exchange's winmail.dat): the attachments packed in the stream.

    read_tnef(data) -> [TnefAttachment(name="report.pdf", data=b"%PDF...")]   or TnefError

The stream is a signature (0x223E9F78), a legacy key, then attributes: level (1 message,
2 attachment), id and type (32 bits), length, data, checksum. An attachment starts at its
attAttachRendData; attAttachTitle names it (the 8.3 name, OEM code page), attAttachData
holds its bytes, and attAttachment holds its MAPI properties, whose
PR_ATTACH_LONG_FILENAME is the name the sender saw (it wins over the title, as in
Debian's tnef). An attachment with no bytes there (an embedded message, an OLE object)
keeps data None. Checksums are not enforced (the data is what is there either way).

Pure: no I/O. TnefError is the only exception, for a stream that does not parse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mta.content.mime import Part

SIGNATURE = 0x223E9F78
LEVEL_MESSAGE, LEVEL_ATTACHMENT = 1, 2
ATT_OEM_CODEPAGE = 0x9007
ATT_ATTACH_REND_DATA = 0x9002
ATT_ATTACH_TITLE = 0x8010
ATT_ATTACH_DATA = 0x800F
ATT_ATTACHMENT = 0x9005
PR_ATTACH_DATA_OBJ = 0x3701
PR_ATTACH_FILENAME = 0x3704
PR_ATTACH_LONG_FILENAME = 0x3707
PT_STRING8, PT_UNICODE, PT_BINARY, PT_OBJECT = 0x001E, 0x001F, 0x0102, 0x000D
MV_FLAG = 0x1000
# Value sizes of the fixed-length MAPI property types (PT_I2 and PT_BOOLEAN padded to 4).
FIXED_SIZES = {0x0001: 0, 0x0002: 4, 0x0003: 4, 0x0004: 4, 0x0005: 8, 0x0006: 8, 0x0007: 8,
               0x000A: 4, 0x000B: 4, 0x0014: 8, 0x0040: 8, 0x0048: 16}
VARIABLE_TYPES = {PT_STRING8, PT_UNICODE, PT_BINARY, PT_OBJECT}
TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})


class TnefError(ValueError):
    """The bytes are not a TNEF stream we can read."""


@dataclass(frozen=True, slots=True)
class TnefAttachment:
    name: str
    data: bytes | None


def is_tnef(part: Part, name: str | None) -> bool:
    return part.content_type in TNEF_TYPES or (name or "").strip().lower() == "winmail.dat"


def read_tnef(data: bytes) -> list[TnefAttachment]:
    if len(data) < 6 or struct.unpack_from("<I", data)[0] != SIGNATURE:
        raise TnefError("no TNEF signature")
    codepage = "cp1252"
    found: list[dict] = []
    at = 6
    while at < len(data):
        if at + 9 > len(data):
            raise TnefError(f"attribute header cut short at byte {at}")
        level, attr, length = struct.unpack_from("<BII", data, at)
        at += 9
        value = data[at:at + length]
        if len(value) != length or at + length + 2 > len(data):
            raise TnefError(f"attribute 0x{attr:08x} runs past the end")
        at += length + 2  # the checksum
        attr_id = attr & 0xFFFF
        if level == LEVEL_MESSAGE and attr_id == ATT_OEM_CODEPAGE and length >= 4:
            codepage = _codepage(struct.unpack_from("<I", value)[0])
        elif level != LEVEL_ATTACHMENT:
            continue
        elif attr_id == ATT_ATTACH_REND_DATA:
            found.append({})
        elif found and attr_id == ATT_ATTACH_TITLE:
            found[-1]["title"] = _string8(value, codepage)
        elif found and attr_id == ATT_ATTACH_DATA:
            found[-1]["data"] = value
        elif found and attr_id == ATT_ATTACHMENT:
            found[-1].update(_attachment_properties(value, codepage))
    return [TnefAttachment(_name(a, n), a.get("data", a.get("data_obj"))) for n, a in enumerate(found, 1)]


def _name(found: dict, number: int) -> str:
    for key in ("long_filename", "title", "filename"):
        if found.get(key):
            return found[key]
    return f"attachment{number}.dat"


def _codepage(number: int) -> str:
    name = f"cp{number}"
    try:
        "".encode(name)
    except LookupError:
        return "cp1252"
    return name


def _string8(value: bytes, codepage: str) -> str:
    return value.split(b"\0", 1)[0].decode(codepage, "replace").strip()


def _attachment_properties(value: bytes, codepage: str) -> dict:
    """The attachment's name(s) and by-value data from its MAPI properties; a property
    list that does not parse gives what was read before the fault."""
    wanted: dict = {}
    try:
        for prop_id, prop_type, values in _mapi_properties(value):
            if not values:
                continue
            if prop_id in (PR_ATTACH_LONG_FILENAME, PR_ATTACH_FILENAME) and prop_type in (PT_STRING8, PT_UNICODE):
                text = (values[0].decode("utf-16-le", "replace").split("\0", 1)[0].strip()
                        if prop_type == PT_UNICODE else _string8(values[0], codepage))
                wanted["long_filename" if prop_id == PR_ATTACH_LONG_FILENAME else "filename"] = text
            elif prop_id == PR_ATTACH_DATA_OBJ and prop_type == PT_BINARY:
                wanted["data_obj"] = values[0]
    except TnefError:
        pass  # a damaged property list costs only the long name
    return wanted


def _mapi_properties(value: bytes):
    """(property id, type, [raw values]) for each property of a MAPI property list."""
    (count,), at = _unpack("<I", value, 0)
    for _ in range(count):
        (prop_type, prop_id), at = _unpack("<HH", value, at)
        if prop_id >= 0x8000:  # a named property: GUID, kind, then an id or a name
            (kind,), at = _unpack("<I", value, at + 16)
            (size,), at = _unpack("<I", value, at)
            if kind == 1:
                at += (size + 3) & ~3
        base = prop_type & ~MV_FLAG
        multi = bool(prop_type & MV_FLAG)
        values = []
        if base in VARIABLE_TYPES:
            (n,), at = _unpack("<I", value, at)
            for _ in range(n):
                (size,), at = _unpack("<I", value, at)
                if at + size > len(value):
                    raise TnefError("property value runs past the end")
                values.append(value[at:at + size])
                at += (size + 3) & ~3
        elif base in FIXED_SIZES:
            n = 1
            if multi:
                (n,), at = _unpack("<I", value, at)
            size = FIXED_SIZES[base]
            if at + n * size > len(value):
                raise TnefError("property values run past the end")
            values = [value[at + i * size:at + (i + 1) * size] for i in range(n)]
            at += n * size
        else:
            raise TnefError(f"unknown MAPI property type 0x{prop_type:04x}")
        if at > len(value):
            raise TnefError("property list runs past the end")
        yield prop_id, base, values


def _unpack(fmt: str, value: bytes, at: int) -> tuple[tuple, int]:
    size = struct.calcsize(fmt)
    if at + size > len(value):
        raise TnefError("property list cut short")
    return struct.unpack_from(fmt, value, at), at + size
