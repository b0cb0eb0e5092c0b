"""`mta node drain|undrain|status`: take this node out of service and back, through the
running server's admin API (workers/control/main.py, /api/node).

drain: the master answers every new connection 421 4.3.2 and /readyz answers 503 (a
balancer health-checking it moves traffic away); open sessions finish, delivery goes on.
undrain (also `resume`): new sessions are taken again. The state lives in the running
master: a restart of `mta serve` starts undrained. `mta queue transfer` then moves the
queue to another node (mta/queuetransfer.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from mta import adminclient
from mta.adminclient import ControlError
from mta.config import Config


def run(cfg: Config, args: argparse.Namespace) -> int:
    method, path = ("GET", "/api/node") if args.action == "status" else ("POST", f"/api/node/{args.action}")
    try:
        answer = adminclient.request(cfg, method, path, None if method == "GET" else {}, expect=(200,))
    except ControlError as exc:
        print(f"mta node {args.action}: {exc}", file=sys.stderr)
        return 1
    if answer is None:
        print(f"mta node {args.action}: no server answers on [control] listen {cfg.control.listen} "
              f"(config: {cfg.source}): is it running, is -c right?", file=sys.stderr)
        return 1
    state = json.loads(answer[1])
    if args.json:
        print(json.dumps(state))
    else:
        print(f"node: {'drained (new sessions refused with 421)' if state['drained'] else 'accepting'}; "
              f"/readyz: {'ready' if state['ready'] else 'not ready (503)'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("node", help="take this node out of service and back (a running server)")
    nsub = p.add_subparsers(metavar="ACTION")
    for action, aliases, text in (
            ("drain", [], "refuse new sessions (421), /readyz 503; open sessions finish, delivery goes on"),
            ("undrain", ["resume"], "take new sessions again"),
            ("status", [], "drained or not, and /readyz")):
        n = nsub.add_parser(action, aliases=aliases, parents=[common], help=text)
        n.add_argument("--json", action="store_true", help="print the state as JSON")
        n.set_defaults(func=run, action=action)
