"""Validation of the content pipeline's tables: [[milter]], [[dkim]], [content], [antivirus], [[footer]].

Called by config.py's checks with its `fail(key, why)`; every message names the key and
says what a valid value looks like. A stage's `listeners` must name configured listeners
(a typo would otherwise switch the stage off silently); footers and DKIM may also
name "maildrop", the mail picked up from mta-sendmail.
"""

from __future__ import annotations

from collections.abc import Callable

from mta.content.clamd import ClamdAddress
from mta.dkim.fields import check_names
from mta.milter.client import MilterAddress
from mta.sections import MILTER_ACTIONS, SCAN_ERROR_ACTIONS, TNEF_MODES, VIRUS_ACTIONS, Config

Fail = Callable[[str, str], None]


def check(config: Config, fail: Fail) -> None:
    known = {lst.address.lower() for lst in config.listener}

    def listeners(key: str, names: tuple[str, ...], local: bool = False) -> None:
        """`local`: the stage may also name "maildrop" (mail picked up from mta-sendmail)."""
        for name in names:
            if name == "maildrop" and local:
                continue
            if name not in known:
                also = ' and "maildrop"' if local else " (mail from mta-sendmail gets only footers and DKIM)"
                fail(f"{key} listeners", f"{name!r} is not a configured listener "
                                         f"(configured: {', '.join(sorted(known))}{also})")

    def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")

    for i, milter in enumerate(config.milter):
        key = f"[[milter]] #{i + 1}"
        try:
            MilterAddress.parse(milter.address)
        except ValueError as exc:
            fail(f"{key} address", str(exc))
        one_of(f"{key} default_action", milter.default_action, MILTER_ACTIONS)
        if milter.timeout_seconds <= 0:
            fail(f"{key} timeout_seconds", "must be > 0")
        listeners(key, milter.listeners)
    for i, dkim in enumerate(config.dkim):
        key = f"[[dkim]] #{i + 1}"
        for name in ("domain", "selector", "key_file"):
            if not getattr(dkim, name):
                fail(f"{key} {name}", "is required")
        try:
            check_names(dkim.headers)
        except ValueError as exc:
            fail(f"{key} headers", str(exc))
        # Imported here: loading cryptography costs every `mta` command that reads the config.
        from mta.dkim.keys import DkimKey, DkimKeyError
        try:
            DkimKey.load(dkim.domain, dkim.selector, dkim.key_file)  # a bad key stops a start or a reload
        except DkimKeyError as exc:
            fail(key, str(exc))
        listeners(key, dkim.listeners, local=True)
    content = config.content
    for ext in content.reject_attachment_extensions:
        if not ext or "." in ext or "/" in ext:
            fail("[content] reject_attachment_extensions", f'an extension is a name without its dot (e.g. "exe"), '
                                                           f"got {ext!r}")
    one_of("[content] tnef", content.tnef, TNEF_MODES)
    listeners("[content]", content.listeners)
    av = config.antivirus
    if av.clamd:
        try:
            ClamdAddress.parse(av.clamd)
        except ValueError as exc:
            fail("[antivirus] clamd", str(exc))
    one_of("[antivirus] on_virus", av.on_virus, VIRUS_ACTIONS)
    one_of("[antivirus] on_error", av.on_error, SCAN_ERROR_ACTIONS)
    if av.timeout_seconds <= 0:
        fail("[antivirus] timeout_seconds", "must be > 0")
    listeners("[antivirus]", av.listeners)
    for i, footer in enumerate(config.footer):
        key = f"[[footer]] #{i + 1}"
        if not footer.sender_domain:
            fail(f"{key} sender_domain", 'is required (a domain, or "*" for every sender)')
        if not footer.text:
            fail(f"{key} text", "is required")
        listeners(key, footer.listeners, local=True)
