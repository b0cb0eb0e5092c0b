"""The configuration's typed sections: one frozen dataclass per TOML table, defaults on the fields.

Pure data: config.py loads and validates TOML into these (and re-exports them, so
callers import everything from mta.config). Every default lives on its field; with
no file at all the defaults make a working relay (SMTP on 127.0.0.1:2525, spool under
./var/).
"""


from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_MODES: Final = ("smtp", "submission", "smtps")
BARE_NEWLINE_MODES: Final = ("reject", "normalize")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key and the problem."""


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    inbound_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    drain_timeout_seconds: float = 30.0
    heartbeat_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ListenerConfig:
    address: str = "127.0.0.1:2525"
    mode: str = "smtp"
    proxy_protocol: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    # AUTH offered here (default: on submission and smtps listeners, off on smtp).
    auth: bool | None = None
    auth_plaintext: bool = False  # offer AUTH without TLS (loopback test rigs only)

    @property
    def offers_auth(self) -> bool:
        return self.auth if self.auth is not None else self.mode in ("submission", "smtps")

    @property
    def host(self) -> str:
        return split_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.address)[1]

    @property
    def family(self) -> socket.AddressFamily:
        """Its socket's: an IPv6 literal host binds AF_INET6 (the master), else AF_INET."""
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclass(frozen=True)
class QueueConfig:
    path: str = "var/spool"
    max_size_bytes: int = 4 * 1024**3
    active_limit: int = 20000  # messages the scheduler holds in memory to dispatch (Postfix's active queue)
    active_reserve: int = 2000  # more of them, for messages above the default priority only
    maildrop: str = ""  # where mta-sendmail drops messages (mta/maildrop.py); "": <path>-maildrop

    @property
    def scheduler_socket(self) -> str:
        """The scheduler's Unix socket, inside the spool (mode 0600: operators only)."""
        return os.path.join(self.path, "scheduler.sock")

    @property
    def maildrop_dir(self) -> str:
        """The maildrop: beside the spool, never in it (the spool is 0700; every local user writes here)."""
        return self.maildrop or self.path.rstrip("/") + "-maildrop"


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 25 * 1024**2
    max_recipients: int = 100
    max_connections_per_ip: int = 50
    max_sessions: int = 0  # all inbound workers together; 0: inbound_workers x max_sessions_per_worker
    max_sessions_per_worker: int = 0  # 0: (fd limit - 64) // 2 (mta/master/admission.py)
    command_timeout_seconds: float = 300.0
    data_timeout_seconds: float = 600.0
    data_total_timeout_seconds: float = 900.0  # a whole DATA/BDAT transfer, however steady the trickle
    session_timeout_seconds: float = 1800.0  # a whole session, from connect
    max_worker_buffered_bytes: int = 256 * 1024**2  # message content held in memory by one inbound worker
    max_errors: int = 20
    max_junk_commands: int = 100  # NOOP, RSET, HELP, VRFY, EXPN per session, then 421 4.7.0
    max_received_headers: int = 50
    bare_newline: str = "reject"


@dataclass(frozen=True)
class RelayConfig:
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    mynetworks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@dataclass(frozen=True)
class DeliveryConfig:
    workers: int = 1  # delivery processes; 0 = hold everything in the queue (receive-only node)
    max_connections: int = 200  # outbound sessions in total
    concurrency: int = 20  # sessions per destination domain
    max_connections_per_host: int = 50  # sessions per MX host (address:port), per delivery process
    initial_concurrency: int = 5  # slow start: a destination's window starts here
    max_messages_per_connection: int = 100
    # A session whose destination has nothing ready waits this long for the next message
    # before it QUITs (Postfix's smtp_connection_cache_time_limit); 0 = QUIT at once.
    connection_idle_seconds: float = 2.0
    max_messages_per_second: float = 0.0  # per destination domain; 0 = unlimited
    port: int = 25
    smarthost: str = ""  # "host:port": every remote message goes there
    tls: str = "may"  # none | may | encrypt | verify
    min_backoff_seconds: float = 300.0
    max_backoff_seconds: float = 14400.0
    max_queue_lifetime_seconds: float = 5 * 86400.0
    # One delay notice (DSN) per message still queued after this long (NOTIFY=DELAY, or
    # no NOTIFY); 0 = none. Sent at the message's first attempt or load after it.
    delay_warning_seconds: float = 4 * 3600.0
    connect_timeout_seconds: float = 30.0
    command_timeout_seconds: float = 300.0
    data_timeout_seconds: float = 600.0


@dataclass(frozen=True)
class DomainConfig:
    """Per destination domain overrides of [delivery]; None = use the [delivery] value."""

    priority: int = 0
    concurrency: int | None = None
    max_messages_per_connection: int | None = None
    max_messages_per_second: float | None = None
    tls: str | None = None


