"""`mta-sendmail` and `mta sendmail`: the sendmail command line, for cron, PHP mail() and scripts.

Link it as /usr/sbin/sendmail and /usr/bin/mailq (invoked as `mailq` it is -bp, as
`newaliases` -bi). Modes:
    (default, -bm)  read a message on stdin, drop it in the maildrop (mta/maildrop.py),
                    poke the pickup; exit 0 once the file is on disk, server up or down
    -bs             SMTP on stdin/stdout (mta/smtpstdio.py), each message dropped the same way
    -bp             the queue in Postfix mailq's layout (mta/mailq.py)
    -bi             nothing to do (aliases are read by the server): exit 0
Options: -t (recipients from To/Cc/Bcc as well, Bcc removed), -f/-r SENDER, -F NAME,
-i/-oi (a "." line is data), -N NOTIFY, -R RET, -V ENVID (DSN), -C FILE (the
configuration; else $MTA_CONFIG, else /etc/mta/mta.toml when it exists, else the
embedded defaults), -I (= -bi). -od?, -oe? and the other -o options, -B, -e, -h, -L, -O,
-p, -X, -c, -m, -n, -v, -x, -G and -U are accepted and change nothing, as with Postfix;
unknown options are ignored with a warning on stderr, as sendmail does.
Addresses without a domain get @[server] hostname. Exit codes are sysexits.h's.

Injection never needs root, the spool or the configuration's secrets: only the
configuration file's [server] hostname, [queue] and [limits], and write access to the
maildrop's new/ folder, which every local user has.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import secrets
import sys
import time
import traceback
from dataclasses import dataclass, field

from mta import localmail, maildrop
from mta.config import Config, ConfigError
from mta.maildrop import Drop, DropError, DropRecipient
from mta.smtp.content import too_many_received

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER = 0, 64, 65, 67
EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 70, 75, 78
PROG = "mta-sendmail"
_WITH_VALUE = frozenset("BCFLNORVXbefhopr")  # -X VALUE or -XVALUE
_IGNORED = frozenset("GUcmnvx")  # flags that change nothing here
_MODES = {"m": "mail", "s": "smtp", "p": "mailq", "i": "noop"}


class UsageError(Exception):
    """The command line is wrong (EX_USAGE)."""


@dataclass
class Options:
    mode: str = "mail"
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r ("" for <>)
    full_name: str | None = None  # -F
    notify: tuple[str, ...] | None = None  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V
    config: str | None = None  # -C
    recipients: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The console script: argv without the program name; `prog` picks the mode by name."""
    args = sys.argv[1:] if argv is None else argv
    name = os.path.basename(prog if prog is not None else sys.argv[0])
    try:
        return run(args, name)
    except BrokenPipeError:
        return EX_OK if name == "mailq" else EX_TEMPFAIL
    except Exception:  # our bug: say so, with the trace, and with sendmail's code for it
        traceback.print_exc()
        print(f"{PROG}: internal error (the trace above): nothing was sent", file=sys.stderr)
        return EX_SOFTWARE


