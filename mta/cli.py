"""The `mta` command line: serve, config check, queue list/show/retry/hold/release/delete/check/salvage, users.

`mta queue` talks to the running server's admin API ([control] listen, with the bearer
[control] token, else the token the server keeps in [control] token_file: mta/admintoken.py),
so changes take effect at once in the scheduler. When nothing answers
there (the server is stopped, or its control process is not up yet) it does what it did
before the API: reads the spool directly (LMDB allows readers across processes) and
sends changes to the scheduler's socket, or applies them to the spool when that does not
answer either. A refused or unreadable token fails the command, naming [control] token. `mta users` edits [auth] users_file (one editor at a time, atomic
replace); inbound workers pick the change up at the next AUTH, with no reload.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import typing
import urllib.parse
from typing import Any

from mta import config as configmod
from mta import admintoken, frames, messages, queueops, queueview
from mta.config import Config, ConfigError, split_hostport

CONTROL_CONNECT_SECONDS = 5.0  # nothing accepts on [control] listen by then: the server is stopped
CONTROL_ANSWER_SECONDS = 120.0  # a listing of a large queue takes a while


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        cfg = configmod.load(args.config)
    except ConfigError as exc:
        print(f"mta: configuration error: {exc}", file=sys.stderr)
        return 2
    return int(args.func(cfg, args))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help="TOML configuration (default: $MTA_CONFIG, else the embedded defaults)")
    parser = argparse.ArgumentParser(prog="mta", description="A durable SMTP relay.")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the relay")
    p.set_defaults(func=_serve)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate the configuration and exit")
    c.set_defaults(func=_config_check)

    p = sub.add_parser("queue", help="inspect the spool")
    qsub = p.add_subparsers(metavar="ACTION")
    q = qsub.add_parser("list", parents=[common], help="list queued messages")
    q.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    q.set_defaults(func=_queue, action=_queue_list)
    q = qsub.add_parser("show", parents=[common], help="show one message")
    q.add_argument("id")
    q.add_argument("--body", action="store_true", help="write the stored message bytes to stdout")
    q.set_defaults(func=_queue, action=_queue_show)
    q = qsub.add_parser("check", parents=[common], help="check the spool file and its records (exit 1 on a problem)")
    q.set_defaults(func=_queue_check)
    q = qsub.add_parser("salvage", parents=[common],
                        help="copy every readable message into a new spool directory (server stopped)")
    q.add_argument("out", metavar="OUT", help="the new spool directory (must not exist or be empty)")
    q.set_defaults(func=_queue_salvage)
    for op, text in (("retry", "deliver deferred recipients now"), ("hold", "stop delivering (until release)"),
                     ("release", "deliver held recipients again"), ("delete", "remove messages from the spool")):
        q = qsub.add_parser(op, parents=[common], help=text)
        which = q.add_mutually_exclusive_group(required=True)
        which.add_argument("ids", nargs="*", metavar="ID", default=[])
        which.add_argument("--domain", help="every message with a recipient in this domain")
        which.add_argument("--all", action="store_true", help="every message")
        q.set_defaults(func=_queue, action=_queue_operation, op=op)

    users_common = argparse.ArgumentParser(add_help=False, parents=[common])
    users_common.add_argument("--file", metavar="PATH", help="the users file (default: [auth] users_file)")
    p = sub.add_parser("users", help="manage SMTP AUTH users (passwords are read from the terminal or stdin)")
    usub = p.add_subparsers(metavar="ACTION")
    u = usub.add_parser("add", parents=[users_common], help="add a user")
    u.add_argument("name")
    u.add_argument("--sender", action="append", default=[], metavar="ADDR_OR_@DOMAIN",
                   help="an address or @domain the user may send from (repeat; default: the name itself)")
    u.set_defaults(func=_users, action=_users_add)
    u = usub.add_parser("passwd", parents=[users_common], help="set a user's password")
    u.add_argument("name")
    u.set_defaults(func=_users, action=_users_passwd)
    u = usub.add_parser("delete", parents=[users_common], help="delete a user")
    u.add_argument("name")
    u.set_defaults(func=_users, action=_users_delete)
    u = usub.add_parser("list", parents=[users_common], help="list users and their senders (never hashes)")
    u.add_argument("--json", action="store_true", help="one JSON array instead of lines")
    u.set_defaults(func=_users, action=_users_list)
    return parser


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from mta.master.listeners import ServeError
    from mta.serve import serve
    try:
        return serve(cfg)
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
    from mta.tls import TlsError, server_context
    try:
        server_context(cfg.tls)
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
    print(f"configuration OK: {cfg.source}")
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
    _users_require(path, args.name, exists=False)
    password = _read_password()
    if password is None:
        return 1
    user = users.User(args.name, users.hash_password(password), tuple(args.sender))
    with users.edit_users(path) as table:
        _users_require(path, args.name, exists=False, table=table)
        table[args.name] = user
    print(f"mta users: added {args.name} to {path}", file=sys.stderr)
    return 0


def _users_passwd(path: str, args: argparse.Namespace) -> int:
    from mta import users
    _users_require(path, args.name, exists=True)
    password = _read_password()
    if password is None:
        return 1
    new_hash = users.hash_password(password)
    with users.edit_users(path) as table:
        _users_require(path, args.name, exists=True, table=table)
        table[args.name] = users.User(args.name, new_hash, table[args.name].senders)
    print(f"mta users: changed the password of {args.name} in {path}", file=sys.stderr)
    return 0


def _users_delete(path: str, args: argparse.Namespace) -> int:
    from mta import users
    with users.edit_users(path) as table:
        _users_require(path, args.name, exists=True, table=table)
        del table[args.name]
    print(f"mta users: deleted {args.name} from {path}", file=sys.stderr)
    return 0


def _users_list(path: str, args: argparse.Namespace) -> int:
    from mta import users
    try:
        table = users.load_users(path)
    except FileNotFoundError:
        table = {}
    if args.json:
        json.dump([{"name": u.name, "senders": list(u.senders)} for u in table.values()], sys.stdout, indent=1)
        print()
        return 0
    for u in table.values():
        print(f"{u.name}  {', '.join(u.may_send_as) or '(no sender address)'}")
    print(f"-- {len(table)} user(s) in {path}", file=sys.stderr)
    return 0


def _users_require(path: str, name: str, *, exists: bool, table: dict[str, Any] | None = None) -> None:
    """Refuse (UsersError: exit 1) unless `name` exists, or does not, in `table` (default: the file now)."""
    from mta import users
    if table is None:
        try:
            table = users.load_users(path)
        except FileNotFoundError:
            table = {}
    if exists and name not in table:
        raise users.UsersError(f"no user {name} in {path}")
    if not exists and name in table:
        raise users.UsersError(f"user {name} exists, use `mta users passwd {name}`")


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


def _open_spool(cfg: Config):  # type: ignore[no-untyped-def]
    from mta.spool import open_spool
    if not os.path.isdir(cfg.queue.path):
        return None
    return open_spool(cfg.queue)


_Answer = typing.TypeVar("_Answer", bound=messages.Message)


class ControlError(Exception):
    """The admin API answered, but not with what the command needs (or broke off)."""


def _queue(cfg: Config, args: argparse.Namespace) -> int:
    try:
        return int(args.action(cfg, args))
    except ControlError as exc:
        print(f"mta queue: {exc}", file=sys.stderr)
        return 1


def _queue_list(cfg: Config, args: argparse.Namespace) -> int:
    answer = _ask_control(cfg, "GET", "/api/queue", expect=(200,))
    if answer is not None:
        entries = json.loads(answer[1])
    else:  # the server is stopped: the spool itself
        spool = _open_spool(cfg)
        envelopes = list(spool.envelopes()) if spool is not None else []
        active = _ask_scheduler(cfg, messages.ActiveQuery(), messages.ActiveJobs)
        queueview.mark_active(envelopes, active.active if active is not None else {})
        entries = [queueview.envelope_json(e) for e in envelopes]
    if args.json:
        json.dump(entries, sys.stdout, indent=1)
        print()
        return 0
    if not entries:
        print(f"queue is empty ({cfg.queue.path})")
        return 0
    print(f"{'ID':21}  {'ARRIVAL (UTC)':19}  {'SIZE':>9}  SENDER / RECIPIENTS")
    for e in entries:  # the envelope_json form: times are ISO strings already
        deferred = any(r["state"] == "deferred" for r in e["recipients"])
        retry = f"  next attempt {e['next_attempt'][:19]}" if deferred else ""
        print(f"{e['id']:21}  {e['arrival'][:19]:19}  {e['size']:>9}  <{e['sender']}>{retry}")
        for r in e["recipients"]:
            print(f"{'':55}  {r['state']:9} <{r['address']}>  attempts={r['attempts']}")
            if r["last_reply"]:
                print(f"{'':66}{r['last_reply']}")
    print(f"-- {len(entries)} message(s), {sum(e['size'] for e in entries)} bytes")
    return 0


def _queue_show(cfg: Config, args: argparse.Namespace) -> int:
    from mtaqueue.ids import MessageId, is_id
    path = f"/api/queue/{urllib.parse.quote(args.id, safe='')}" + ("/body" if args.body else "")
    answer = _ask_control(cfg, "GET", path, expect=(200, 404))
    found: Any = None
    if answer is not None:
        if answer[0] == 200:
            found = answer[1] if args.body else json.loads(answer[1])
    else:  # the server is stopped: the spool itself
        spool = _open_spool(cfg)
        msgid = MessageId(args.id.upper())
        envelope = spool.envelope(msgid) if spool is not None and is_id(msgid) else None
        if envelope is not None:
            found = (spool.body(msgid) or b"") if args.body else queueview.envelope_json(envelope)
    if found is None:
        print(f"mta: no message {args.id} in {cfg.queue.path}", file=sys.stderr)
        return 1
    if args.body:
        sys.stdout.buffer.write(found)
        sys.stdout.buffer.flush()
        return 0
    json.dump(found, sys.stdout, indent=1)
    print()
    return 0


def _queue_operation(cfg: Config, args: argparse.Namespace) -> int:
    if not (args.ids or args.domain or args.all):
        print(f"mta: queue {args.op}: name message IDs, --domain D or --all", file=sys.stderr)
        return 2
    which = {"ids": [i.upper() for i in args.ids], "domain": args.domain, "all": args.all}
    command = messages.QueueCommand(typing.cast(messages.QueueOp, args.op), tuple(which["ids"]),
                                    args.domain, args.all)
    via_api = _ask_control(cfg, "POST", f"/api/queue/{args.op}", which, expect=(200, 503))
    count: int | None = None
    if via_api is not None and via_api[0] == 200:
        count = json.loads(via_api[1])["count"]
    else:  # stopped, or 503 (the control process runs, the scheduler not yet): as before the API
        result = _ask_scheduler(cfg, command, messages.CommandResult)
        count = result.count if result is not None else None
    if count is not None:
        print(f"{args.op}: {count} message(s) (applied by the running scheduler)")
        return 0 if count or not args.ids else 1
    count = _apply_offline(cfg, command)
    print(f"{args.op}: {count} message(s) (server not running: applied to the spool)")
    return 0 if count or not args.ids else 1


def _apply_offline(cfg: Config, command: messages.QueueCommand) -> int:
    """The running scheduler's rules (mta/queueops.py), applied to the spool itself."""
    spool = _open_spool(cfg)
    if spool is None:
        return 0
    chosen = queueops.select(command, {e.id: e for e in spool.envelopes()})
    if command.op == "delete":
        return spool.delete([e.id for e in chosen])
    now = time.time()
    changed = [e for e in chosen if queueops.change(command.op, e, now)]
    spool.apply(update=changed)
    return len(chosen)