@dataclass(frozen=True)
class PriorityRule:
    """Messages matching every given field get `priority` (the highest matching rule wins)."""

    priority: int = 0
    sender_domain: str | None = None
    recipient_domain: str | None = None
    listener: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()  # "host:port"; empty = the system resolver's
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class CacheConfig:
    path: str = "var/cache"  # LMDB environment shared by the DNS and auth caches
    max_size_bytes: int = 256 * 1024**2
    max_entries: int = 100_000


@dataclass(frozen=True)
class LocalConfig:
    maildir_root: str = "var/mail"  # mailboxes are <root>/<domain>/<user>/ (create one to add a user)
    aliases: str = ""  # path of the aliases file; empty = none
    mailboxes: str = ""  # the virtual mailboxes file (`mta mailbox`); empty = a mailbox exists when its directory does
    owner: str = ""  # "user[:group]" that owns the mailboxes mta creates and writes; empty = mta's own user
    quota_full: str = "defer"  # a message over a mailbox's quota: "defer" (4.2.2, bounced 5.2.2 at the lifetime) or "bounce"
    quota_warn_percent: int = 90  # one warning message into a mailbox whose usage crosses this; 0 = none


@dataclass(frozen=True)
class TlsConfig:
    """The server certificate for STARTTLS and implicit TLS (re-read on SIGHUP)."""

    cert_file: str = ""  # PEM chain; empty = no TLS (STARTTLS not offered)
    key_file: str = ""
    handshake_timeout_seconds: float = 10.0
    min_version: str = "TLSv1.2"  # or "TLSv1.3"


@dataclass(frozen=True)
class AuthConfig:
    users_file: str = ""  # `mta users add` manages it; empty = AUTH never offered
    cache_ttl_seconds: float = 3600.0  # a verified login is trusted this long without scrypt
    sender_login_match: bool = False  # MAIL FROM must be one of the user's own addresses
    slow_after_failures: int = 3  # AUTH failures from one IP before replies slow down
    failure_delay_seconds: float = 1.0  # added per failure beyond slow_after_failures (max 5 s)
    max_failures: int = 10  # failures from one IP within lockout_seconds, then 421 4.7.0 and lockout
    lockout_seconds: float = 600.0


@dataclass(frozen=True)
class PolicyConfig:
    client_allow: tuple[Network, ...] = ()  # never refused by client_deny or DNSBLs (grants no relay)
    client_deny: tuple[Network, ...] = ()  # 554 5.7.1 at connect
    sender_deny: tuple[str, ...] = ()  # "user@example.com" or "example.com": 553 5.7.1 at MAIL
    recipient_deny: tuple[str, ...] = ()  # same forms: 550 5.7.1 at RCPT
    dnsbl: tuple[str, ...] = ()  # zones, e.g. "zen.spamhaus.org": a listed client gets 554 5.7.1 at MAIL
    vrfy: bool = False  # VRFY answers whether a local recipient exists (252 for everyone when false)
    expn: bool = False  # EXPN expands local aliases (502 when false)


