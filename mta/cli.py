"""The `mta` command line: serve, config check, queue list/show/shape/retry/hold/release/delete/check/salvage/
backup/restore/export/import/transfer, node drain/undrain/status, users, mailbox, dkim keygen, sieve check, completion, sendmail.

The parser, and the commands short enough to live here. Every command finds its
configuration the same way (mta/config.py find(): -c, $MTA_CONFIG, /etc/mta/mta.toml,
the embedded defaults); a command marked `needs_spool` refuses to run, naming the
spool and the configuration, when that spool does not exist (a forgotten -c must not
look like an empty queue). Commands that read no configuration set `run`, not `func`.

`mta queue list|show|shape` and
the queue operations are mta/queuecli.py's: they talk to the running server's admin API
([control] listen, with the bearer [control] token, else the token the server keeps in
[control] token_file: mta/admintoken.py) and fall back to the spool when nothing answers
there. `mta queue check|salvage` are mta/queuecheck.py's. `mta users` edits [auth]
users_file (one editor at a time, atomic replace); inbound workers pick the change up at
the next AUTH, with no reload.

`mta queue backup|restore` are mta/queuebackup.py's, `export|import --bsmtp` mta/queueexport.py's
and mta/queueimport.py's, `transfer` mta/queuetransfer.py's, `mta node` mta/nodecli.py's
(each of those modules adds its own parsers); `mta dkim keygen` is mta/dkim/keygen.py's; `mta mailbox` mta/mailboxcli.py's; `mta sieve check`
mta/sieve/check.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mta import config as configmod
from mta import mailboxcli, nodecli, queuebackup, queuecli, queueexport, queueimport, queuepages, queuetransfer, version
from mta.dkim import keygen as dkimkeygen
from mta.sieve import check as sievecheck
from mta.config import Config, ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:  # sendmail's own options, not argparse's (mta/sendmail.py)
        from mta.sendmail import main as sendmail
        return sendmail(argv[1:], prog="sendmail")
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        return int(args.run(args))
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    args.found = configmod.find(args.config)
    try:
        cfg = configmod.read(args.found)
    except ConfigError as exc:
        print(f"mta: configuration error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "needs_spool", False) and (problem := spool_missing(cfg)):
        print(f"mta: {problem}", file=sys.stderr)
        return 1
    return int(args.func(cfg, args))


def spool_missing(cfg: Config) -> str | None:
    """Why a command that reads or changes the queue must not run: its spool directory
    does not exist (mta serve makes it before anything else)."""
    path = os.path.abspath(cfg.queue.path)
    if os.path.isdir(path):
        return None
    return f"no spool at {path} (config: {cfg.source.strip('<>')}): is -c right?"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; also the source of `mta completion bash` and mta(8)."""
    return _parser()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help=f"TOML configuration (default: $MTA_CONFIG, else {configmod.SYSTEM_PATH} "
                             "if it exists, else the embedded defaults)")
    parser = argparse.ArgumentParser(prog="mta", description="A durable SMTP relay.")
    parser.add_argument("--version", action="version", version=f"mta {version()}")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the relay")
    p.set_defaults(func=_serve)

    sub.add_parser("sendmail", add_help=False, help="the sendmail command line (also installed as mta-sendmail: "
                   "link it as /usr/sbin/sendmail and /usr/bin/mailq)")

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate the configuration and exit")
    c.set_defaults(func=_config_check)

    p = sub.add_parser("queue", help="inspect the spool")
    qsub = p.add_subparsers(metavar="ACTION")
    q = qsub.add_parser("list", parents=[common], help="list queued messages, oldest first (streamed)")
    q.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    q.add_argument("--limit", type=_positive, metavar="N", help="at most N messages (default: all)")
    q.add_argument("--domain", metavar="D", help="messages with a queued recipient at destination D")
    q.add_argument("--state", choices=queuepages.STATES,
                   help="messages with a recipient in this state (active: being delivered now)")
    q.add_argument("--sender", metavar="S", help="senders containing S (any case)")
    q.add_argument("--recipient", metavar="S", help="a recipient containing S (any case)")
    q.set_defaults(func=queuecli.run, action=queuecli.queue_list, needs_spool=True)
    q = qsub.add_parser("show", parents=[common], help="show one message")
    q.add_argument("id", metavar="ID", help="the message id")
    q.add_argument("--body", action="store_true", help="write the stored message bytes to stdout")
    q.set_defaults(func=queuecli.run, action=queuecli.queue_show, needs_spool=True)
    q = qsub.add_parser("shape", parents=[common],
                        help="queued messages per destination by age, as Postfix qshape (from the spool's index)")
    q.add_argument("--json", action="store_true", help="JSON instead of the table")
    q.set_defaults(func=queuecli.run, action=queuecli.queue_shape, needs_spool=True)
    q = qsub.add_parser("check", parents=[common], help="check the spool file and its records (exit 1 on a problem)")
    q.set_defaults(func=_queue_check, needs_spool=True)
    q = qsub.add_parser("salvage", parents=[common],
                        help="copy every readable message into a new spool directory (server stopped)")
    q.add_argument("out", metavar="OUT", help="the new spool directory (must not exist or be empty)")
    q.set_defaults(func=_queue_salvage, needs_spool=True)
    queuebackup.add_parsers(qsub, common)  # backup, restore
    queueexport.add_parsers(qsub, common)  # export --bsmtp
    queueimport.add_parsers(qsub, common)  # import --bsmtp
    queuetransfer.add_parsers(qsub, common)  # transfer --to HOST:PORT
    for op, text in (("retry", "deliver deferred recipients now"), ("hold", "stop delivering (until release)"),
                     ("release", "deliver held recipients again"), ("delete", "remove messages from the spool")):
        q = qsub.add_parser(op, parents=[common], help=text)
        which = q.add_mutually_exclusive_group(required=True)
        which.add_argument("ids", nargs="*", metavar="ID", default=[], help="message ids")
        which.add_argument("--domain", help="every message with a queued recipient at this destination")
        which.add_argument("--all", action="store_true", help="every message")
        q.set_defaults(func=queuecli.run, action=queuecli.queue_operation, op=op, needs_spool=True)

    users_common = argparse.ArgumentParser(add_help=False, parents=[common])
    users_common.add_argument("--file", metavar="PATH", help="the users file (default: [auth] users_file)")
    p = sub.add_parser("users", help="manage SMTP AUTH users (passwords are read from the terminal or stdin)")
    usub = p.add_subparsers(metavar="ACTION")
    u = usub.add_parser("add", parents=[users_common], help="add a user")
    u.add_argument("name", metavar="NAME", help="the user name")
    u.add_argument("--sender", action="append", default=[], metavar="ADDR_OR_@DOMAIN",
                   help="an address or @domain the user may send from (repeat; default: the name itself)")
    u.set_defaults(func=_users, action=_users_add)
    u = usub.add_parser("passwd", parents=[users_common], help="set a user's password")
    u.add_argument("name", metavar="NAME", help="the user name")
    u.set_defaults(func=_users, action=_users_passwd)
    u = usub.add_parser("delete", parents=[users_common], help="delete a user")
    u.add_argument("name", metavar="NAME", help="the user name")
    u.set_defaults(func=_users, action=_users_delete)
    u = usub.add_parser("list", parents=[users_common], help="list users and their senders (never hashes)")
    u.add_argument("--json", action="store_true", help="one JSON array instead of lines")
    u.set_defaults(func=_users, action=_users_list)

    mailboxcli.add_parsers(sub, common)  # mailbox add|delete|list|quota
    nodecli.add_parsers(sub, common)  # node drain|undrain|status
    dkimkeygen.add_parsers(sub)  # dkim keygen
    sievecheck.add_parsers(sub)  # sieve check

    p = sub.add_parser("completion", help="print a shell completion script (reads no configuration)")
    p.add_argument("shell", choices=("bash",), help="the shell: bash")
    p.set_defaults(run=_completion)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from mta.master.listeners import ServeError
    from mta.serve import serve
    try:
        return serve(cfg, found_by=args.found.how)
    except ServeError as exc:
        print(f"mta: {exc}", file=sys.stderr)
        return 1


