"""`mta mailbox add|delete|list|quota`: the virtual mailboxes file ([local] mailboxes) and usage.

Edits go through mta/mailboxfile.py's `edit_mailboxes` (one editor at a time, atomic
replace); the running server sees them at its next lookup, with no reload. `delete`
removes the line only: the mailbox's directory and mail stay for the operator to archive
or remove. Usage comes from the mailbox's maildirsize (mta/quota.py), counted afresh
when the file cannot be trusted, never written here.
"""

from __future__ import annotations

import argparse
import json
import sys

from mta import quota
from mta.config import Config
from mta.mailboxes import mailbox_path
from mta.mailboxfile import Mailbox, MailboxFileError, add_mailbox, check_address, delete_mailbox, load_mailboxes


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    shared = argparse.ArgumentParser(add_help=False, parents=[common])
    shared.add_argument("--file", metavar="PATH", help="the mailboxes file (default: [local] mailboxes)")
    p = sub.add_parser("mailbox", help="manage virtual mailboxes, their quotas and aliases")
    msub = p.add_subparsers(metavar="ACTION")
    m = msub.add_parser("add", parents=[shared], help="add a mailbox (its folder is made at its first delivery)")
    m.add_argument("address", metavar="ADDRESS", help="user@domain")
    m.add_argument("--quota-bytes", type=_count, default=0, metavar="N", help="storage limit in bytes (0: none)")
    m.add_argument("--quota-messages", type=_count, default=0, metavar="N", help="message limit (0: none)")
    m.add_argument("--aliases", default="", metavar="A,B", help="other addresses, any local domain, delivered here")
    m.set_defaults(func=run, action=mailbox_add)
    m = msub.add_parser("delete", parents=[shared], help="remove a mailbox from the file (its mail stays on disk)")
    m.add_argument("address", metavar="ADDRESS", help="user@domain")
    m.set_defaults(func=run, action=mailbox_delete)
    m = msub.add_parser("list", parents=[shared], help="list mailboxes with their quotas, aliases and usage")
    m.add_argument("--json", action="store_true", help="one JSON array instead of lines")
    m.set_defaults(func=run, action=mailbox_list)
    m = msub.add_parser("quota", parents=[shared], help="a mailbox's usage against its limits (maildirsize)")
    m.add_argument("address", metavar="ADDRESS", help="user@domain, or one of its aliases")
    m.set_defaults(func=run, action=mailbox_quota)


def run(cfg: Config, args: argparse.Namespace) -> int:
    path = args.file or cfg.local.mailboxes
    if not path:
        print("mta mailbox: no mailboxes file: set [local] mailboxes in the configuration (-c FILE) "
              "or pass --file PATH", file=sys.stderr)
        return 2
    try:
        return int(args.action(cfg, path, args))
    except (MailboxFileError, OSError) as exc:
        print(f"mta mailbox: {exc}", file=sys.stderr)
        return 1


def mailbox_add(cfg: Config, path: str, args: argparse.Namespace) -> int:
    aliases = tuple(a.strip().lower() for a in args.aliases.split(",") if a.strip())
    box = Mailbox(args.address.lower(), args.quota_bytes, args.quota_messages, aliases)  # checks every address
    add_mailbox(path, box)
    print(f"mta mailbox: added {box.address} to {path}", file=sys.stderr)
    return 0


def mailbox_delete(cfg: Config, path: str, args: argparse.Namespace) -> int:
    address = args.address.lower()
    delete_mailbox(path, address)
    print(f"mta mailbox: deleted {address} from {path} (its folder "
          f"{mailbox_path(cfg.local.maildir_root, *reversed(address.rsplit('@', 1)))} is left as it is)",
          file=sys.stderr)
    return 0


def mailbox_list(cfg: Config, path: str, args: argparse.Namespace) -> int:
    try:
        table = load_mailboxes(path)
    except FileNotFoundError:
        print(f"-- no mailboxes: {path} does not exist yet", file=sys.stderr)
        return 0
    rows = [usage_row(cfg, box) for box in table.mailboxes.values()]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    for row in rows:
        print(f"{row['address']}  {_usage_text(row)}"
              + (f"  aliases: {','.join(row['aliases'])}" if row["aliases"] else ""))
    print(f"-- {len(rows)} mailbox(es) in {path}", file=sys.stderr)
    return 0


def mailbox_quota(cfg: Config, path: str, args: argparse.Namespace) -> int:
    check_address(args.address.lower())
    box = load_mailboxes(path).lookup(args.address)
    if box is None:
        raise MailboxFileError(f"no mailbox {args.address.lower()} in {path}")
    row = usage_row(cfg, box)
    print(f"{box.address}  {_usage_text(row)}")
    return 0


def usage_row(cfg: Config, box: Mailbox) -> dict[str, object]:
    folder = mailbox_path(cfg.local.maildir_root, box.domain, box.user)
    limits = quota.Limits(box.quota_bytes, box.quota_messages)
    used = quota.usage(folder, limits, write=False) if box.has_quota else quota.scan(folder)[0]
    return {"address": box.address, "aliases": list(box.aliases), "quota_bytes": box.quota_bytes,
            "quota_messages": box.quota_messages, "bytes": used.bytes, "messages": used.messages,
            "percent": round(used.percent(limits), 1) if box.has_quota else None}


def _usage_text(row: dict[str, object]) -> str:
    def one(used: object, limit: object, unit: str) -> str:
        return f"{used} of {limit} {unit}" if limit else f"{used} {unit} (no limit)"
    text = f"{one(row['bytes'], row['quota_bytes'], 'bytes')}, {one(row['messages'], row['quota_messages'], 'messages')}"
    return text + (f" ({row['percent']}% full)" if row["percent"] is not None else "")


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0: no limit)")
    return int(text)