def _ask_control(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None, *,
                 expect: tuple[int, ...]) -> tuple[int, bytes] | None:
    """One request to the running server's admin API: (status, body), or None when nothing
    accepts on [control] listen (the server is stopped). ControlError for a refused token,
    a status not in `expect`, or a connection that broke off."""
    host, port = split_hostport(cfg.control.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard listener: ask it on loopback
    where = f"the admin API on [control] listen {cfg.control.listen}"
    conn = http.client.HTTPConnection(host, port, timeout=CONTROL_CONNECT_SECONDS)
    try:
        conn.connect()
    except OSError:
        conn.close()
        return None
    headers = {"Content-Type": "application/json"}
    try:
        token = admintoken.read(cfg)
    except (OSError, admintoken.TokenError) as exc:
        conn.close()
        raise ControlError(f"cannot read the token of {where}: {exc}: run this as the user mta runs as "
                           "(or root), or set [control] token") from None
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        assert conn.sock is not None
        conn.sock.settimeout(CONTROL_ANSWER_SECONDS)
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        response = conn.getresponse()
        status, data = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ControlError(f"{where} did not answer {method} {path}: {exc}") from exc
    finally:
        conn.close()
    if status == 401:
        given = (f"the [control] token of {cfg.source}" if cfg.control.token else
                 f"the token in {admintoken.path(cfg)}" if token is not None else
                 f"no token (no [control] token in {cfg.source}, no file {admintoken.path(cfg)})")
        raise ControlError(f"{where} refused {given}: set [control] token to the running server's token")
    if status not in expect:
        raise ControlError(f"{where} answered {method} {path} with {status}: {data[:200].decode('utf-8', 'replace')}")
    return status, data


def _ask_scheduler(cfg: Config, question: messages.Message, answer: type[_Answer]) -> _Answer | None:
    """One question to the running scheduler: its answer; None when it is not running.
    ControlError when it speaks another build's messages or does not answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(cfg.queue.scheduler_socket)
    except OSError:
        sock.close()
        return None
    with sock:
        try:
            sock.sendall(frames.encode_stream_frame(messages.hello("cli")) + frames.encode_stream_frame(question))
            hello = frames.recv_stream_frame(sock)  # one of another build is refused here
            if not isinstance(hello, messages.Hello):
                raise messages.unexpected(hello, "before a Hello")
            got = frames.recv_stream_frame(sock)
            if not isinstance(got, answer):
                raise messages.unexpected(got, f"for a {type(question).__name__}")
        except (ConnectionError, messages.MessageError) as exc:
            raise ControlError(f"the scheduler at {cfg.queue.scheduler_socket}: {exc}") from None
        return got
