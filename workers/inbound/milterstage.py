"""A [[milter]] as a content stage: the session's facts as macros, the verdict as our reply.

Verdicts (Postfix's smtpd_milters replies where the milter gives no code of its own):
  accept / continue    the milter's modifications applied (headers, body, sender, recipients)
  reject               the milter's reply, else 550 5.7.1
  tempfail             the milter's reply, else 451 4.7.1
  discard              250 and nothing stored (also when the milter deleted every recipient)
  quarantine           stored with every recipient held, the reason shown by `mta queue list`
A milter that is down, times out or breaks the protocol gets its `default_action`:
tempfail (451 4.7.1, the default), reject (550 5.7.1) or accept (the message goes on
unchanged, a warning logged).
"""

from __future__ import annotations

from mta import logs
from mta.config import Config, MilterConfig
from mta.milter.changes import Message, apply_modifications
from mta.milter.client import Envelope as MilterEnvelope
from mta.milter.client import MilterAddress, MilterFailed, MilterResult, run_milter
from mta.smtp import replies
from mta.smtp.replies import Reply
from mtaqueue import Recipient
from workers.inbound.content import Outcome, Stage, Work
from workers.inbound.decision import Decision

MILTER_VERSION = "mta"


class MilterStage(Stage):
    name = "milter"

    def __init__(self, config: MilterConfig) -> None:
        super().__init__(config.listeners)
        self.address = MilterAddress.parse(config.address)
        self.default_action = config.default_action
        self.timeout_seconds = config.timeout_seconds

    async def __call__(self, work: Work) -> Outcome:
        envelope = work.envelope
        message = Message.parse(work.body, envelope.sender, [r.address for r in envelope.recipients],
                                work.facts.sender_args)
        try:
            result = await run_milter(self.address, milter_envelope(work), message, self.timeout_seconds)
        except MilterFailed as exc:
            logs.event("milter_failed", msgid=envelope.id, milter=str(self.address), error=str(exc),
                       action=self.default_action)
            return _failed(self.default_action)
        return self._verdict(work, message, result)

    def _verdict(self, work: Work, message: Message, result: MilterResult) -> Outcome:
        if result.verdict == "reject":
            return Outcome("reject", Decision(_reply(result, replies.CONTENT_REJECTED), "milter"))
        if result.verdict == "tempfail":
            return Outcome("tempfail", Decision(_reply(result, replies.CONTENT_TEMPFAIL), "milter"))
        if result.verdict == "discard":
            return Outcome("discard", discard=True)
        if not result.modifications:
            return Outcome("accept")
        changed = apply_modifications(message, result.modifications)
        if not changed.recipients:
            return Outcome("discard", discard=True)  # every recipient deleted: nothing to deliver
        _apply(work, message, changed)
        if changed.quarantine is not None:
            work.quarantine = f"milter {self.address}: {changed.quarantine}"
            return Outcome("quarantine")
        return Outcome("changed")


def milter_stages(config: Config) -> list[MilterStage]:
    return [MilterStage(milter) for milter in config.milter]


def milter_envelope(work: Work) -> MilterEnvelope:
    """The macros Postfix sends (milter_*_macros' defaults) from what the session knows."""
    facts = work.facts
    macros = {"j": facts.hostname, "_": f"unknown [{facts.client_ip}]", "{client_addr}": facts.client_ip,
              "{client_port}": str(facts.client_port), "{client_name}": "unknown",
              "{daemon_name}": facts.hostname, "{daemon_addr}": facts.listener.rpartition(":")[0].strip("[]"),
              "v": MILTER_VERSION, "{mail_addr}": work.envelope.sender}
    if facts.user is not None:
        macros |= {"{auth_authen}": facts.user, "{auth_type}": "PLAIN"}
    if facts.tls:
        version, _, rest = facts.tls.partition(" ")
        macros |= {"{tls_version}": version, "{cipher}": rest.removeprefix("with cipher ").split(" ")[0]}
    return MilterEnvelope(client_name=f"[{facts.client_ip}]", client_address=facts.client_ip,
                          client_port=facts.client_port, helo=facts.helo, macros=macros,
                          queue_id=work.envelope.id)


def _apply(work: Work, before: Message, after: Message) -> None:
    """The milter's changes into the message to store (recipients keep their DSN fields)."""
    if after.headers != before.headers or after.body != before.body:
        work.body = after.content()
    envelope = work.envelope
    envelope.sender = after.sender
    kept = {r.address.casefold(): r for r in envelope.recipients}
    envelope.recipients = [kept.get(address.casefold()) or Recipient(address) for address in after.recipients]


def _reply(result: MilterResult, default: Reply) -> Reply:
    """The milter's own reply when it gave one of the right class, else ours."""
    if result.code // 100 != default.code // 100:
        return default
    status = result.status or f"{result.code // 100}.7.1"
    return Reply(result.code, status, result.text or str(default.text))


def _failed(action: str) -> Outcome:
    if action == "accept":
        return Outcome("failed")
    if action == "reject":
        return Outcome("failed", Decision(replies.CONTENT_REJECTED, "milter"))
    return Outcome("failed", Decision(replies.CONTENT_TEMPFAIL, "milter"))

