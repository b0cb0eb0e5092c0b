"""mta as a bench target: its configuration file and its command line.

    config = write_config(workdir, port, workers, relay={...}, delivery={...})
    launch = mta_launch(config, workers)      # for procs.Server; this checkout's mta
    launch = mta_launch(config, workers, root=other)   # another checkout's (--against)
    counts = labelled_totals(control_port, "mta_content_decisions_total", ("stage", "result"))

Every mode starts from one base: `[server]` hostname, N inbound workers and a drain
(5 s) shorter than any stop grace, so the master's own drain ends before a SIGKILL;
one `smtp` listener on 127.0.0.1; the spool, the shared cache and the Maildir root in
the run's temp dir; and no per-IP connection limit to speak of (every bench session
comes from 127.0.0.1, and with one message per connection the server still counts a
closing connection while the client has already opened the next one, so the default
limit would answer 421 to part of a run: the bench would measure the limit, not the
server). A mode adds or replaces whole tables; `dead_dns()` is a `[dns]` at a
loopback port where nothing listens, so a lookup that should not happen fails at once
instead of asking the machine's resolver.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Final

from procs import HOST, REPO_ROOT, Launch, free_port

MAX_CONNECTIONS_PER_IP: Final = 1_000_000
QUEUE_MAX_SIZE_BYTES: Final = 4 * 1024**3
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_SAMPLE: Final = re.compile(r'^([a-z_]+)\{(.*)\} ([0-9.e+]+)$')
_LABEL: Final = re.compile(r'(\w+)="([^"]*)"')


def write_config(workdir: Path, port: int, workers: int, *, hostname: str = "mta.bench",
                 listener: dict | None = None, **tables: dict) -> Path:
    """workdir/mta.toml: the base, with `listener` keys added to the one listener and
    `tables` added or replacing base tables (`domains."x.test"` names a subtable)."""
    doc: dict[str, dict | list[dict]] = {
        "server": {"hostname": hostname, "inbound_workers": workers, "drain_timeout_seconds": 5},
        "listener": [{"address": f"{HOST}:{port}", "mode": "smtp", **(listener or {})}],
        "queue": {"path": str(workdir / "spool"), "max_size_bytes": QUEUE_MAX_SIZE_BYTES},
        "limits": {"max_connections_per_ip": MAX_CONNECTIONS_PER_IP},
        "local": {"maildir_root": str(workdir / "mail")},
        "cache": {"path": str(workdir / "cache")},
    }
    doc.update(tables)
    config = workdir / "mta.toml"
    config.write_text(toml(doc))
    return config


def dead_dns() -> dict:
    return {"nameservers": [f"{HOST}:{free_port()}"], "timeout_seconds": 1}


def toml(doc: dict[str, dict | list[dict]]) -> str:
    """Tables of scalars and lists (a list of tables: an array of tables) as TOML."""
    lines: list[str] = []
    for name, body in doc.items():
        for table in body if isinstance(body, list) else [body]:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines += [f"{_key(key)} = {_value(value)}" for key, value in table.items()]
            lines.append("")
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def mta_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """The environment that runs the mta of the checkout at `root` on its own packages,
    not whatever `pip install -e` left elsewhere."""
    env = dict(os.environ)
    paths = [str(root), str(root / "queue")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def mta_launch(config: Path, workers: int, root: Path = REPO_ROOT) -> Launch:
    """`python3 -m mta serve -c CONFIG` from a checkout's root (default: this one), on
    that checkout's own packages."""
    return Launch(argv=[sys.executable, "-m", "mta", "serve", "-c", str(config)],
                  cwd=root, env=mta_env(root), prefork_workers=workers)


def labelled_totals(control_port: int, metric: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """One labelled counter from a running mta's /metrics, summed by `labels` ("?" for a
    label a sample lacks); {} while nothing was counted."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, no proxy
    with opener.open(f"http://{HOST}:{control_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[tuple[str, ...], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == metric:
            values = dict(_LABEL.findall(match.group(2)))
            key = tuple(values.get(label, "?") for label in labels)
            found[key] = found.get(key, 0.0) + float(match.group(3))
    return found