def run(args: list[str], name: str) -> int:
    try:
        opts = parse(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_USAGE
    if name == "mailq":
        opts.mode = "mailq"
    elif name == "newaliases":
        opts.mode = "noop"
    for warning in opts.warnings:
        print(f"{PROG}: {warning}", file=sys.stderr)
    if opts.mode == "noop":
        return EX_OK
    try:
        cfg = load_config(opts.config)
    except PermissionError as exc:
        return _fail(EX_CONFIG, f"cannot read the configuration {exc.filename}: every user who sends mail must "
                     "(chmod 0644, with no secret in it: docs/operations.md, \"Replacing Postfix on a host\")")
    except (ConfigError, OSError) as exc:
        return _fail(EX_CONFIG, f"configuration: {exc}")
    if opts.mode == "mailq":
        from mta.mailq import run as mailq
        return mailq(cfg)
    if opts.mode == "smtp":
        from mta.smtpstdio import run as smtp
        return smtp(cfg)
    return submit(cfg, opts)


def load_config(explicit: str | None) -> Config:
    """-C, then mta's own discovery order (mta/config.py find())."""
    from mta import config as configmod
    return configmod.load(explicit)


# --- the command line --------------------------------------------------------------------------

def parse(args: list[str]) -> Options:
    """sendmail's options (getopt-like: -ti, -fSENDER or -f SENDER; options and addresses may
    mix; "--" ends the options). UsageError for a wrong value."""
    opts = Options()
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            opts.recipients.extend(rest)
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in _WITH_VALUE:
                value = letters if letters else next(rest, None)
                letters = ""
                if value is None:
                    raise UsageError(f"option -{letter} needs a value")
                _option(opts, letter, value)
            elif letter == "t":
                opts.extract = True
            elif letter == "i":
                opts.ignore_dots = True
            elif letter == "I":  # initialize the alias database: -bi
                opts.mode = "noop"
            elif letter == "q":  # -q[interval]: run the queue
                raise UsageError("-q (run the queue) is not supported here: use `mta queue retry --all`")
            elif letter not in _IGNORED:
                opts.warnings.append(f"ignoring the unknown option -{letter}")
    return opts


def _option(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value.strip().removeprefix("<").removesuffix(">")
    elif letter == "F":
        opts.full_name = value
    elif letter == "C":
        opts.config = value
    elif letter == "b":
        if value not in _MODES:
            raise UsageError(f"-b{value} is not supported (-bm, -bs, -bp and -bi are)")
        opts.mode = _MODES[value]
    elif letter == "o":
        if value == "i":
            opts.ignore_dots = True
        # -od? (delivery mode), -oe? (error mode) and the rest: accepted, nothing to change
    elif letter == "N":
        words = tuple(value.upper().replace(" ", "").split(","))
        if words != ("NEVER",) and not (set(words) <= {"SUCCESS", "FAILURE", "DELAY"} and len(set(words)) == len(words)):
            raise UsageError(f"-N takes never, or success, failure and delay separated by commas, not {value!r}")
        opts.notify = words
    elif letter == "R":
        if value.upper() not in ("FULL", "HDRS"):
            raise UsageError(f"-R takes full or hdrs, not {value!r}")
        opts.ret = value.upper()
    elif letter == "V":
        if not (0 < len(value) <= maildrop.MAX_ENVID and value.isascii() and value.isprintable()):
            raise UsageError(f"-V takes printable ASCII of at most {maildrop.MAX_ENVID} characters")
        opts.envid = value
    # -B, -L, -O, -X, -e, -h, -p: accepted, nothing to change


# --- the default mode: a message on stdin into the maildrop ----------------------------------------

def default_sender(cfg: Config) -> str:
    """The submitting user's address: login name @ [server] hostname."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{cfg.server.hostname}"


def qualify(address: str, hostname: str) -> str:
    """A bare name (root, www-data) as name@hostname, as sendmail and Postfix do."""
    return address if "@" in address else f"{address}@{hostname}"


def submit(cfg: Config, opts: Options) -> int:
    hostname, limit = cfg.server.hostname, cfg.limits.max_message_bytes
    sender = qualify(opts.sender, hostname) if opts.sender else ("" if opts.sender == "" else default_sender(cfg))
    try:
        raw = localmail.read_input(sys.stdin.buffer, opts.ignore_dots, limit)
    except localmail.TooBig:
        return _fail(EX_DATAERR, f"the message is larger than [limits] max_message_bytes ({limit} bytes)")
    done = localmail.complete(raw, sender=sender, full_name=opts.full_name, hostname=hostname, now=time.time(),
                              unique=secrets.token_hex(8), extract=opts.extract)
    if len(done.message) > limit:
        return _fail(EX_DATAERR, f"the message is larger than [limits] max_message_bytes ({limit} bytes)")
    if too_many_received(done.message, cfg.limits.max_received_headers):
        return _fail(EX_DATAERR, f"more than {cfg.limits.max_received_headers} Received fields: a mail loop?")
    try:
        if sender:
            maildrop.check_address(sender, "sender")
    except DropError as exc:
        return _fail(EX_DATAERR, str(exc))
    recipients: list[str] = []
    seen: set[str] = set()
    named: list[str] = []
    for arg in opts.recipients:
        # An argument the parser cannot read whole yields an empty address (how much of it
        # survives differs between Python releases): that is a bad recipient, not none.
        found = [address for _name, address in email.utils.getaddresses([arg])]
        if arg.strip() and (not found or not all(found)):
            return _fail(EX_NOUSER, f"bad recipient address {arg!r}")
        named.extend(found)
    for address in [qualify(a, hostname) for a in named + list(done.recipients)]:
        try:
            maildrop.check_address(address, "recipient")
        except DropError as exc:
            return _fail(EX_NOUSER, str(exc))
        if address.lower() not in seen:
            seen.add(address.lower())
            recipients.append(address)
    if not recipients:
        return _fail(EX_USAGE, "no recipients: name them as arguments, or use -t to take them from To, Cc and Bcc")
    drop = Drop(sender, tuple(DropRecipient(r, opts.notify) for r in recipients), opts.ret, opts.envid)
    return drop_message(cfg, drop, done.message)


def drop_message(cfg: Config, drop: Drop, message: bytes) -> int:
    """Write the file (exit 0 only once it is on disk), then poke the pickup."""
    where = cfg.queue.maildrop_dir
    try:
        maildrop.write(where, drop, message)
    except FileNotFoundError:
        return _fail(EX_TEMPFAIL, f"no maildrop at {where} (config: {cfg.source}): `mta serve` creates it when "
                     "it starts; start it once, or pass the server's configuration with -C FILE")
    except OSError as exc:
        return _fail(EX_TEMPFAIL, f"cannot write to the maildrop {where}: {exc.strerror or exc}")
    maildrop.poke(where)
    return EX_OK


def _fail(code: int, why: str) -> int:
    print(f"{PROG}: {why}", file=sys.stderr)
    return code
