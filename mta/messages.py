"""Messages between mta's processes: one frozen dataclass per kind, and their wire form.

Every frame on a master channel (SEQPACKET) or on the scheduler's socket (length-prefixed
stream; both in mta/frames.py) is one of the classes below; nothing else builds or reads
a frame. The wire form is a msgpack array: the kind's tag, then its fields in the order
the class declares them (half the bytes of a map, and quicker to pack and unpack: the
job/done path runs once per message).

  master <-> children (SEQPACKET)
    child -> master      Hello (first), then Status every second: the heartbeat
    master -> inbound    Conn: connections, with their sockets (SCM_RIGHTS), one per entry
    inbound -> master    Took | Refused: for every entry of a Conn, in one frame each
    master -> control    Children: the crash-looping slots, when they change
    control <-> master   NodeDrain: `mta node drain|undrain` asks; the master's state back
  peers <-> scheduler (<spool>/scheduler.sock)
    peer <-> scheduler   Hello, first, both ways: the scheduler refuses another build's peer;
                         delivery workers and the CLI check the scheduler's (the inbound
                         notifier only writes: the scheduler's refusal drops it)
    inbound -> scheduler New: ids after each durable commit
    scheduler -> delivery Open | Job | Close, per session
    delivery -> scheduler Done (per job) | Closed (per session)
    CLI, control         QueueCommand -> CommandProgress* then CommandResult,
                         ActiveQuery -> ActiveJobs,
                         GaugeQuery -> DestinationGauges

Invariants: `decode` returns a message whose every field has its declared type (the
checks are compiled from the annotations), or raises MessageError: unknown tag, wrong
arity or type, or VersionMismatch for a Hello of another PROTOCOL_VERSION. A Hello's wire
form never changes ([0, version, role, pid, capacity]), so builds of different versions
always recognise each other. Change any message: bump PROTOCOL_VERSION.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import msgpack

PROTOCOL_VERSION = 5

# One Packer (packb() builds one per call). Not thread-safe: messages are encoded on each
# process's event-loop thread (or the CLI's only one), never in an executor.
_packb = msgpack.Packer().pack
_unpackb = msgpack.unpackb


class MessageError(ValueError):
    """A frame that is not a message of this build, or not one the receiver takes: the
    receiver logs `event` and drops the connection."""
    event = "bad_frame"


class VersionMismatch(MessageError):
    """A Hello from a build that speaks another PROTOCOL_VERSION."""
    event = "protocol_mismatch"

    def __init__(self, version: object, role: object = None, pid: object = None) -> None:
        super().__init__(f"the peer ({role or 'unknown role'}, pid {pid}) speaks message protocol "
                         f"{version!r}, this build {PROTOCOL_VERSION}: every mta process must come "
                         "from the same build (restart the server after an upgrade)")
        self.version, self.role, self.pid = version, role, pid


_DECODERS: dict[int, Callable[[tuple[Any, ...]], Any]] = {}
_ENCODERS: dict[type, Callable[[Any], bytes]] = {}

_T = typing.TypeVar("_T")


def _wire(tag: int) -> Callable[[type[_T]], type[_T]]:
    """Register a message class under `tag`: compile its encoder and its decoder, which
    checks every field against the class's annotations.

    Speed (the job/done path builds and decodes 4 to 6 fields per message): a frozen
    dataclass's __init__ sets each field through object.__setattr__, ~110 ns a field on
    CPython 3.11. Here both construction (a __new__ in place of that __init__) and the
    decoder fill a mutable twin of the class (the same __slots__, ~15 ns a field) and
    then give it the frozen class: CPython allows that __class__ assignment between
    identical slot layouts. The instance is the frozen dataclass from then on."""
    def register(cls: type[_T]) -> type[_T]:
        assert tag not in _DECODERS, f"tag {tag} is taken"
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        env: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_Error": MessageError, "_pack": _packb,
                               "_twin": type(f"_{cls.__name__}Fields", (), {"__slots__": tuple(names)})}
        # The decoder's locals are a0, a1...: a field may be named like a builtin (`all`).
        local = [f"a{i}" for i in range(len(names))]
        checks = " and ".join(_check(hints[n], v, env) for n, v in zip(names, local)) or "True"
        source = [
            f"def __new__(cls, {_list(names)}):",
            "    self = _new(_twin)",
            *(f"    self.{n} = {n}" for n in names),
            "    self.__class__ = cls",
            "    return self",
            "def __reduce__(self):",
            f"    return (_cls, ({_list('self.' + n for n in names)}))",
            "def encode(m):",
            f"    return _pack(({tag}, {_list('m.' + n for n in names)}))",
            "def decode(f):",
            f"    if len(f) != {len(names) + 1}:",
            f"        raise _Error(f'a {cls.__name__} has {len(names)} fields, not {{len(f) - 1}}')",
            f"    _, {_list(local)}= f",
            f"    if not ({checks}):",
            f"        raise _Error(f'a {cls.__name__} with a field of the wrong type: {{f[1:]!r:.200}}')",
            "    self = _new(_twin)",
            *(f"    self.{n} = {v}" for n, v in zip(names, local)),
            "    self.__class__ = _cls",
            "    return self",
        ]
        exec("\n".join(source), env)
        env["__new__"].__defaults__ = cls.__init__.__defaults__  # type: ignore[misc]
        for name in ("__new__", "__reduce__"):
            env[name].__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, env[name])
        del cls.__init__  # type: ignore[misc]  # object.__init__ leaves the arguments to __new__
        _ENCODERS[cls], _DECODERS[tag] = env["encode"], env["decode"]
        return cls
    return register


def _list(items: typing.Iterable[str]) -> str:
    return "".join(item + ", " for item in items)


def _check(hint: Any, var: str, env: dict[str, Any]) -> str:
    """A Python expression true when `var` holds a decoded value of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, str, bool):
        return f"type({var}) is {hint.__name__}"
    if hint is type(None):
        return f"{var} is None"
    if origin in (types.UnionType, typing.Union):
        return "(" + " or ".join(_check(a, var, env) for a in args) + ")"
    if origin is Literal:  # (the type first: an unhashable value is no member either)
        name = f"_in{len(env)}"
        env[name], env[name + "_types"] = frozenset(args), frozenset(map(type, args))
        return f"(type({var}) in {name}_types and {var} in {name})"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"type({var}) is tuple and (not {var} or all(map({_helper(args[0], env)}, {var})))"
    if origin is tuple:
        items = "".join(f" and {_check(a, f'{var}[{i}]', env)}" for i, a in enumerate(args))
        return f"(type({var}) is tuple and len({var}) == {len(args)}{items})"
    if origin is dict:
        return (f"type({var}) is dict and all(map({_helper(args[0], env)}, {var}))"
                f" and all(map({_helper(args[1], env)}, {var}.values()))")
    raise TypeError(f"no wire check for {hint!r}")