def _queue_check(cfg: Config, args: argparse.Namespace) -> int:
    from mta.queuecheck import run_check
    return run_check(cfg)


def _queue_salvage(cfg: Config, args: argparse.Namespace) -> int:
    from mta.queuecheck import run_salvage
    return run_salvage(cfg, args.out)


def _config_check(cfg: Config, args: argparse.Namespace) -> int:
    from mta.aliases import AliasError, Aliases
    from mta.tls import TlsError, control_context, server_context
    try:
        server_context(cfg.tls)
        control_context(cfg.control)
    except TlsError as exc:
        print(f"mta: configuration error: {exc}", file=sys.stderr)
        return 2
    if cfg.local.aliases:
        try:
            aliases = Aliases.load(cfg.local.aliases)
        except (AliasError, OSError) as exc:
            print(f"mta: configuration error: [local] aliases: {exc}", file=sys.stderr)
            return 2
        print(f"aliases OK: {len(aliases)} in {cfg.local.aliases}")
    if cfg.local.mailboxes:
        from mta.mailboxfile import MailboxFileError, load_mailboxes
        try:
            mailboxes = load_mailboxes(cfg.local.mailboxes)
        except (MailboxFileError, OSError) as exc:
            print(f"mta: configuration error: [local] mailboxes: {exc}", file=sys.stderr)
            return 2
        print(f"mailboxes OK: {len(mailboxes)} in {cfg.local.mailboxes}")
    print(f"configuration OK: {cfg.source.strip('<>')} ({args.found.why})")
    return 0


