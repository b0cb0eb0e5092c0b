"""The milter client against rspamd (Debian's rspamd 3.4) in milter mode, on loopback.

rspamd's proxy worker scans in-process (self_scan) and answers as a milter: its headers
come back as modifications, its actions as verdicts with its own reply. It negotiates
no-reply for every step before end of message, so these also prove that the client
sends those steps without waiting for an answer rspamd never gives.
"""

import asyncio
import email
import email.policy
import logging
from dataclasses import replace

import pytest
import uvloop

from mta.milter.changes import Message, apply_modifications
from mta.milter.client import Envelope, MilterAddress, MilterResult, run_milter
from mta.milter.codes import MAX_BODY_CHUNK, Action, Proto
from mta.milter.protocol import AddHeader, ChangeHeader
from tests.integration.milterpeers import GTUBE, REJECT_MESSAGE, rspamd_milter  # noqa: F401

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)
ENVELOPE = Envelope(
    "client.test", "192.0.2.7", 40123, "helo.client.test",
    {"j": "mx.test", "_": "client.test [192.0.2.7]", "{client_addr}": "192.0.2.7"},
    queue_id="4F2A9C01B7D3E5A6",
)


def scan(address: str, subject: str = "hello", body: str = "A plain note between friends.",
         loop_factory=None, envelope: Envelope = ENVELOPE) -> tuple[Message, MilterResult]:
    content = (f"From: Sender <s@sender.test>\r\nTo: a@r.test\r\nSubject: {subject}\r\n"
               f"Date: Mon, 07 Dec 2026 04:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\n{body}\r\n")
    message = Message.parse(content.encode(), "s@sender.test", ("a@r.test",), ())
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run_milter(MilterAddress.parse(address), envelope, message, 30))
    return message, result


def added(result: MilterResult) -> dict[str, str]:
    return {m.name: m.value for m in result.modifications if isinstance(m, AddHeader)}


def test_rspamd_negotiates_no_reply_steps_and_its_actions(rspamd_milter):
    _, result = scan(rspamd_milter)
    negotiated = result.negotiated
    log.info("rspamd negotiated actions %r, protocol %r", negotiated.actions, negotiated.protocol)
    no_reply = (Proto.NR_CONN | Proto.NR_HELO | Proto.NR_MAIL | Proto.NR_RCPT | Proto.NR_DATA
                | Proto.NR_HDR | Proto.NR_EOH | Proto.NR_BODY)
    assert no_reply in negotiated.protocol  # every step before end of message goes unanswered
    assert Action.ADDHDRS | Action.CHGHDRS | Action.QUARANTINE in negotiated.actions
    assert result.verdict == "accept"  # ... and the verdict still comes back at end of message


def test_a_large_message_streams_unanswered_body_chunks_under_uvloop(rspamd_milter):
    """About 40 body chunks go out with no reply awaited (NR_BODY), through uvloop as in production."""
    body = "\r\n".join(f"line {n:06d} of a long but innocent report" for n in range(60_000))
    message, result = scan(rspamd_milter, body=body, loop_factory=uvloop.new_event_loop)
    assert len(message.body) > 39 * MAX_BODY_CHUNK
    headers = added(result)
    assert result.verdict == "accept" and headers["X-Rspamd-Action"] == "no action"
    assert headers["X-Rspamd-Queue-Id"] == ENVELOPE.queue_id


def test_a_clean_message_gets_rspamds_headers(rspamd_milter):
    message, result = scan(rspamd_milter)
    headers = added(result)
    assert headers["X-Spam-Status"].startswith("No, score=")
    assert headers["X-Rspamd-Queue-Id"] == ENVELOPE.queue_id  # the {i} macro reached it
    assert headers["X-Rspamd-Action"] == "no action"
    assert headers["X-Rspamd-Server"]
    assert headers["X-Spamd-Result"].startswith("default: False [")
    assert "MIME_GOOD" in headers["X-Spamd-Result"]  # rspamd parsed the body it was sent
    changed = apply_modifications(message, result.modifications)
    parsed = email.message_from_bytes(changed.content(), policy=email.policy.SMTP)
    assert parsed["X-Spamd-Result"].startswith("default: False")  # folded, still one header
    assert parsed.get_content() == "A plain note between friends.\r\n"
    assert parsed["Authentication-Results"].startswith("mx.test;")  # named by our j macro
    assert "spf=none" in parsed["Authentication-Results"]  # inserted by rspamd's milter_headers
    assert changed.body == message.body


def test_an_authenticated_clients_message_gets_no_headers(rspamd_milter):
    """rspamd reads {auth_authen}; milter_headers skips authenticated mail (skip_authenticated)."""
    authenticated = replace(ENVELOPE, macros=ENVELOPE.macros | {"{auth_authen}": "alice"})
    _, result = scan(rspamd_milter, envelope=authenticated)
    assert (result.verdict, result.modifications) == ("accept", ())
    assert added(scan(rspamd_milter)[1])  # the same message from the same client, anonymous: headers


def test_gtube_is_rejected_with_rspamds_own_reply(rspamd_milter):
    _, result = scan(rspamd_milter, body=f"Buy now.\r\n{GTUBE}")
    assert (result.verdict, result.code, result.status, result.text) == (
        "reject", 554, "5.7.1", "Gtube pattern")
    assert result.modifications == ()


def test_a_score_over_the_reject_threshold_gets_the_configured_reject_message(rspamd_milter):
    _, result = scan(rspamd_milter, subject="TEST-REJECT offer")
    assert (result.verdict, result.code, result.status, result.text) == (
        "reject", 554, "5.7.1", REJECT_MESSAGE)


def test_add_header_action_marks_the_message_as_spam(rspamd_milter):
    message, result = scan(rspamd_milter, subject="TEST-ADD-HEADER offer")
    assert result.verdict == "accept"
    assert ChangeHeader(1, "X-Spam", "Yes") in result.modifications  # the proxy's spam_header
    changed = dict(apply_modifications(message, result.modifications).headers)
    assert changed["X-Spam"] == "Yes"  # a change of a header the message lacks adds it
    assert changed["X-Rspamd-Action"] == "add header"
    assert changed["X-Spam-Status"].startswith("Yes, score=")
    assert "TEST_ADD_HEADER" in changed["X-Spamd-Result"]


def test_rewrite_subject_action_changes_the_subject(rspamd_milter):
    message, result = scan(rspamd_milter, subject="TEST-REWRITE-SUBJECT offer")
    assert result.verdict == "accept"
    assert ChangeHeader(1, "Subject", "***SPAM*** TEST-REWRITE-SUBJECT offer") in result.modifications
    changed = apply_modifications(message, result.modifications)
    assert dict(changed.headers)["Subject"] == "***SPAM*** TEST-REWRITE-SUBJECT offer"
