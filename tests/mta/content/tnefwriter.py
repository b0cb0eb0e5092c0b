"""A small TNEF writer after MS-OXTNEF, for fixtures: the stream Outlook sends as winmail.dat.

Message level: attTnefVersion, attOemCodepage, attMessageClass. Per attachment:
attAttachRendData (starts it), attAttachTitle (the short name), attAttachData, and
attAttachment (MAPI properties: PR_ATTACH_METHOD by value, PR_ATTACH_LONG_FILENAME as
PT_UNICODE). Every attribute carries its checksum (the sum of its data bytes mod 2^16).
"""

import struct

SIGNATURE = 0x223E9F78
ATT_TNEF_VERSION = 0x00089006
ATT_OEM_CODEPAGE = 0x00069007
ATT_MESSAGE_CLASS = 0x00078008
ATT_ATTACH_REND_DATA = 0x00069002
ATT_ATTACH_TITLE = 0x00018010
ATT_ATTACH_DATA = 0x0006800F
ATT_ATTACHMENT = 0x00069005
PT_LONG, PT_UNICODE, PT_BINARY = 0x0003, 0x001F, 0x0102
PR_ATTACH_METHOD, PR_ATTACH_LONG_FILENAME, PR_RENDERING_POSITION = 0x3705, 0x3707, 0x370B


def attribute(level: int, attr: int, data: bytes) -> bytes:
    return struct.pack("<BII", level, attr, len(data)) + data + struct.pack("<H", sum(data) & 0xFFFF)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def mapi_props(props: list[tuple[int, int, int | bytes]]) -> bytes:
    out = struct.pack("<I", len(props))
    for prop_type, prop_id, value in props:
        out += struct.pack("<HH", prop_type, prop_id)
        if prop_type == PT_LONG:
            out += struct.pack("<I", value)
        else:
            out += struct.pack("<II", 1, len(value)) + _padded(value)
    return out


def tnef_stream(attachments: list[tuple[str, str | None, bytes]], key: int = 0x0A1B) -> bytes:
    """attachments: (short title, long file name or None, data)."""
    out = struct.pack("<IH", SIGNATURE, key)
    out += attribute(1, ATT_TNEF_VERSION, struct.pack("<I", 0x00010000))
    out += attribute(1, ATT_OEM_CODEPAGE, struct.pack("<II", 1252, 0))
    out += attribute(1, ATT_MESSAGE_CLASS, b"IPM.Note\0")
    for position, (title, long_name, data) in enumerate(attachments):
        out += attribute(2, ATT_ATTACH_REND_DATA, struct.pack("<HIHHI", 1, 0xFFFFFFFF, 0xFFFF, 0xFFFF, 1))
        out += attribute(2, ATT_ATTACH_TITLE, title.encode("cp1252") + b"\0")
        out += attribute(2, ATT_ATTACH_DATA, data)
        props: list[tuple[int, int, int | bytes]] = [(PT_LONG, PR_ATTACH_METHOD, 1),
                                                     (PT_LONG, PR_RENDERING_POSITION, position)]
        if long_name is not None:
            props.append((PT_UNICODE, PR_ATTACH_LONG_FILENAME, (long_name + "\0").encode("utf-16-le")))
        out += attribute(2, ATT_ATTACHMENT, mapi_props(props))
    return out
