"""The content pipeline's config tables: parsed in file order, every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import ConfigError, parse
from mta.dkim.keys import DkimKey

LISTENERS = {"listener": [{"address": "127.0.0.1:25"}, {"address": "127.0.0.1:587"}]}


def test_the_tables_parse_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes(DkimKey.generate("ed25519"))
    config = parse({**LISTENERS,
                    "milter": [{"address": "inet:127.0.0.1:11332", "default_action": "accept"},
                               {"address": "unix:/run/opendkim.sock", "listeners": ["127.0.0.1:587"]}],
                    "dkim": [{"domain": "example.com", "selector": "s1", "key_file": str(tmp_path / "k.pem")}],
                    "content": {"reject_attachment_extensions": ["EXE", "vbs"], "tnef": "convert"},
                    "antivirus": {"clamd": "tcp:127.0.0.1:3310", "on_virus": "quarantine"},
                    "footer": [{"sender_domain": "*", "text": "-- footer"}]})
    assert [m.address for m in config.milter] == ["inet:127.0.0.1:11332", "unix:/run/opendkim.sock"]
    assert config.milter[1].listeners == ("127.0.0.1:587",) and config.milter[0].default_action == "accept"
    assert config.content.reject_attachment_extensions == ("exe", "vbs")
    assert config.antivirus.on_virus == "quarantine" and config.footer[0].text == "-- footer"


@pytest.mark.parametrize("raw,message", [
    ({"milter": {"address": "inet:127.0.0.1:1"}}, "[[milter]] must be an array of tables"),
    ({"milter": [{"address": "127.0.0.1:11332"}]}, "[[milter]] #1 address"),
    ({"milter": [{"address": "inet:127.0.0.1:1", "default_action": "drop"}]}, "[[milter]] #1 default_action"),
    ({"milter": [{"address": "inet:127.0.0.1:1", "timeout_seconds": 0}]}, "[[milter]] #1 timeout_seconds"),
    ({"milter": [{"address": "inet:127.0.0.1:1", "listeners": ["127.0.0.1:2526"]}]},
     "'127.0.0.1:2526' is not a configured listener"),
    ({"milter": [{"address": "inet:127.0.0.1:1", "port": 1}]}, "[[milter]] #1 port: unknown key"),
    ({"dkim": [{"domain": "example.com", "selector": "s1"}]}, "[[dkim]] #1 key_file: is required"),
    ({"dkim": [{"domain": "example.com", "selector": "s1", "key_file": "/nonexistent/k.pem"}]},
     "cannot read the DKIM key /nonexistent/k.pem"),
    ({"dkim": [{"domain": "example.com", "selector": "s1", "key_file": "/k", "headers": ["to:"]}]},
     "[[dkim]] #1 headers"),
    ({"content": {"reject_attachment_extensions": [".exe"]}}, "[content] reject_attachment_extensions"),
    ({"content": {"tnef": "strip"}}, "[content] tnef"),
    ({"antivirus": {"clamd": "127.0.0.1:3310"}}, "[antivirus] clamd"),
    ({"antivirus": {"on_error": "reject"}}, "[antivirus] on_error"),
    ({"footer": [{"text": "x"}]}, "[[footer]] #1 sender_domain"),
])
def test_bad_values_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(raw, source="test.toml")
    assert message in str(caught.value)
