"""Configuration: embedded defaults, validation errors that name the key."""

import ipaddress

import pytest

from mta.config import Config, ConfigError, load, parse


def test_embedded_defaults_listen_on_2525_with_spool_under_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    config = load(None)
    assert [l.address for l in config.listener] == ["127.0.0.1:2525"]
    assert config.queue.path.startswith("var/")
    assert config.limits.bare_newline == "reject"


def test_mta_config_environment_variable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mta.toml"
    path.write_text('[server]\nhostname = "mx.example"\n')
    monkeypatch.setenv("MTA_CONFIG", str(path))
    assert load(None).server.hostname == "mx.example"


def test_full_config_parses() -> None:
    config = parse({
        "server": {"hostname": "mx.example", "inbound_workers": 2},
        "listener": [{"address": "0.0.0.0:25", "mode": "smtp"},
                     {"address": "[::1]:587", "mode": "submission", "proxy_protocol": True,
                      "trusted_proxies": ["10.0.0.0/8"]}],
        "queue": {"path": "/var/spool/mta", "max_size_bytes": 1 << 30},
        "limits": {"max_message_bytes": 1000, "max_recipients": 500, "max_connections_per_ip": 5,
                   "command_timeout_seconds": 60, "data_timeout_seconds": 120, "max_errors": 5,
                   "bare_newline": "normalize"},
        "relay": {"local_domains": ["Example.COM."], "relay_domains": [], "mynetworks": ["192.0.2.0/24"]},
        "tls": {"cert_file": "/etc/mta/cert.pem", "key_file": "/etc/mta/key.pem"},
        "auth": {"users_file": "/etc/mta/users", "sender_login_match": True},
        "policy": {"client_deny": ["198.51.100.0/24"], "sender_deny": ["Spam.Example"], "dnsbl": ["bl.test"]},
        "rate": {"messages_per_window": 100},
    })
    assert config.listener[1].offers_auth and not config.listener[0].offers_auth
    assert config.policy.sender_deny == ("spam.example",)
    assert config.listener[1].host == "::1" and config.listener[1].port == 587
    assert config.relay.local_domains == ("example.com",)
    assert config.relay.mynetworks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert config.limits.command_timeout_seconds == 60.0


