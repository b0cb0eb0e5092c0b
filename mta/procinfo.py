"""This process's pid without a system call per read (it changes only at fork).

    procinfo.pid()  -> os.getpid() of the calling process, kept by an at-fork hook
"""

from __future__ import annotations

import os

_pid = os.getpid()


def pid() -> int:
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
