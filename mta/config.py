"""The configuration's loading and validation: TOML in, one frozen Config out, or a ConfigError.

Every default lives on its field; with no file at all the defaults make a working
relay (SMTP on 127.0.0.1:2525, spool under ./var/). Validation names the key and says
what is wrong (`[limits] max_recipients: must be an integer >= 1, got "ten"`).
Which file: `-c`, else $MTA_CONFIG, else /etc/mta/mta.toml when it exists, else the
embedded defaults (find()); a reload reads the same source again (reload()).

Invariants: a loaded Config is fully validated; unknown keys are errors (a typo must
not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from typing import Any, Final

from mta import contentcheck, lists
from mta.mailboxes import check_local
from mta.sections import (  # re-exported: callers import the types from mta.config
    AntivirusConfig as AntivirusConfig,
    AuthConfig as AuthConfig,
    BARE_NEWLINE_MODES as BARE_NEWLINE_MODES,
    CacheConfig as CacheConfig,
    ClusterConfig as ClusterConfig,
    Config as Config,
    ConfigError as ConfigError,
    ContentConfig as ContentConfig,
    ControlConfig as ControlConfig,
    DeliveryConfig as DeliveryConfig,
    DkimConfig as DkimConfig,
    DnsConfig as DnsConfig,
    DomainConfig as DomainConfig,
    FooterConfig as FooterConfig,
    LISTENER_MODES as LISTENER_MODES,
    LimitsConfig as LimitsConfig,
    ListConfig as ListConfig,
    ListenerConfig as ListenerConfig,
    LocalConfig as LocalConfig,
    LogConfig as LogConfig,
    MilterConfig as MilterConfig,
    Network as Network,
    ON_REDIS_DOWN as ON_REDIS_DOWN,
    PolicyConfig as PolicyConfig,
    PriorityRule as PriorityRule,
    QueueConfig as QueueConfig,
    RateConfig as RateConfig,
    RelayConfig as RelayConfig,
    ServerConfig as ServerConfig,
    TLS_POLICIES as TLS_POLICIES,
    TLS_VERSIONS as TLS_VERSIONS,
    TlsConfig as TlsConfig,
    split_hostport as split_hostport,
)


# --- loading -------------------------------------------------------------------------

SYSTEM_PATH: Final = "/etc/mta/mta.toml"  # used when it exists and neither -c nor MTA_CONFIG names a file
SYSTEM_PATH_ENV: Final = "MTA_TEST_SYSTEM_CONFIG"  # tests only: look there instead of SYSTEM_PATH
EMBEDDED: Final = Config.source  # the source of a Config made of the embedded defaults


@dataclasses.dataclass(frozen=True)
class Found:
    """Which configuration a command uses, and why: the operator is told both."""

    path: str | None  # None: the embedded defaults
    how: str  # "-c", "MTA_CONFIG", "default_path" (SYSTEM_PATH exists) or "embedded"

    @property
    def why(self) -> str:
        return {"-c": "named by -c", "MTA_CONFIG": "named by $MTA_CONFIG", "default_path": "the default path",
                "embedded": f"no -c, no $MTA_CONFIG, no {system_path()}"}[self.how]


def system_path() -> str:
    return os.environ.get(SYSTEM_PATH_ENV) or SYSTEM_PATH


def find(path: str | None) -> Found:
    """The discovery order: -c, then $MTA_CONFIG, then SYSTEM_PATH if it exists, then the
    embedded defaults. A file named by -c or MTA_CONFIG must exist (read() says so)."""
    if path:
        return Found(path, "-c")
    if env := os.environ.get("MTA_CONFIG"):
        return Found(env, "MTA_CONFIG")
    if os.path.exists(system := system_path()):
        return Found(system, "default_path")
    return Found(None, "embedded")


def load(path: str | None = None) -> Config:
    """Load `path`, else what find() names (the embedded defaults when nothing)."""
    return read(find(path))


def read(found: Found) -> Config:
    if found.path is None:
        return Config()
    try:
        with open(found.path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{found.path}: no such file ({found.why})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{found.path}: not valid TOML: {exc}") from None
    return parse(raw, source=found.path)


def reload(config: Config) -> Config:
    """The configuration `config` came from, read again (SIGHUP): the same file, or the
    embedded defaults again, never a file that discovery would pick now."""
    return read(Found(None, "embedded") if config.source == EMBEDDED else Found(config.source, "-c"))


def parse(raw: dict[str, Any], source: str = "<string>") -> Config:
    """Validate a decoded TOML document into a Config."""
    known = {"server", "listener", "queue", "limits", "relay", "delivery", "domains", "priority_rule",
             "routes", "dns", "cache", "local", "control", "log", "tls", "auth", "policy", "rate", "cluster",
             "milter", "dkim", "content", "antivirus", "footer", "list"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown section [{key}] (known: {', '.join(sorted(known))})")
    listeners_raw = raw.get("listener", None)
    if listeners_raw is None:
        listeners: tuple[ListenerConfig, ...] = Config().listener
    else:
        if not isinstance(listeners_raw, list) or not listeners_raw:
            raise ConfigError(f"{source}: [[listener]] must be an array of tables with at least one entry")
        listeners = tuple(
            _section(ListenerConfig, item, f"[[listener]] #{i + 1}", source)
            for i, item in enumerate(listeners_raw)
        )
    domains_raw = raw.get("domains", {})
    if not isinstance(domains_raw, dict):
        raise ConfigError(f"{source}: [domains] must be tables like [domains.\"example.com\"]")
    routes_raw = raw.get("routes", {})
    if not isinstance(routes_raw, dict) or not all(isinstance(v, str) for v in routes_raw.values()):
        raise ConfigError(f"{source}: [routes] must map domains to strings")
    config = Config(
        server=_section(ServerConfig, raw.get("server", {}), "[server]", source),
        listener=listeners,
        queue=_section(QueueConfig, raw.get("queue", {}), "[queue]", source),
        limits=_section(LimitsConfig, raw.get("limits", {}), "[limits]", source),
        relay=_section(RelayConfig, raw.get("relay", {}), "[relay]", source),
        delivery=_section(DeliveryConfig, raw.get("delivery", {}), "[delivery]", source),
        domains={_domain_key(name): _section(DomainConfig, table, f'[domains."{name}"]', source)
                 for name, table in domains_raw.items()},
        priority_rule=_array(PriorityRule, raw, "priority_rule", source),
        routes={_domain_key(name): target for name, target in routes_raw.items()},
        dns=_section(DnsConfig, raw.get("dns", {}), "[dns]", source),
        cache=_section(CacheConfig, raw.get("cache", {}), "[cache]", source),
        local=_section(LocalConfig, raw.get("local", {}), "[local]", source),
        control=_section(ControlConfig, raw.get("control", {}), "[control]", source),
        log=_section(LogConfig, raw.get("log", {}), "[log]", source),
        tls=_section(TlsConfig, raw.get("tls", {}), "[tls]", source),
        auth=_section(AuthConfig, raw.get("auth", {}), "[auth]", source),
        policy=_section(PolicyConfig, raw.get("policy", {}), "[policy]", source),
        rate=_section(RateConfig, raw.get("rate", {}), "[rate]", source),
        cluster=_section(ClusterConfig, raw.get("cluster", {}), "[cluster]", source),
        milter=_array(MilterConfig, raw, "milter", source),
        dkim=_array(DkimConfig, raw, "dkim", source),
        content=_section(ContentConfig, raw.get("content", {}), "[content]", source),
        antivirus=_section(AntivirusConfig, raw.get("antivirus", {}), "[antivirus]", source),
        footer=_array(FooterConfig, raw, "footer", source),
        list=_array(ListConfig, raw, "list", source),
        source=source,
    )
    _check(config, source)
    return config


def _section(cls: type, table: Any, name: str, source: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {name} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{source}: {name} {key}: unknown key (known: {', '.join(sorted(fields))})")
        try:
            values[key] = _coerce(hints[key], value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {name} {key}: {exc}") from None
    return cls(**values)


def _array(cls: type, raw: dict[str, Any], name: str, source: str) -> tuple[Any, ...]:
    """An array of tables ([[name]]), in file order."""
    items = raw.get(name, [])
    if not isinstance(items, list):
        raise ConfigError(f"{source}: [[{name}]] must be an array of tables (write [[{name}]], not [{name}])")
    return tuple(_section(cls, item, f"[[{name}]] #{i + 1}", source) for i, item in enumerate(items))


def _domain_key(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _coerce(hint: Any, value: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # "X | None": TOML has no null, so a present value is an X
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise TypeError(f"must be a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        if item_hint is str:
            # Domains compare case-insensitively and without the root dot.
            return tuple(_coerce(str, v).strip().lower().rstrip(".") for v in value)
        return tuple(_network(v) for v in value)
    raise TypeError(f"unsupported type {hint!r}")  # our bug: a field type with no coercion


def _network(value: Any) -> Network:
    if not isinstance(value, str):
        raise TypeError(f"must be a list of CIDR strings, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f'{value!r} is not an IP network (e.g. "10.0.0.0/8")') from None


def _check(config: Config, source: str) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}: {why}")

    if not config.server.hostname or " " in config.server.hostname:
        fail("[server] hostname", "must be a host name without spaces")
    if config.server.inbound_workers < 1:
        fail("[server] inbound_workers", "must be >= 1")
    for name in ("drain_timeout_seconds", "heartbeat_timeout_seconds"):
        if getattr(config.server, name) <= 0:
            fail(f"[server] {name}", "must be > 0")
    seen: set[str] = set()
    for i, lst in enumerate(config.listener):
        key = f"[[listener]] #{i + 1}"
        try:
            split_hostport(lst.address)
        except ValueError as exc:
            fail(f"{key} address", str(exc))
        if lst.address in seen:
            fail(f"{key} address", f"{lst.address} is configured twice")
        seen.add(lst.address)
        if lst.mode not in LISTENER_MODES:
            fail(f"{key} mode", f"must be one of {', '.join(LISTENER_MODES)}, got {lst.mode!r}")
        if lst.proxy_protocol and not lst.trusted_proxies:
            fail(f"{key} trusted_proxies", "proxy_protocol = true needs at least one trusted proxy CIDR")
    if not config.queue.path:
        fail("[queue] path", "must not be empty")
    if config.queue.max_size_bytes < 1024 * 1024:
        fail("[queue] max_size_bytes", "must be at least 1048576 (1 MiB)")
    if config.queue.active_limit < 1:
        fail("[queue] active_limit", "must be at least 1")
    if config.queue.active_reserve < 0:
        fail("[queue] active_reserve", "must be 0 or more")
    spool, drop = os.path.abspath(config.queue.path), os.path.abspath(config.queue.maildrop_dir)
    if drop == spool or drop.startswith(spool + os.sep):
        fail("[queue] maildrop", "must be outside the spool directory (the spool is private to mta; "
             "every local user must reach the maildrop)")
    limits = config.limits
    for name in ("max_message_bytes", "max_recipients", "max_connections_per_ip", "max_errors"):
        if getattr(limits, name) < 1:
            fail(f"[limits] {name}", "must be >= 1")
    for name in ("max_sessions", "max_sessions_per_worker"):
        if getattr(limits, name) < 0:
            fail(f"[limits] {name}", "must be >= 0 (0: derived from the fd limit)")
    if limits.max_recipients < 100:
        fail("[limits] max_recipients", "RFC 5321 requires accepting at least 100 recipients")
    for name in ("command_timeout_seconds", "data_timeout_seconds", "data_total_timeout_seconds",
                 "session_timeout_seconds"):
        if getattr(limits, name) <= 0:
            fail(f"[limits] {name}", "must be > 0")
    if limits.max_worker_buffered_bytes < 2 * limits.max_message_bytes:
        fail("[limits] max_worker_buffered_bytes", "must be at least 2 x max_message_bytes (a message at its "
             f"largest and its copy during the commit), got {limits.max_worker_buffered_bytes} < 2 x {limits.max_message_bytes}")
    if limits.bare_newline not in BARE_NEWLINE_MODES:
        fail("[limits] bare_newline", f"must be one of {', '.join(BARE_NEWLINE_MODES)}, got {limits.bare_newline!r}")
    _check_delivery(config, fail)
    _check_security(config, fail)
    contentcheck.check(config, fail)
    lists.check(config, fail)
    if config.log.format not in ("keyvalue", "json"):
        fail("[log] format", f'must be "keyvalue" or "json", got {config.log.format!r}')
    _check_control(config.control, fail)
    check_local(config.local, fail)
    for name in ("local_domains", "relay_domains"):
        for domain in getattr(config.relay, name):
            if not domain or any(c.isspace() or c in "@<>[]" for c in domain):
                fail(f"[relay] {name}", f"{domain!r} is not a domain name")


def _check_control(control: ControlConfig, fail: Any) -> None:
    try:
        control_host, _ = split_hostport(control.listen)
    except ValueError as exc:
        fail("[control] listen", str(exc))
    if not _loopback(control_host) and not (control.token or control.token_file):
        fail("[control] token", f"the admin API listens beyond loopback ({control.listen}): set a token "
             "(or a token_file you give its clients)")
    if control.token and control.token_file:
        fail("[control] token_file", "set token or token_file, not both")
    if bool(control.tls_cert_file) != bool(control.tls_key_file):
        fail("[control] tls_key_file", "set tls_cert_file and tls_key_file together (or neither)")
    if not control.session_seconds > 0:
        fail("[control] session_seconds", "must be > 0")
    for name in control.allowed_hosts:
        bare = name.removeprefix("[").removesuffix("]")  # an IPv6 address may come in brackets
        if not bare or bare.count(":") == 1 or not all(c.isascii() and (c.isalnum() or c in ".-_:") for c in bare):
            fail("[control] allowed_hosts", f"{name!r} is not a host name or address (no port)")


def _check_delivery(config: Config, fail: Any) -> None:
    d = config.delivery
    if d.workers < 0:
        fail("[delivery] workers", "must be >= 0 (0 = deliver nothing)")
    for name in ("max_connections", "concurrency", "initial_concurrency", "max_messages_per_connection",
                 "max_connections_per_host"):
        if getattr(d, name) < 1:
            fail(f"[delivery] {name}", "must be >= 1")
    for name in ("min_backoff_seconds", "max_backoff_seconds", "max_queue_lifetime_seconds",
                 "connect_timeout_seconds", "command_timeout_seconds", "data_timeout_seconds"):
        if getattr(d, name) <= 0:
            fail(f"[delivery] {name}", "must be > 0")
    if d.max_backoff_seconds < d.min_backoff_seconds:
        fail("[delivery] max_backoff_seconds", "must be >= min_backoff_seconds")
    if d.max_messages_per_second < 0:
        fail("[delivery] max_messages_per_second", "must be >= 0 (0 = unlimited)")
    if d.delay_warning_seconds < 0:
        fail("[delivery] delay_warning_seconds", "must be >= 0 (0 = no delay notices)")
    if not 0 <= d.connection_idle_seconds <= 300:
        fail("[delivery] connection_idle_seconds", "must be 0-300 (0 = QUIT when nothing is ready)")
    if not 1 <= d.port <= 65535:
        fail("[delivery] port", "must be a port number 1-65535")
    if d.tls not in TLS_POLICIES:
        fail("[delivery] tls", f"must be one of {', '.join(TLS_POLICIES)}, got {d.tls!r}")
    if d.smarthost:
        try:
            split_hostport(d.smarthost)
        except ValueError as exc:
            fail("[delivery] smarthost", str(exc))
    for name, dom in config.domains.items():
        key = f'[domains."{name}"]'
        if dom.tls is not None and dom.tls not in TLS_POLICIES:
            fail(f"{key} tls", f"must be one of {', '.join(TLS_POLICIES)}, got {dom.tls!r}")
        for field_name in ("concurrency", "max_messages_per_connection"):
            value = getattr(dom, field_name)
            if value is not None and value < 1:
                fail(f"{key} {field_name}", "must be >= 1")
    for name, target in config.routes.items():
        if target != "maildir":
            try:
                split_hostport(target.removeprefix("lmtp:"))
            except ValueError as exc:
                fail(f'[routes] "{name}"', f'{exc} (or "lmtp:host:port", or "maildir")')
    for server in config.dns.nameservers:
        try:
            split_hostport(server)
        except ValueError as exc:
            fail("[dns] nameservers", str(exc))


def _check_security(config: Config, fail: Any) -> None:
    tls = config.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        fail("[tls] key_file" if tls.cert_file else "[tls] cert_file", "cert_file and key_file go together")
    if tls.handshake_timeout_seconds <= 0:
        fail("[tls] handshake_timeout_seconds", "must be > 0")
    if tls.min_version not in TLS_VERSIONS:
        fail("[tls] min_version", f"must be one of {', '.join(TLS_VERSIONS)}, got {tls.min_version!r}")
    for i, lst in enumerate(config.listener):
        key = f"[[listener]] #{i + 1}"
        if lst.mode == "smtps" and not tls.cert_file:
            fail(f"{key} mode", "smtps (implicit TLS) needs [tls] cert_file and key_file")
        if lst.mode == "smtps" and lst.proxy_protocol:
            fail(f"{key} proxy_protocol", "not supported with smtps: let the proxy pass TLS through "
                 "without a PROXY header, or use a submission listener with STARTTLS")
        if lst.offers_auth and not config.auth.users_file:
            if lst.mode == "submission" or lst.auth:
                fail("[auth] users_file", f"{key} ({lst.address}) offers AUTH: set a users file "
                     "(create it with `mta users add NAME`)")
        if lst.offers_auth and not tls.cert_file and not lst.auth_plaintext:
            fail(f"{key} auth_plaintext", f"{lst.address} offers AUTH but [tls] has no certificate: "
                 "configure [tls], or set auth_plaintext = true (loopback test rigs only)")
    auth = config.auth
    for name in ("cache_ttl_seconds", "lockout_seconds"):
        if getattr(auth, name) < 0:
            fail(f"[auth] {name}", "must be >= 0")
    if auth.failure_delay_seconds < 0:
        fail("[auth] failure_delay_seconds", "must be >= 0")
    if auth.max_failures < 1 or auth.slow_after_failures < 0:
        fail("[auth] max_failures", "must be >= 1 (and slow_after_failures >= 0)")
    cluster = config.cluster
    if cluster.redis and not cluster.redis.startswith(("redis://", "rediss://", "unix://")):
        fail("[cluster] redis", f'{cluster.redis!r}: use "redis://host:port/db" or "rediss://host:port/db"')
    if cluster.on_redis_down not in ON_REDIS_DOWN:
        fail("[cluster] on_redis_down", f"must be one of {', '.join(ON_REDIS_DOWN)}, got {cluster.on_redis_down!r}")
    rate = config.rate
    if rate.window_seconds <= 0:
        fail("[rate] window_seconds", "must be > 0")
    for name in ("connections_per_window", "messages_per_window", "recipients_per_window",
                 "user_messages_per_window", "user_recipients_per_window"):
        if getattr(rate, name) < 0:
            fail(f"[rate] {name}", "must be >= 0 (0 = no limit)")
    if config.limits.max_junk_commands < 1:
        fail("[limits] max_junk_commands", "must be >= 1")
    for name in ("sender_deny", "recipient_deny"):
        for entry in getattr(config.policy, name):
            local, _, domain = entry.rpartition("@")
            if not domain or any(c.isspace() or c in "<>" for c in entry):
                fail(f"[policy] {name}", f'{entry!r}: use "user@example.com" or "example.com"')
    for zone in config.policy.dnsbl:
        if not zone or "@" in zone or any(c.isspace() for c in zone) or not all(zone.split(".")):
            fail("[policy] dnsbl", f"{zone!r} is not a DNS zone")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