def _helper(hint: Any, env: dict[str, Any]) -> str:
    """A function checking one value of type `hint` (an element of a tuple or dict)."""
    name = f"_is{len(env)}"
    env[name] = None  # taken before the check compiles: it may add helpers of its own
    exec(f"def {name}(v):\n    return {_check(hint, 'v', env)}\n", env)
    return name


def encode(message: Message) -> bytes:
    return _ENCODERS[type(message)](message)


def decode(data: bytes) -> Message:
    try:
        wire = _unpackb(data, use_list=False)
        decoder = _DECODERS[wire[0]]
    except (ValueError, LookupError, TypeError):  # (msgpack's errors are ValueErrors)
        raise MessageError(_not_a_message(data)) from None
    message: Message = decoder(wire)
    return message


def _not_a_message(data: bytes) -> str:
    try:
        wire = _unpackb(data, use_list=False)
    except ValueError as exc:
        return f"not msgpack: {type(exc).__name__} {exc}"
    if type(wire) is dict and "t" in wire:
        return f"an untyped {wire['t']!r:.40} frame: from a build before message protocol 1"
    if type(wire) is tuple and wire and type(wire[0]) is int:
        return f"unknown message tag {wire[0]}"
    return f"not a message: {wire!r:.100}"


def hello(role: str, capacity: int = 0) -> Hello:
    """This process's Hello."""
    return Hello(PROTOCOL_VERSION, role, os.getpid(), capacity)


def unexpected(message: Message, where: str) -> MessageError:
    """For a receiver: a valid message of a kind it never gets (raise it)."""
    return MessageError(f"unexpected {type(message).__name__} {where}")


# --- every process ---------------------------------------------------------------------

_HELLO = 0


@_wire(_HELLO)
@dataclass(frozen=True, slots=True)
class Hello:
    """The first message of every child to the master, and both ways between the scheduler
    and its peers. Its wire form never changes (decode checks `version` first)."""
    version: int
    role: str  # "child" on a master channel; "delivery", "inbound", "cli", "control", "scheduler"
    pid: int
    capacity: int = 0  # a delivery worker's concurrent sessions


def _decode_hello(wire: tuple[Any, ...], _decode: Callable[[tuple[Any, ...]], Any] = _DECODERS[_HELLO]) -> Any:
    if len(wire) > 1 and wire[1] != PROTOCOL_VERSION:  # before the layout, which may differ too
        raise VersionMismatch(*wire[1:4])
    return _decode(wire)


_DECODERS[_HELLO] = _decode_hello


# --- master <-> children (SEQPACKET) --------------------------------------------------------

@_wire(1)
@dataclass(frozen=True, slots=True)
class Status:
    """child -> master, every second from the event loop (the heartbeat), and within 0.1 s
    of an inbound worker's load falling."""
    state: str  # "ready" | "retiring"
    active: int  # sessions (inbound: + sockets being adopted)


@_wire(2)
@dataclass(frozen=True, slots=True)
class Conn:
    """master -> inbound worker: connections accepted in one loop iteration, with their
    sockets (SCM_RIGHTS) in the same order, one per entry (at most frames.MAX_FDS)."""
    conns: tuple[tuple[int, str], ...]  # (id, the listener's address as configured)