def _completion(args: argparse.Namespace) -> int:
    from mta.completion import bash_script
    sys.stdout.write(bash_script(build_parser()))
    return 0


# --- users -------------------------------------------------------------------------------

def _users(cfg: Config, args: argparse.Namespace) -> int:
    from mta.users import UsersError
    path = args.file or cfg.auth.users_file
    if not path:
        print("mta users: no users file: set [auth] users_file in the configuration (-c FILE) "
              "or pass --file PATH", file=sys.stderr)
        return 2
    try:
        return int(args.action(path, args))
    except (UsersError, OSError) as exc:
        print(f"mta users: {exc}", file=sys.stderr)
        return 1


def _users_add(path: str, args: argparse.Namespace) -> int:
    from mta import users
    users.check_name(args.name)
    for entry in args.sender:
        users.check_sender(entry)
    users.require(path, _users_now(path), args.name, exists=False)  # before the password is asked
    password = _read_password()
    if password is None:
        return 1
    users.add_user(path, users.User(args.name, users.hash_password(password), tuple(args.sender)))
    print(f"mta users: added {args.name} to {path}", file=sys.stderr)
    return 0


def _users_passwd(path: str, args: argparse.Namespace) -> int:
    from mta import users
    users.require(path, _users_now(path), args.name, exists=True)
    password = _read_password()
    if password is None:
        return 1
    users.set_password(path, args.name, users.hash_password(password))
    print(f"mta users: changed the password of {args.name} in {path}", file=sys.stderr)
    return 0


def _users_delete(path: str, args: argparse.Namespace) -> int:
    from mta import users
    users.delete_user(path, args.name)
    print(f"mta users: deleted {args.name} from {path}", file=sys.stderr)
    return 0


def _users_list(path: str, args: argparse.Namespace) -> int:
    from mta import users
    table = _users_now(path)
    if args.json:
        json.dump([{"name": u.name, "senders": list(u.senders)} for u in table.values()], sys.stdout, indent=1)
        print()
        return 0
    for u in table.values():
        print(f"{u.name}  {', '.join(u.may_send_as) or '(no sender address)'}")
    print(f"-- {len(table)} user(s) in {path}", file=sys.stderr)
    return 0


def _users_now(path: str) -> dict[str, Any]:
    """The users of `path` now (a missing file has none)."""
    from mta import users
    try:
        return users.load_users(path)
    except FileNotFoundError:
        return {}


def _read_password() -> str | None:
    """A new password: asked twice on a terminal, else one line of stdin. Never from argv, never echoed."""
    import getpass
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("New password: ")
            if getpass.getpass("Again: ") != password:
                print("mta users: the passwords differ", file=sys.stderr)
                return None
        else:
            password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    except (EOFError, KeyboardInterrupt):
        print("mta users: no password given", file=sys.stderr)
        return None
    if not password or "\0" in password:
        print("mta users: the password must not be empty or contain NUL", file=sys.stderr)
        return None
    return password
