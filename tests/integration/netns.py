"""Network namespaces for a multi-node test: a hub with a bridge, N nodes, one veth to the root.

    hub namespace <tag>-hub: bridge br0 = 10.77.S.2/24 (HAProxy, Redis listen here)
      |-- veth <tag>r (root namespace, 10.77.S.1/24 and any extra client addresses): the test
      |-- veth v1 <-> eth0 in <tag>-n1 = 10.77.S.11/24
      |-- veth v2 <-> eth0 in <tag>-n2 = 10.77.S.12/24 ...

Every namespace has its own lo up. The test process (root namespace) reaches the hub and the
nodes through its veth end; nothing else on the host changes. <tag> is unique per run
(mta<pid>) and S is a /24 in 10.77.0.0/16 that the root namespace does not route yet, so two
runs never collide. down() kills what still runs in the namespaces (only this run's
processes can be there), deletes them and the veth, even after a half-done up().
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence

IP = "ip"
COMMAND_SECONDS = 10.0


class NetnsUnavailable(Exception):
    """`ip netns` cannot be used here (not root, no iproute2): the caller skips."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([IP, *args], check=False, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _free_subnet() -> int:
    """The third octet of a 10.77.S.0/24 that no route or address of the root namespace names."""
    used = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "addr").stdout
    start = os.getpid() % 230
    for n in range(230):
        third = (start + n) % 230 + 20
        if f"10.77.{third}." not in used:
            return third
    raise RuntimeError("no free 10.77.x.0/24 for the test's namespaces")


class Topology:
    def __init__(self, nodes: int, extra_client_hosts: Sequence[int] = ()) -> None:
        self.tag = f"mta{os.getpid()}"
        self.hub_ns = f"{self.tag}-hub"
        self.node_ns = [f"{self.tag}-n{i + 1}" for i in range(nodes)]
        self.root_link = f"{self.tag}r"
        self.subnet = ""
        self.extra_client_hosts = tuple(extra_client_hosts)

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    @property
    def client(self) -> str:
        return self.address(1)

    @property
    def hub(self) -> str:
        return self.address(2)

    def node(self, i: int) -> str:
        """The address of node i (0-based)."""
        return self.address(11 + i)

    def exec_prefix(self, namespace: str) -> list[str]:
        """The argv prefix that runs a command in `namespace` (exec: the pid stays the command's own)."""
        return [IP, "netns", "exec", namespace]

    def up(self) -> Topology:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        probe = subprocess.run([IP, "netns", "list"], check=False, capture_output=True, text=True)
        if probe.returncode != 0:
            raise NetnsUnavailable(f"`ip netns` does not work here: {probe.stderr.strip()}")
        self.subnet = f"10.77.{_free_subnet()}"
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        hub = self.hub_ns
        ip("netns", "add", hub)
        ip("-n", hub, "link", "set", "lo", "up")
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{self.hub}/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", "up0", "netns", hub)
        for host in (1, *self.extra_client_hosts):
            ip("addr", "add", f"{self.address(host)}/24", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        ip("-n", hub, "link", "set", "up0", "master", "br0", "up")
        for i, ns in enumerate(self.node_ns):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", hub, "link", "add", f"v{i + 1}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", hub, "link", "set", f"v{i + 1}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.node(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        existing = set(ip("netns", "list", check=False).stdout.split())
        for ns in (*self.node_ns, self.hub_ns):
            if ns not in existing:
                continue
            self._kill_inside(ns)
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.root_link, check=False)  # gone with its peer already, most often

    def _kill_inside(self, ns: str) -> None:
        """SIGKILL what still runs in `ns` (a process the test failed to stop), then wait for it."""
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + COMMAND_SECONDS
        while pids and time.monotonic() < deadline:
            pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
            time.sleep(0.05)
