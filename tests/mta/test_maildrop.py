"""The maildrop: its folders' modes, a file's form, writing one, and every way a file can be refused."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest

from mta import maildrop
from mta.maildrop import MAGIC, Drop, DropError, DropRecipient, decode, encode

DROP = Drop("alice@example.com", (DropRecipient("bob@example.net", ("SUCCESS", "DELAY"), "rfc822;bob@old.test"),
                                   DropRecipient("jürgen@exämple.net")), "HDRS", "env-1")
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def test_a_file_round_trips_its_envelope_and_message() -> None:
    assert decode(encode(DROP, MESSAGE), 1000) == (DROP, MESSAGE)
    assert DROP.smtputf8 and not Drop("a@x.test", (DropRecipient("b@x.test"),)).smtputf8
    null = Drop("", (DropRecipient("b@x.test", ("NEVER",)),))
    assert decode(encode(null, b""), 10) == (null, b"")


def header(**changes: object) -> bytes:
    doc: dict[str, object] = {"sender": "a@x.test", "recipients": [["b@x.test", None, None]], "ret": None, "envid": None}
    doc.update(changes)
    return MAGIC + json.dumps(doc).encode() + b"\n" + MESSAGE


@pytest.mark.parametrize("raw, why", [
    (b"", "not a maildrop file"),
    (b"From: x\r\n\r\nbody\r\n", "not a maildrop file"),
    (MAGIC + b"{not json\n" + MESSAGE, "not JSON"),
    (MAGIC + b"\xff\xfe\n" + MESSAGE, "not JSON in UTF-8"),
    (MAGIC + b'{"sender": "a@x.test"' + b" " * (maildrop.MAX_HEADER_BYTES + 10), "no envelope line"),
    (MAGIC + b"[1, 2]\n", "must be an object"),
    (header(extra=1), "must be an object with sender, recipients"),
    (header(sender=7), "sender: not a string"),
    (header(sender="no-domain"), "sender 'no-domain'"),
    (header(sender="a@b c.test"), "sender"),
    (header(recipients=[]), "recipients: must be a list of 1 to"),
    (header(recipients=[["b@x.test"]]), "each must be"),
    (header(recipients=[["", None, None]]), "recipient ''"),
    (header(recipients=[["postmaster", None, None]]), "missing @domain"),
    (header(recipients=[["", None, None]]), "not a mailbox with a domain"),
    (header(recipients=[["b@x.test", ["SUCCESS", "NEVER"], None]]), "notify must be"),
    (header(recipients=[["b@x.test", "SUCCESS", None]]), "notify must be"),
    (header(recipients=[["b@x.test", None, "no-semicolon"]]), "orcpt must be"),
    (header(recipients=[["b@x.test", None, None]] * (maildrop.MAX_RECIPIENTS + 1)), "recipients: must be a list"),
    (header(ret="ALL"), "ret: must be"),
    (header(envid="a\x00b"), "envid: must be"),
    (header(envid="x" * 101), "envid: must be"),
    (header().replace(b"\r\n\r\nbody", b"\n\nbody"), "bare CR or LF"),
    (header().replace(b"body", b"b" * 2000), "over [limits] max_message_bytes"),
])
def test_anything_that_is_not_a_sound_drop_is_refused_with_its_reason(raw: bytes, why: str) -> None:
    with pytest.raises(DropError, match=re.escape(why)):
        decode(raw, 1000)


def test_prepare_makes_the_folders_with_their_modes_and_puts_wrong_ones_right(tmp_path: Path) -> None:
    where = tmp_path / "spool-maildrop"
    maildrop.prepare(str(where))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in where.iterdir()}
    assert modes == {"new": 0o3733, "pickup": 0o700, "corrupt": 0o700}
    assert stat.S_IMODE(where.stat().st_mode) == 0o711
    (where / "new").chmod(0o777)
    where.chmod(0o755)
    maildrop.prepare(str(where))
    assert stat.S_IMODE((where / "new").stat().st_mode) == 0o3733 and stat.S_IMODE(where.stat().st_mode) == 0o711


def test_prepare_refuses_a_folder_that_is_not_a_folder(tmp_path: Path) -> None:
    where = tmp_path / "md"
    where.mkdir()
    (where / "pickup").write_text("a file where a folder belongs")
    with pytest.raises(PermissionError, match=r"md/pickup is not a folder.*remove it, or chown -R"):
        maildrop.prepare(str(where))


def test_write_leaves_one_whole_0640_file_and_poke_reaches_a_listener(tmp_path: Path) -> None:
    where = tmp_path / "md"
    maildrop.prepare(str(where))
    old = os.umask(0o077)  # a strict umask must not make the file unreadable for mta's group
    try:
        name = maildrop.write(str(where), DROP, MESSAGE)
    finally:
        os.umask(old)
    [path] = (where / "new").iterdir()
    assert path.name == name and len(name) == 32 and not name.startswith(maildrop.TMP_PREFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert decode(path.read_bytes(), 1000) == (DROP, MESSAGE)
    assert not maildrop.poke(str(where))  # nobody listens: best effort, no error
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(where / maildrop.SOCKET))
        assert maildrop.poke(str(where))
        assert listener.recv(16) == b"new"


def test_write_without_a_maildrop_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        maildrop.write(str(tmp_path / "missing"), DROP, MESSAGE)