@dataclass(frozen=True)
class RateConfig:
    """Per client IP (mynetworks exempt) and per authenticated user; 0 = no limit."""

    window_seconds: float = 60.0
    connections_per_window: int = 0  # 421 4.7.0 at connect
    messages_per_window: int = 0  # 450 4.7.1 at MAIL
    recipients_per_window: int = 0  # 450 4.7.1 at RCPT
    user_messages_per_window: int = 0
    user_recipients_per_window: int = 0
    exempt_mynetworks: bool = True


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes as one: limits shared through Redis (docs/operations.md)."""

    redis: str = ""  # "redis://host:port/db", "rediss://...", "redis+sentinel://h:p,h:p/MASTER/db"; empty: no cluster
    node: str = ""  # this node's name; empty: the host name
    on_redis_down: str = "local"  # "local": the node's own limits; "tempfail": 4xx where a shared decision is needed
    redis_ca_file: str = ""  # rediss://: the CA that signed Redis's certificate (PEM); empty: the system's CAs
    redis_cert_file: str = ""  # rediss://: a client certificate (PEM), for a Redis with tls-auth-clients
    redis_key_file: str = ""  # its private key


@dataclass(frozen=True)
class LogConfig:
    format: str = "keyvalue"  # or "json": one JSON object per line


@dataclass(frozen=True)
class ControlConfig:
    listen: str = "127.0.0.1:9025"  # /metrics, /healthz, /readyz, /api/...
    metrics_dir: str = "var/metrics"  # prometheus-client multiprocess files (wiped at start)
    token: str = ""  # bearer token for /api/...; empty: the one mta keeps in token_file
    token_file: str = ""  # empty: <[queue] path>/control.token; created 0600 at start when missing
    allowed_hosts: tuple[str, ...] = ("localhost",)  # Host names /api/ answers besides listen's address
    tls_cert_file: str = ""  # PEM chain: the listener speaks HTTPS (needed for /ui/ and /api/ off loopback)
    tls_key_file: str = ""
    admin_users_file: str = ""  # web UI logins besides the token (the users-file format: mta users --file)
    session_seconds: float = 3600.0  # a web UI session ends after this long without a request


MILTER_ACTIONS: Final = ("tempfail", "accept", "reject")
TNEF_MODES: Final = ("keep", "convert")
VIRUS_ACTIONS: Final = ("reject", "quarantine")
SCAN_ERROR_ACTIONS: Final = ("tempfail", "accept")


# The content pipeline's stages, run at end of data in this order (attachments, antivirus,
# milters, footers, DKIM). `listeners`: the "host:port" of the listeners a stage runs for;
# empty: every listener.
@dataclass(frozen=True)
class MilterConfig:
    address: str = ""  # "inet:host:port" (IPv6 "inet:[::1]:port") | "unix:/path"
    default_action: str = "tempfail"  # the milter down, timed out or broke the protocol
    timeout_seconds: float = 30.0  # per protocol step
    listeners: tuple[str, ...] = ()


@dataclass(frozen=True)
class DkimConfig:
    domain: str = ""  # signs mail whose From: domain is this (or a subdomain, with subdomains)
    selector: str = ""
    key_file: str = ""  # PEM: RSA (2048 bits or more) or Ed25519
    headers: tuple[str, ...] = ()  # the signed header fields; empty: the default list
    subdomains: bool = False
    listeners: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContentConfig:
    reject_attachment_extensions: tuple[str, ...] = ()  # e.g. ["exe", "vbs"]: 554 5.7.1
    tnef: str = "keep"  # convert: winmail.dat parts become ordinary attachments
    listeners: tuple[str, ...] = ()


@dataclass(frozen=True)
class AntivirusConfig:
    clamd: str = ""  # "tcp:host:port" | "unix:/path"; empty: no scanning
    on_virus: str = "reject"  # reject (554 5.7.1) | quarantine (stored held)
    on_error: str = "tempfail"  # clamd down, timed out, over its size limit: tempfail (451 4.7.1) | accept
    timeout_seconds: float = 30.0
    listeners: tuple[str, ...] = ()


@dataclass(frozen=True)
class FooterConfig:
    sender_domain: str = ""  # the envelope sender's domain ("*": every sender)
    text: str = ""  # appended to the first text/plain part
    html: str = ""  # appended to the first text/html part; empty: html parts untouched
    listeners: tuple[str, ...] = ()


LIST_POSTING: Final = ("members", "anyone", "moderated")


@dataclass(frozen=True)
class ListConfig:
    """A mailing list (mta/lists.py): the list's copy goes to its members from <local>-bounces@."""

    address: str = ""  # the list's address, in a local domain
    members_file: str = ""  # one address per line, `#` comments; re-read when it changes
    owner: str = ""  # gets <local>-owner@ and <local>-bounces@ mail, and moderates
    posting: str = "members"  # members (the envelope sender) | anyone | moderated (held for the owner)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    listener: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    domains: dict[str, DomainConfig] = field(default_factory=dict)
    priority_rule: tuple[PriorityRule, ...] = ()
    routes: dict[str, str] = field(default_factory=dict)  # domain -> "host:port" | "lmtp:host:port" | "maildir"
    dns: DnsConfig = field(default_factory=DnsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    milter: tuple[MilterConfig, ...] = ()
    dkim: tuple[DkimConfig, ...] = ()
    content: ContentConfig = field(default_factory=ContentConfig)
    antivirus: AntivirusConfig = field(default_factory=AntivirusConfig)
    footer: tuple[FooterConfig, ...] = ()
    list: tuple[ListConfig, ...] = ()  # the TOML table is [[list]]
    source: str = "<embedded defaults>"

    def domain(self, name: str) -> DomainConfig:
        return self.domains.get(name) or _NO_OVERRIDES


_NO_OVERRIDES = DomainConfig()
TLS_POLICIES: Final = ("none", "may", "encrypt", "verify")
ON_REDIS_DOWN: Final = ("local", "tempfail")
TLS_VERSIONS: Final = ("TLSv1.2", "TLSv1.3")


def split_hostport(address: str) -> tuple[str, int]:
    """'127.0.0.1:25' or '[::1]:25' -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f'expected "host:port", got {address!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    if ":" in host:
        ipaddress.ip_address(host)  # a bare IPv6 literal must at least parse
    return host, number
