"""mta's mailboxes under Dovecot: written as `[local] owner`, Dovecot reads them with no
chown, and Dovecot's quota view (GETQUOTAROOT) and mta's (`mta mailbox list`, the
maildirsize file) agree, also after Dovecot expunges a message.

Dovecot here has no quota_rule of its own: it takes the limits from the maildirsize mta
writes from the mailboxes file (docs/mailboxes.md).
"""

from __future__ import annotations

import imaplib
import json
import math
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer
from tests.integration.dovecot import DovecotUser, start_dovecot
from tests.integration.test_dovecot import (  # noqa: F401  (vmail_user: a fixture)
    ALICE,
    DOMAIN,
    PASSWORD,
    by_message_id,
    fetch_all,
    imap_login,
    message,
    mta_over,
    send,
    stored,
    vmail_user,
)

pytestmark = pytest.mark.integration

QUOTA_BYTES = 20_000
QUOTA_MESSAGES = 10


def mta_usage(server: MtaServer) -> tuple[int, int]:
    """(bytes, messages) of alice's mailbox as `mta mailbox list --json` counts them."""
    [row] = json.loads(server.mta("mailbox", "list", "--json").stdout)
    assert row["address"] == ALICE and (row["quota_bytes"], row["quota_messages"]) == (QUOTA_BYTES, QUOTA_MESSAGES)
    return row["bytes"], row["messages"]


def dovecot_quota(imap: imaplib.IMAP4) -> bytes:
    typ, (roots, quotas) = imap.getquotaroot("INBOX")
    assert typ == "OK" and roots == [b'INBOX "User quota"'], roots
    return quotas[0]


def quota_line(used_bytes: int, messages: int) -> bytes:
    """GETQUOTAROOT's answer for that usage under the mailboxes file's limits (RFC 2087: KiB, rounded up)."""
    return (f'"User quota" (STORAGE {math.ceil(used_bytes / 1024)} {math.ceil(QUOTA_BYTES / 1024)} '
            f"MESSAGE {messages} {QUOTA_MESSAGES})").encode()


def test_dovecot_reads_an_owned_mailbox_and_counts_its_quota_as_mta_does(
        mta_server, tmp_path: Path, vmail_user: str) -> None:  # noqa: F811
    mailboxes = tmp_path / "mailboxes"
    mailboxes.write_text(f"{ALICE} quota_bytes={QUOTA_BYTES} quota_messages={QUOTA_MESSAGES}\n")
    with start_dovecot(tmp_path, vmail_user, {ALICE: DovecotUser(PASSWORD)}) as dovecot:
        server = mta_over(mta_server, dovecot, local={"owner": vmail_user, "mailboxes": str(mailboxes)})
        send(server.port, *(message(n, body_lines=40 * n) for n in range(1, 4)))
        box = dovecot.mail_root / DOMAIN / "alice"  # mta made it, as vmail
        files = stored(box, 3, server)
        on_disk = sum(f.stat().st_size for f in files)
        assert mta_usage(server) == (on_disk, 3)

        imap = imap_login(dovecot)  # no chown: mta wrote everything as Dovecot's mail user
        try:
            assert sorted(by_message_id(fetch_all(imap))) == [f"<m{n}@sender.test>".encode() for n in (1, 2, 3)]
            assert dovecot_quota(imap) == quota_line(on_disk, 3)
            # Dovecot expunges one: it adds the change to maildirsize, and mta counts it
            assert imap.store("1", "+FLAGS", r"(\Deleted)")[0] == "OK"
            assert imap.expunge()[0] == "OK"
            remaining = sum(f.stat().st_size for f in (box / "cur").iterdir())
            assert 0 < remaining < on_disk
            assert dovecot_quota(imap) == quota_line(remaining, 2)
        finally:
            imap.logout()
        assert mta_usage(server) == (remaining, 2)
        limits, *changes = (box / "maildirsize").read_text().splitlines()
        assert limits == f"{QUOTA_BYTES}S,{QUOTA_MESSAGES}C"  # Dovecot kept mta's limits
        assert [sum(int(line.split()[i]) for line in changes) for i in (0, 1)] == [remaining, 2]