@pytest.mark.parametrize(("raw", "message"), [
    ({"limits": {"max_recipients": "ten"}}, "[limits] max_recipients: must be an integer"),
    ({"limits": {"max_recipients": 10}}, "[limits] max_recipients: RFC 5321 requires"),
    ({"listener": [{"mode": "smtps"}]}, "smtps (implicit TLS) needs [tls] cert_file"),
    ({"listener": [{"mode": "submission"}]}, "[auth] users_file: [[listener]] #1 (127.0.0.1:2525) offers AUTH"),
    ({"listener": [{"mode": "submission"}], "auth": {"users_file": "u"}}, "auth_plaintext: 127.0.0.1:2525 offers AUTH"),
    ({"tls": {"cert_file": "c"}}, "[tls] key_file: cert_file and key_file go together"),
    ({"tls": {"cert_file": "c", "key_file": "k", "min_version": "SSLv3"}}, "[tls] min_version: must be one of"),
    ({"policy": {"sender_deny": ["a b"]}}, "[policy] sender_deny"),
    ({"rate": {"window_seconds": 0}}, "[rate] window_seconds: must be > 0"),
    ({"cluster": {"redis": "127.0.0.1:6379"}}, '[cluster] redis: \'127.0.0.1:6379\': use "redis://host:port/db"'),
    ({"cluster": {"redis": "redis://r:6379/0", "on_redis_down": "wait"}},
     '[cluster] on_redis_down: must be one of local, tempfail'),
    ({"cluster": {"redis": "redis://r:6379/0", "redis_ca_file": "/etc/ssl/certs/ca-certificates.crt"}},
     "[cluster] redis: redis_ca_file, redis_cert_file and redis_key_file apply to TLS only"),
    ({"cluster": {"redis": "rediss://r:6379/0", "redis_cert_file": "/etc/hostname"}},
     "[cluster] redis_cert_file: a client certificate needs both redis_cert_file and redis_key_file"),
    ({"cluster": {"redis": "redis+sentinel://s1:26379,s2/mta/0"}}, "[cluster] redis: 'redis+sentinel://s1:26379,s2/mta/0': "
     "'s2' is not host:port"),
    ({"cluster": {"redis": "redis+sentinel://s1:26379"}}, "no master name"),
    ({"cluster": {"redis": "rediss://r:6379/0", "redis_ca_file": "/nonexistent/ca.pem"}},
     "[cluster] redis_ca_file: /nonexistent/ca.pem: no such file"),
    ({"limits": {"max_recipeints": 10}}, "[limits] max_recipeints: unknown key"),
    ({"limits": {"bare_newline": "allow"}}, "[limits] bare_newline: must be one of reject, normalize"),
    ({"limits": {"session_timeout_seconds": 0}}, "[limits] session_timeout_seconds: must be > 0"),
    ({"limits": {"data_total_timeout_seconds": -1}}, "[limits] data_total_timeout_seconds: must be > 0"),
    ({"limits": {"max_worker_buffered_bytes": 40 * 1024**2}},
     "[limits] max_worker_buffered_bytes: must be at least 2 x max_message_bytes"),
    ({"serverr": {}}, "unknown section [serverr]"),
    ({"listener": [{"address": "localhost"}]}, '[[listener]] #1 address: expected "host:port"'),
    ({"listener": [{"address": "127.0.0.1:99999"}]}, "port 99999 is out of range"),
    ({"listener": [{"address": "127.0.0.1:25", "mode": "lmtp"}]}, "[[listener]] #1 mode: must be one of"),
    ({"listener": [{"address": "127.0.0.1:25", "proxy_protocol": True}]}, "trusted_proxies"),
    ({"relay": {"mynetworks": ["10.0.0.300/8"]}}, "[relay] mynetworks: '10.0.0.300/8' is not an IP network"),
    ({"queue": {"max_size_bytes": 1000}}, "[queue] max_size_bytes: must be at least 1048576"),
    ({"server": {"inbound_workers": True}}, "[server] inbound_workers: must be an integer"),
    ({"delivery": {"connection_idle_seconds": -1}}, "[delivery] connection_idle_seconds: must be 0-300"),
    ({"delivery": {"delay_warning_seconds": -1}}, "[delivery] delay_warning_seconds: must be >= 0"),
])
def test_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(raw, source="test.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("test.toml: ")


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "absent.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(bad))


def test_defaults_live_on_the_fields() -> None:
    assert parse({}) == Config(source="<string>")


def test_the_shipped_example_config_is_valid() -> None:
    from pathlib import Path
    example = Path(__file__).resolve().parents[2] / "deploy" / "mta.example.toml"
    config = load(str(example))
    assert config.server.hostname == "mx1.example.com"


def test_admin_api_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(ConfigError, match=r"\[control\] token: the admin API listens beyond loopback"):
        parse({"control": {"listen": "0.0.0.0:9025"}})
    assert parse({"control": {"listen": "0.0.0.0:9025", "token": "s3cret"}}).control.token == "s3cret"
    assert parse({"control": {"listen": "[::1]:9025"}}).control.token == ""
    assert parse({"control": {"listen": "0.0.0.0:9025", "token_file": "/etc/mta/api.token"}}).control.token == ""


def test_admin_api_token_sources_and_allowed_hosts() -> None:
    with pytest.raises(ConfigError, match=r"\[control\] token_file: set token or token_file, not both"):
        parse({"control": {"token": "s3cret", "token_file": "/etc/mta/api.token"}})
    assert Config().control.allowed_hosts == ("localhost",)
    assert parse({"control": {"allowed_hosts": ["mx1.example", "10.0.0.1", "::1", "[::1]"]}}).control.allowed_hosts
    for bad in ("mx1.example:9025", "a b", "", "http://x", "x/y"):
        with pytest.raises(ConfigError, match=r"\[control\] allowed_hosts: .* is not a host name or address"):
            parse({"control": {"allowed_hosts": [bad]}})


def test_the_maildrop_sits_beside_the_spool_unless_set_and_never_inside_it() -> None:
    assert parse({"queue": {"path": "/var/spool/mta"}}).queue.maildrop_dir == "/var/spool/mta-maildrop"
    assert parse({"queue": {"path": "/var/spool/mta/"}}).queue.maildrop_dir == "/var/spool/mta-maildrop"
    assert parse({"queue": {"maildrop": "/var/spool/drop"}}).queue.maildrop_dir == "/var/spool/drop"
    for inside in ("/var/spool/mta", "/var/spool/mta/drop"):
        with pytest.raises(ConfigError, match=r"\[queue\] maildrop: must be outside the spool directory"):
            parse({"queue": {"path": "/var/spool/mta", "maildrop": inside}})


def test_cluster_section() -> None:
    assert parse({}).cluster.redis == ""  # no cluster: every limit is the node's own
    config = parse({"cluster": {"redis": "redis://10.0.0.5:6379/0", "node": "mx1", "on_redis_down": "tempfail"}})
    assert (config.cluster.node, config.cluster.on_redis_down) == ("mx1", "tempfail")
    with pytest.raises(ConfigError, match=r"\[cluster\] on_redis_down: must be one of local, tempfail"):
        parse({"cluster": {"on_redis_down": "ignore"}})
    with pytest.raises(ConfigError, match=r"\[cluster\] redis: .* use \"redis://host:port/db\""):
        parse({"cluster": {"redis": "10.0.0.5:6379"}})
