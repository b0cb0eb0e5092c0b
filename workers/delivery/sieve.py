"""A mailbox's Sieve script, run for one recipient of one message: what to do, as a Plan.

The script is `<mailbox>/.dovecot.sieve` (Pigeonhole's name, so the same file works when
delivery moves to Dovecot LMTP; a symbolic link to it is followed). It is parsed by
mta.sieve once per version (cached by path, inode, size and mtime) and evaluated for
each recipient; `plan` turns the actions into a Plan that workers/delivery/localjob.py
carries out. This module reads the script only; it never writes.

Rules where the RFCs leave the choice to us:
- A script that does not parse, is over MAX_SCRIPT_BYTES or cannot be read: the message
  goes to INBOX; the error is logged once per version of the file (`sieve_script_error`).
- A run-time error (mta.sieve's, or one of ours: an impossible folder name, more than
  MAX_REDIRECTS redirects, a redirect of a message that already passed through this
  mailbox, i.e. carries `Delivered-To: <this address>`): INBOX, the error logged with the
  message (`sieve_run_error`), no other action carried out (RFC 5228 2.10.6).
- fileinto into the same folder twice, or keep twice, stores once (RFC 5228 4.1, 4.3).
- reject/ereject: nothing stored; the recipient is refused with 5.7.1 and the reason.
- vacation: `mta.sieve.vacation.vacation_reply` decides whether a reply is due at all
  (<>, lists, Auto-Submitted, the mailbox itself); localjob.py then asks the record
  (vacationlog.py) whether this sender already had one under this :handle within :days.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from mta import logs
from mta.sieve import Context, SieveError, SieveRuntimeError, evaluate, parse
from mta.sieve.actions import Action, Discard, FileInto, Keep, Redirect, Reject, Vacation
from mta.sieve.vacation import Reply, check_vacation, vacation_reply
from workers.delivery.folders import UnsafeFolder, maildir_folder

SCRIPT_NAME = ".dovecot.sieve"
MAX_SCRIPT_BYTES = 1024 * 1024  # Pigeonhole's sieve_max_script_size
MAX_REDIRECTS = 4  # per recipient per message: Pigeonhole's sieve_max_redirects


@dataclass
class Plan:
    """What one recipient's script decided. `folders`: Maildir++ folders to store in, in
    order, each once ("" is INBOX); empty when nothing is stored (discard, reject, only
    redirects). `error`: the script failed; then folders == [""] and nothing else."""
    folders: list[str] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    vacation: Reply | None = None
    reject: str | None = None
    discarded: bool = False
    error: str | None = None
    actions: list[str] = field(default_factory=list)  # for the log line: "fileinto:Work", "redirect:b@x.test"
    vacation_skipped: str | None = None  # why RFC 5230/3834 say no reply (for the log line)


class Refused(Exception):
    """An action delivery will not carry out (a run-time error of ours, RFC 5228 2.10.6)."""


def kept(error: str) -> Plan:
    return Plan(folders=[""], error=error, actions=["keep"])


class _Broken:
    def __init__(self, error: str) -> None:
        self.error = error


class Scripts:
    """Parsed scripts by path, each kept while the file's (inode, size, mtime) stay the same."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[int, int, int], object]] = {}
        self._lock = threading.Lock()  # plans run on the executor's threads

    def load(self, mailbox: str) -> object | _Broken | None:
        """The mailbox's parsed script, a _Broken one, or None when it has none."""
        path = os.path.join(mailbox, SCRIPT_NAME)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _Broken(f"cannot read {path}: {exc.strerror}")
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        script = self._parse(path, st.st_size)
        with self._lock:
            self._cache[path] = (version, script)
        if isinstance(script, _Broken):
            logs.event("sieve_script_error", path=path, error=script.error,
                       action="messages go to INBOX until the script is fixed (check it: mta sieve check FILE)")
        return script

    @staticmethod
    def _parse(path: str, size: int) -> object:
        if size > MAX_SCRIPT_BYTES:
            return _Broken(f"script is {size} bytes, over the {MAX_SCRIPT_BYTES} limit")
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_SCRIPT_BYTES + 1).decode("utf-8")
            return parse(text)
        except OSError as exc:
            return _Broken(f"cannot read it: {exc.strerror}")
        except UnicodeDecodeError as exc:
            return _Broken(f"not UTF-8 at byte {exc.start}")
        except SieveError as exc:
            return _Broken(str(exc))


def plan(scripts: Scripts, mailbox: str, *, sender: str, recipient: str, addresses: tuple[str, ...],
         body: bytes, hostname: str, now: float) -> Plan | None:
    """The recipient's Plan; None when the mailbox has no script (INBOX, as without Sieve)."""
    script = scripts.load(mailbox)
    if script is None:
        return None
    if isinstance(script, _Broken):
        return kept(f"script does not parse: {script.error}")
    try:
        actions = evaluate(script, Context(sender, recipient, body))
    except SieveRuntimeError as exc:
        return kept(str(exc))
    try:
        return _carry(actions, sender=sender, recipient=recipient, addresses=addresses,
                      body=body, hostname=hostname, now=now)
    except (Refused, UnsafeFolder) as exc:
        return kept(str(exc))


def _carry(actions: list[Action], *, sender: str, recipient: str, addresses: tuple[str, ...],
           body: bytes, hostname: str, now: float) -> Plan:
    result = Plan()
    for action in actions:
        match action:
            case Keep():
                _store(result, "", "keep")
            case FileInto(folder=folder):
                _store(result, maildir_folder(folder), f"fileinto:{folder}")
            case Discard():
                result.discarded = True
                result.actions.append("discard")
            case Redirect(address=address):
                _check_redirect(address, recipient, body, len(result.redirects))
                if address.lower() not in (r.lower() for r in result.redirects):
                    result.redirects.append(address)
                    result.actions.append(f"redirect:{address}")
            case Reject(reason=reason):
                result.reject = " ".join(reason.split())
                result.actions.append("reject")
            case Vacation():
                result.vacation = vacation_reply(action, sender, recipient, addresses, body, hostname, now)
                result.actions.append("vacation" if result.vacation else "vacation:not-due")
                if result.vacation is None:
                    result.vacation_skipped = check_vacation(action, sender, recipient, addresses, body)
            case _:
                raise Refused(f"action {type(action).__name__} is not supported in delivery")
    if result.reject is not None:
        result.folders = []  # RFC 5429 2.1: a refused message is not stored
    return result


def _store(result: Plan, folder: str, label: str) -> None:
    if folder not in result.folders:
        result.folders.append(folder)
        result.actions.append(label)


def _check_redirect(address: str, recipient: str, body: bytes, done: int) -> None:
    if done >= MAX_REDIRECTS:
        raise Refused(f"more than {MAX_REDIRECTS} redirects")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in address for c in " <>\r\n\t\0"):
        raise Refused(f"redirect to an invalid address {address!r}")
    if recipient.lower() in delivered_to(body):
        raise Refused(f"mail forwarding loop: the message was redirected from {recipient} before")


def delivered_to(body: bytes) -> set[str]:
    """The (lower-cased) addresses of the message's Delivered-To header fields."""
    end = body.find(b"\r\n\r\n")
    found = set()
    for line in body[: end if end >= 0 else len(body)].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"delivered-to":
            found.add(value.strip().decode("utf-8", "replace").lower())
    return found


