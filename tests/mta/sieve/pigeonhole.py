"""Dovecot's Pigeonhole (sieve-test, Debian dovecot-sieve) as a reference peer: the same
script and message through it and through mta.sieve, each result put in one form.

sieve-test runs as root only by dropping to a mail user, so the private configuration
names `nobody` then, and everything it reads lives in a world-readable folder under /tmp
(pytest's tmp_path is 0700). Without -e it prints what it would do; nothing is sent.
"""

from __future__ import annotations

import os
import pwd
import grp
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mta.sieve import (Context, Discard, FileInto, Keep, Redirect, Reject, SieveError, SieveRuntimeError,
                       Vacation, evaluate, parse)

SIEVE_TEST = "sieve-test"
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
Outcome = tuple[tuple[object, ...], ...]  # sorted actions; (("invalid", line),) or (("error",),)


def missing() -> str | None:
    if shutil.which(SIEVE_TEST, path=PATH) is None:
        return "sieve-test is not installed (Debian dovecot-sieve; `make test-deps` installs it)"
    return None


class Pigeonhole:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mta-pigeonhole-"))
        self.root.chmod(0o777)
        (self.root / "home").mkdir(mode=0o777)
        (self.root / "home").chmod(0o777)
        user, group = _mail_user()
        (self.root / "dovecot.conf").write_text(
            f"mail_uid = {user}\nmail_gid = {group}\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n"
            f"log_path = /dev/stderr\nbase_dir = {self.root}/run\nstate_dir = {self.root}/state\n"
            f"protocols =\nmail_location = maildir:{self.root}/home/Maildir\nmail_home = {self.root}/home\n")
        self._n = 0

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, script: str, message: bytes, envelope_from: str, envelope_to: str) -> Outcome:
        """What sieve-test says the script would do (nothing is carried out)."""
        done = self._sieve_test([], script, message, envelope_from, envelope_to)
        return _outcome(done.returncode, done.stdout + done.stderr, f"s{self._n}")

    def execute(self, script: str, message: bytes, envelope_from: str, envelope_to: str) -> str:
        """sieve-test -e: the actions carried out (a vacation reply is printed, not sent);
        its log."""
        done = self._sieve_test(["-e"], script, message, envelope_from, envelope_to)
        return done.stdout + done.stderr

    def _sieve_test(self, options: list[str], script: str, message: bytes, envelope_from: str,
                    envelope_to: str) -> subprocess.CompletedProcess[str]:
        assert envelope_from, "sieve-test refuses the null sender"
        self._n += 1
        script_path = self.root / f"s{self._n}.sieve"
        message_path = self.root / f"m{self._n}.eml"
        script_path.write_text(script)
        message_path.write_bytes(message)
        for path in (script_path, message_path):
            path.chmod(0o644)
        return subprocess.run(
            [shutil.which(SIEVE_TEST, path=PATH) or SIEVE_TEST, *options, "-c", str(self.root / "dovecot.conf"),
             "-f", envelope_from, "-a", envelope_to, str(script_path), str(message_path)],
            capture_output=True, text=True, timeout=30, check=False,
            env={"HOME": str(self.root / "home"), "PATH": PATH})


def _mail_user() -> tuple[str, str]:
    if os.geteuid() == 0:
        return "nobody", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name


def _outcome(returncode: int, output: str, name: str) -> Outcome:
    if "failed to compile sieve script" in output:
        found = re.search(rf"^{re.escape(name)}: line (\d+): error", output, re.MULTILINE)
        return (("invalid", int(found.group(1)) if found else 0),)
    if "final result: failed" in output:
        return (("error",),)
    assert returncode == 0 and "Performed actions:" in output, output
    actions: list[tuple[object, ...]] = []
    vacation: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith(" * store message in folder: "):
            folder = line.removeprefix(" * store message in folder: ")
            # Dovecot stores "inbox" in INBOX too (IMAP's INBOX is case-insensitive); ours says keep
            actions.append(("keep",) if folder.upper() == "INBOX" else ("fileinto", folder, False))
        elif line.strip() == "+ create mailbox if it does not exist" and actions[-1][0] == "fileinto":
            actions[-1] = (*actions[-1][:2], True)
        elif line.startswith(" * redirect message to: "):
            actions.append(("redirect", line.removeprefix(" * redirect message to: ").strip("<>")))
        elif line.startswith(" * reject message with reason: "):
            actions.append(("reject",))
        elif line == " * discard":
            actions.append(("discard",))
        elif line == " * send vacation message:":
            actions.append(("vacation",))
        elif line.startswith("    => ") and actions and actions[-1][0] == "vacation":
            key, _, value = line.removeprefix("    => ").partition(":")
            vacation[key.strip()] = value.strip()
    if vacation:
        i = actions.index(("vacation",))
        actions[i] = ("vacation", int(vacation["seconds"]) // 86400, vacation.get("subject"), vacation.get("from"))
    return tuple(sorted(set(actions), key=repr))


def ours(script: str, message: bytes, envelope_from: str, envelope_to: str) -> Outcome:
    """mta.sieve's result in the same form."""
    try:
        parsed = parse(script)
    except SieveError as exc:
        return (("invalid", exc.line),)
    try:
        actions = evaluate(parsed, Context(envelope_from, envelope_to, message))
    except SieveRuntimeError:
        return (("error",),)
    out: list[tuple[object, ...]] = []
    for action in actions:
        match action:
            case Keep():
                out.append(("keep",))
            case FileInto(folder=folder, create=create):
                out.append(("fileinto", folder, create))
            case Discard():
                out.append(("discard",))
            case Redirect(address=address):
                out.append(("redirect", address))
            case Reject():
                out.append(("reject",))
            case Vacation(days=days, subject=subject, from_=from_):
                out.append(("vacation", days, subject, from_))
    return tuple(sorted(set(out), key=repr))