@_wire(3)
@dataclass(frozen=True, slots=True)
class Took:
    """inbound -> master: these Conn entries are ours (the master closes its copies)."""
    ids: tuple[int, ...]
    active: int


@_wire(4)
@dataclass(frozen=True, slots=True)
class Refused:
    """inbound -> master: these Conn entries came without their sockets (the kernel drops
    the last ones of a frame at our fd limit); the master answers 421 and closes each."""
    ids: tuple[int, ...]
    active: int


@_wire(5)
@dataclass(frozen=True, slots=True)
class Children:
    """master -> control: the required slots crash-looping now (/readyz answers 503)."""
    crash_looping: tuple[str, ...]  # e.g. ("scheduler#1",)


@_wire(19)
@dataclass(frozen=True, slots=True)
class NodeDrain:
    """control -> master: take no new sessions (421) or take them again; master ->
    control: the state it keeps (when it changes, or to a new control process)."""
    drained: bool


# --- peers <-> scheduler (stream) -----------------------------------------------------------

@_wire(6)
@dataclass(frozen=True, slots=True)
class New:
    """inbound -> scheduler: messages durably committed since the last New."""
    ids: tuple[str, ...]


@_wire(7)
@dataclass(frozen=True, slots=True)
class Open:
    """scheduler -> delivery: open session `sid` to `dest` and deliver its first job."""
    sid: int
    dest: str
    job_id: int
    msgid: str
    rcpts: tuple[int, ...]  # recipient indices in the envelope


@_wire(8)
@dataclass(frozen=True, slots=True)
class Job:
    """scheduler -> delivery: the next job of open session `sid` (possibly sent ahead)."""
    sid: int
    job_id: int
    msgid: str
    rcpts: tuple[int, ...]


@_wire(9)
@dataclass(frozen=True, slots=True)
class Close:
    """scheduler -> delivery: QUIT session `sid` once its jobs are done."""
    sid: int


RcptReply = tuple[int, int, str, str]  # recipient index, code, enhanced status, text
# What a 2xx for a recipient means for its success notice (RFC 3461 5.2.2): "delivered"
# (Maildir, or an LMTP server without DSN: final delivery), "relayed" (an SMTP next hop
# without DSN), "passed" (the next hop offers DSN: NOTIFY went with it, it reports success).
Handoff = Literal["delivered", "relayed", "passed"]


@_wire(10)
@dataclass(frozen=True, slots=True)
class Done:
    """delivery -> scheduler: job `job_id` of session `sid` is over."""
    sid: int
    job_id: int
    replies: tuple[RcptReply, ...]
    remote: str | None = None  # the relay that answered
    failed: bool = False  # no session could be made: the destination's window shrinks
    skipped: tuple[int, ...] = ()  # held by an operator since the job was made: not attempted
    handoff: Handoff = "relayed"  # for the recipients with a 2xx: which success notice, if any


@_wire(11)
@dataclass(frozen=True, slots=True)
class Closed:
    """delivery -> scheduler: session `sid` has ended (its jobs not Done are ready again)."""
    sid: int
    ok: bool


QueueOp = Literal["retry", "hold", "release", "delete"]
QUEUE_OPS: frozenset[str] = frozenset(typing.get_args(QueueOp))


@_wire(12)
@dataclass(frozen=True, slots=True)
class QueueCommand:
    """CLI, control -> scheduler: an operator's change, on disk before the CommandResult."""
    op: QueueOp
    ids: tuple[str, ...] = ()
    domain: str | None = None
    all: bool = False


@_wire(13)
@dataclass(frozen=True, slots=True)
class CommandResult:
    count: int  # messages the command applied to


@_wire(18)
@dataclass(frozen=True, slots=True)
class CommandProgress:
    """scheduler -> CLI, control: a QueueCommand over --all or --domain goes in batches;
    at most one of these a second before its CommandResult."""
    done: int  # messages applied so far
    total: int  # the messages it expects to apply; 0 when unknown


@_wire(14)
@dataclass(frozen=True, slots=True)
class ActiveQuery:
    """CLI, control -> scheduler: which recipients are in a session's jobs now?"""


@_wire(15)
@dataclass(frozen=True, slots=True)
class ActiveJobs:
    active: dict[str, tuple[int, ...]]  # message id -> recipient indices


@_wire(16)
@dataclass(frozen=True, slots=True)
class GaugeQuery:
    """control -> scheduler: the per-destination gauges, at each scrape."""


@_wire(17)
@dataclass(frozen=True, slots=True)
class DestinationGauges:
    top: tuple[tuple[str, int, int, int, int, int], ...]  # name, ready, active, deferred, sessions, window
    other: tuple[int, int, int]  # ready, active, deferred of every other destination


Message = (Hello | Status | Conn | Took | Refused | Children | NodeDrain | New | Open | Job | Close | Done | Closed
           | QueueCommand | CommandResult | CommandProgress | ActiveQuery | ActiveJobs | GaugeQuery | DestinationGauges)
