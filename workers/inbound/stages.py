"""The content pipeline's stages in pipeline order, and the stages that are not milters.

    attachments and TNEF -> antivirus -> milters -> footers -> DKIM   (content.py says why)

Each kind is a thin adapter from its config table to its library: the pure functions of
mta/content/ (attachments, TNEF, footers), the clamd client, mta/dkim's signer. The
milter stage is milterstage.py.
"""

from __future__ import annotations

from mta import logs
from mta.config import AntivirusConfig, Config, ContentConfig, DkimConfig, FooterConfig
from mta.content.attachments import TOO_MANY_PARTS, forbidden_attachment
from mta.content.clamd import ClamdAddress, ClamdFailed, scan
from mta.content.footer import add_footer
from mta.content.tnefconvert import convert_tnef
from mta.dkim.fields import from_domain
from mta.dkim.keys import DkimKey
from mta.dkim.signer import sign
from mta.smtp import replies
from workers.inbound.content import Outcome, Stage, StageFactory, Work, off_loop
from workers.inbound.decision import Decision
from workers.inbound.milterstage import milter_stages


class AttachmentStage(Stage):
    """[content]: refuse a forbidden attachment type (554 5.7.1 naming it); convert TNEF."""

    name = "attachments"

    def __init__(self, config: ContentConfig) -> None:
        super().__init__(config.listeners)
        self.extensions = frozenset(ext.lower() for ext in config.reject_attachment_extensions)
        self.convert_tnef = config.tnef == "convert"

    async def __call__(self, work: Work) -> Outcome:
        if self.extensions:
            name = await off_loop(len(work.body), forbidden_attachment, work.body, self.extensions)
            if name is not None:
                reply = replies.TOO_MANY_PARTS if name == TOO_MANY_PARTS else replies.attachment_refused(name)
                return Outcome("reject", Decision(reply, "attachment"))
        if self.convert_tnef:
            converted = await off_loop(len(work.body), convert_tnef, work.body)
            if converted is not None and converted != work.body:  # (the same bytes: no TNEF part parsed)
                work.body = converted
                return Outcome("converted")
        return Outcome("pass")


class AntivirusStage(Stage):
    """[antivirus]: clamd's verdict; on_virus reject (554 5.7.1) or quarantine; on_error
    tempfail (451 4.7.1) or accept (logged)."""

    name = "antivirus"

    def __init__(self, config: AntivirusConfig) -> None:
        super().__init__(config.listeners)
        self.address = ClamdAddress.parse(config.clamd)
        self.config = config

    async def __call__(self, work: Work) -> Outcome:
        try:
            result = await scan(self.address, work.body, self.config.timeout_seconds)
        except ClamdFailed as exc:
            logs.event("antivirus_failed", msgid=work.envelope.id, clamd=self.config.clamd, error=str(exc),
                       action=self.config.on_error)
            if self.config.on_error == "accept":
                return Outcome("failed")
            return Outcome("failed", Decision(replies.VIRUS_SCAN_FAILED, "antivirus"))
        if result.virus is None:
            return Outcome("clean")
        if self.config.on_virus == "quarantine":
            work.quarantine = f"antivirus: {result.virus}"
            return Outcome("quarantine")
        return Outcome("virus", Decision(replies.virus_found(result.virus), "virus"))


class FooterStage(Stage):
    """[[footer]]: the text (and html) appended for senders of its domain, once per message."""

    name = "footer"
    local = True

    def __init__(self, config: FooterConfig) -> None:
        super().__init__(config.listeners)
        self.domain = config.sender_domain.lower().rstrip(".")
        self.text, self.html = config.text, config.html or None

    async def __call__(self, work: Work) -> Outcome:
        domain = work.envelope.sender.rpartition("@")[2].lower().rstrip(".")
        if self.domain != "*" and domain != self.domain:
            return Outcome("skipped")
        footed = await off_loop(len(work.body), add_footer, work.body, self.text, self.html)
        if footed is None:
            return Outcome("skipped")
        work.body = footed
        return Outcome("added")


class DkimStage(Stage):
    """[[dkim]]: sign mail whose From: domain the key covers; the first covering entry signs."""

    name = "dkim"
    local = True

    def __init__(self, config: DkimConfig) -> None:
        super().__init__(config.listeners)
        self.key = DkimKey.load(config.domain, config.selector, config.key_file)
        self.headers = config.headers or None
        self.subdomains = config.subdomains

    async def __call__(self, work: Work) -> Outcome:
        if work.signed:
            return Outcome("skipped")
        domain = from_domain(work.body)
        if domain is None or not self.key.covers(domain, self.subdomains):
            return Outcome("skipped")
        work.body = await off_loop(len(work.body), sign, work.body, self.key, self.headers) + work.body
        work.signed = True
        return Outcome("signed")


def content_stages(config: Config) -> list[AttachmentStage]:
    content = config.content
    return [AttachmentStage(content)] if content.reject_attachment_extensions or content.tnef != "keep" else []


def antivirus_stages(config: Config) -> list[AntivirusStage]:
    return [AntivirusStage(config.antivirus)] if config.antivirus.clamd else []


def footer_stages(config: Config) -> list[FooterStage]:
    return [FooterStage(footer) for footer in config.footer]


def dkim_stages(config: Config) -> list[DkimStage]:
    return [DkimStage(dkim) for dkim in config.dkim]


STAGES: tuple[StageFactory, ...] = (content_stages, antivirus_stages, milter_stages, footer_stages, dkim_stages)
