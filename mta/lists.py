"""Mailing lists ([[list]]): who a list is, its members, and which of our addresses it owns.

A list `team@example.com` owns three addresses of its local domain:
  team@example.com            posts: the list's copy goes to the members (workers/inbound/listpost.py)
  team-bounces@example.com    the envelope sender of the list's copy: mail to it goes to the owner
  team-owner@example.com      the List-Owner address: mail to it goes to the owner

The members file has one address per line; `#` starts a comment (a whole line, or after
the address and a space); blank lines are ignored; an address is listed once
(case-insensitively, the first spelling kept). It is re-read when its mtime, size or
inode changes (one stat per use); a file that cannot be read or parsed is logged
(`event=list_members_invalid`) and the last good members kept (none before the first).

Invariants: addresses are compared lower-cased; a list's three addresses are unique
across lists (config check) and win over an alias or mailbox of the same name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, Literal

from mta import logs
from mta.sections import LIST_POSTING, Config, ListConfig

Role = Literal["post", "bounces", "owner"]
SUFFIXES: Final[dict[str, Role]] = {"-bounces": "bounces", "-owner": "owner"}
_UNREAD: Final = (-1, -1, -1)


class MembersError(ValueError):
    """A members file that does not parse: names the file and line."""


def parse_members(text: str, path: str) -> tuple[str, ...]:
    members: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        address = words[0]
        if len(words) > 1 and not words[1].startswith("#"):
            raise MembersError(f"{path}:{number}: one address per line (a comment starts with '#')")
        if not _is_address(address):
            raise MembersError(f"{path}:{number}: {address!r} is not an address (user@domain)")
        if address.lower() not in seen:
            seen.add(address.lower())
            members.append(address)
    return tuple(members)


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return (bool(at) and bool(local) and bool(domain) and "." not in domain[:1]
            and not any(ord(c) < 0x21 or ord(c) == 0x7F or c in "<>,;\"" for c in text))


class MailingList:
    def __init__(self, config: ListConfig) -> None:
        self.config = config
        self.address = config.address
        self.local, _, self.domain = config.address.lower().rpartition("@")
        self.owner = config.owner
        self.posting = config.posting
        self._members: tuple[str, ...] = ()
        self._keys: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = _UNREAD
        self._errno: int | None = None

    @property
    def bounces(self) -> str:
        return f"{self.local}-bounces@{self.domain}"

    @property
    def owner_alias(self) -> str:
        return f"{self.local}-owner@{self.domain}"

    @property
    def list_id(self) -> str:
        """RFC 2919's list-id: the address with its @ as a dot."""
        return f"{self.local}.{self.domain}"

    def members(self) -> tuple[str, ...]:
        self._refresh()
        return self._members

    def is_member(self, address: str) -> bool:
        self._refresh()
        return address.lower() in self._keys

    def _refresh(self) -> None:
        path = self.config.members_file
        try:
            stamp: tuple[int, int, int] | None = _stamp(os.stat(path))
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            self._keep(exc)
            return
        if stamp == self._stamp:
            return
        members: tuple[str, ...] = ()
        try:
            if stamp is not None:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    stamp = _stamp(os.fstat(f.fileno()))  # of what is read, should it be replaced meanwhile
                    members = parse_members(f.read(), path)
        except MembersError as exc:
            self._stamp = stamp  # this state of the file once; a fix changes the stamp
            logs.event("list_members_invalid", list=self.address, file=path, error=str(exc),
                       kept_members=len(self._members))
            return
        except OSError as exc:
            self._keep(exc)
            return
        self._members, self._keys = members, frozenset(m.lower() for m in members)
        self._stamp, self._errno = stamp, None
        logs.event("list_members_loaded" if stamp is not None else "list_members_missing", list=self.address,
                   file=path, members=len(members))

    def _keep(self, exc: OSError) -> None:
        """Unreadable (permissions?): keep the last good members, retry on every use, log once per errno."""
        if exc.errno != self._errno:
            logs.event("list_members_invalid", list=self.address, file=self.config.members_file, error=str(exc),
                       kept_members=len(self._members))
            self._errno = exc.errno


class Lists:
    """Every configured list, found by any of the addresses it owns."""

    def __init__(self, configs: tuple[ListConfig, ...]) -> None:
        self.all = tuple(MailingList(c) for c in configs)
        self._by_address: dict[str, tuple[MailingList, Role]] = {}
        for lst in self.all:
            self._by_address[lst.address.lower()] = (lst, "post")
            self._by_address[lst.bounces] = (lst, "bounces")
            self._by_address[lst.owner_alias] = (lst, "owner")

    def __bool__(self) -> bool:
        return bool(self.all)

    def find(self, address: str) -> tuple[MailingList, Role] | None:
        """The list owning `address` and what the address is to it; None for any other address."""
        return self._by_address.get(address.lower()) if self._by_address else None


def owned_addresses(lst: ListConfig) -> tuple[str, ...]:
    local, _, domain = lst.address.lower().rpartition("@")
    return (lst.address.lower(), *(f"{local}{suffix}@{domain}" for suffix in SUFFIXES))


def bounces_owner(configs: tuple[ListConfig, ...], sender: str) -> str | None:
    """The owner of the list whose -bounces address `sender` is (the scheduler's notices about
    a list's copy go there); None for any other sender."""
    key = sender.lower()
    for lst in configs:
        if owned_addresses(lst)[1] == key:
            return lst.owner
    return None


def check(config: Config, fail: Callable[[str, str], None]) -> None:
    """The [[list]] tables: an address in a local domain, a members file, an owner, a posting
    policy; no address owned twice."""
    owned: dict[str, str] = {}
    for i, lst in enumerate(config.list):
        key = f"[[list]] #{i + 1}"
        if not _is_address(lst.address):
            fail(f"{key} address", f"must be an address like \"team@example.com\", got {lst.address!r}")
        domain = lst.address.rpartition("@")[2].lower().rstrip(".")
        if domain not in config.relay.local_domains:
            fail(f"{key} address", f"{lst.address}: its domain must be in [relay] local_domains "
                                   f"(now {list(config.relay.local_domains)})")
        if not lst.members_file:
            fail(f"{key} members_file", "required: a file of member addresses, one per line")
        if not _is_address(lst.owner):
            fail(f"{key} owner", f"must be the address of the list's owner, got {lst.owner!r}")
        if lst.owner.lower() in owned_addresses(lst):
            fail(f"{key} owner", "must be a person's address, not one of the list's own")
        if lst.posting not in LIST_POSTING:
            fail(f"{key} posting", f"must be one of {', '.join(LIST_POSTING)}, got {lst.posting!r}")
        for address in owned_addresses(lst):
            if address in owned:
                fail(f"{key} address", f"{address} is already an address of the list {owned[address]}")
            owned[address] = lst.address


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino
