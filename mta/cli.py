"""The `mta` command line: serve, config check, queue list/show/delete.

Queue commands read the spool directly, so they work whether or not the server runs
(LMDB allows readers and one writer across processes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

from mta import config as configmod
from mta.config import Config, ConfigError


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
    q.set_defaults(func=_queue_list)
    q = qsub.add_parser("show", parents=[common], help="show one message")
    q.add_argument("id")
    q.add_argument("--body", action="store_true", help="write the stored message bytes to stdout")
    q.set_defaults(func=_queue_show)
    q = qsub.add_parser("delete", parents=[common], help="delete messages from the spool")
    q.add_argument("ids", nargs="+", metavar="ID")
    q.set_defaults(func=_queue_delete)
    return parser


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from mta.serve import ServeError, serve
    try:
        return serve(cfg)
    except ServeError as exc:
        print(f"mta: {exc}", file=sys.stderr)
        return 1


def _config_check(cfg: Config, args: argparse.Namespace) -> int:
    print(f"configuration OK: {cfg.source}")
    return 0


def _open_spool(cfg: Config):  # type: ignore[no-untyped-def]
    from mtaqueue.backend_lmdb import LmdbBackend
    if not os.path.isdir(cfg.queue.path):
        return None
    return LmdbBackend(cfg.queue.path, cfg.queue.max_size_bytes)


def _queue_list(cfg: Config, args: argparse.Namespace) -> int:
    spool = _open_spool(cfg)
    envelopes = list(spool.envelopes()) if spool is not None else []
    if args.json:
        json.dump([_envelope_json(e) for e in envelopes], sys.stdout, indent=1)
        print()
        return 0
    if not envelopes:
        print(f"queue is empty ({cfg.queue.path})")
        return 0
    print(f"{'ID':21}  {'ARRIVAL (UTC)':19}  {'SIZE':>9}  SENDER / RECIPIENTS")
    for e in envelopes:
        print(f"{e.id:21}  {_iso(e.arrival)[:19]:19}  {e.size:>9}  <{e.sender}>")
        for r in e.recipients:
            print(f"{'':55}  {r.state:9} <{r.address}>")
    print(f"-- {len(envelopes)} message(s), {sum(e.size for e in envelopes)} bytes")
    return 0


def _queue_show(cfg: Config, args: argparse.Namespace) -> int:
    from mtaqueue.ids import MessageId
    spool = _open_spool(cfg)
    msgid = MessageId(args.id.upper())
    envelope = spool.envelope(msgid) if spool is not None else None
    if envelope is None:
        print(f"mta: no message {args.id} in {cfg.queue.path}", file=sys.stderr)
        return 1
    if args.body:
        body = spool.body(msgid)
        sys.stdout.buffer.write(body or b"")
        sys.stdout.buffer.flush()
        return 0
    json.dump(_envelope_json(envelope), sys.stdout, indent=1)
    print()
    return 0


def _queue_delete(cfg: Config, args: argparse.Namespace) -> int:
    from mtaqueue.ids import MessageId
    spool = _open_spool(cfg)
    removed = spool.delete([MessageId(i.upper()) for i in args.ids]) if spool is not None else 0
    print(f"deleted {removed} of {len(args.ids)} message(s)")
    return 0 if removed == len(args.ids) else 1


def _envelope_json(e: Any) -> dict[str, Any]:
    return {
        "id": e.id, "sender": e.sender, "size": e.size, "arrival": _iso(e.arrival),
        "next_attempt": _iso(e.next_attempt), "attempts": e.attempts, "priority": e.priority,
        "ret": e.ret, "envid": e.envid, "body": e.body_type, "smtputf8": e.smtputf8,
        "client": e.client,
        "recipients": [{"address": r.address, "state": r.state, "attempts": r.attempts,
                        "last_reply": r.last_reply, "notify": list(r.notify) if r.notify else None,
                        "orcpt": r.orcpt} for r in e.recipients],
    }


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
