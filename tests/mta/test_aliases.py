"""The aliases file: parsing with line numbers, lists, recursion, loops, bare names."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.aliases import MAX_DEPTH, AliasError, Aliases

LOCAL = ("example.com", "example.org")


def load(tmp_path: Path, text: str) -> Aliases:
    path = tmp_path / "aliases"
    path.write_text(text, encoding="utf-8")
    return Aliases.load(str(path))


def test_none_means_no_aliases() -> None:
    aliases = Aliases.load(None)
    assert aliases.expand("info@example.com", LOCAL) is None
    assert "info@example.com" not in aliases and len(aliases) == 0


def test_a_list_of_targets(tmp_path: Path) -> None:
    aliases = load(tmp_path, "# the team\n\ninfo@example.com: alice@example.com, bob@example.net\n")
    assert aliases.expand("info@example.com", LOCAL) == ["alice@example.com", "bob@example.net"]
    assert aliases.expand("alice@example.com", LOCAL) is None
    assert aliases.expand("info@example.org", LOCAL) is None  # a full key names one domain


def test_not_an_alias_is_none(tmp_path: Path) -> None:
    aliases = load(tmp_path, "info@example.com: alice@example.com\n")
    assert aliases.expand("bob@example.com", LOCAL) is None


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    aliases = load(tmp_path, "Info@Example.COM: Alice@example.com\nSales: bob@example.net\n")
    assert aliases.expand("INFO@example.com", LOCAL) == ["Alice@example.com"]
    assert aliases.expand("sales@EXAMPLE.ORG", ["Example.ORG"]) == ["bob@example.net"]
    assert "info@EXAMPLE.com" in aliases and "SALES" in aliases


def test_bare_local_part_applies_to_every_local_domain(tmp_path: Path) -> None:
    aliases = load(tmp_path, "postmaster: admin@example.com\n")
    assert aliases.expand("postmaster@example.com", LOCAL) == ["admin@example.com"]
    assert aliases.expand("Postmaster@example.org", LOCAL) == ["admin@example.com"]
    assert aliases.expand("postmaster@example.net", LOCAL) is None  # not a local domain
    assert aliases.expand("postmaster", LOCAL) == ["admin@example.com"]  # RCPT TO:<postmaster>
    assert "postmaster" in aliases and "postmaster@example.com" not in aliases


def test_full_key_wins_over_bare_name(tmp_path: Path) -> None:
    aliases = load(tmp_path, "abuse: security@example.com\nabuse@example.org: legal@example.org\n")
    assert aliases.expand("abuse@example.org", LOCAL) == ["legal@example.org"]
    assert aliases.expand("abuse@example.com", LOCAL) == ["security@example.com"]


def test_bare_target_takes_the_domain_being_expanded(tmp_path: Path) -> None:
    aliases = load(tmp_path, "postmaster: root\nroot: admin\n")
    assert aliases.expand("postmaster@example.org", LOCAL) == ["admin@example.org"]


def test_recursion_dedup_and_order(tmp_path: Path) -> None:
    aliases = load(tmp_path, (
        "all@example.com: staff@example.com, ops@example.com, carol@example.net\n"
        "staff@example.com: alice@example.com, bob@example.com\n"
        "ops@example.com: BOB@example.com, dave@example.com, oncall\n"
        "oncall: eve@example.org\n"
    ))
    assert aliases.expand("all@example.com", LOCAL) == [
        "alice@example.com", "bob@example.com", "dave@example.com", "eve@example.org", "carol@example.net"]


def test_targets_in_other_domains_are_not_expanded_by_bare_names(tmp_path: Path) -> None:
    aliases = load(tmp_path, "sales@example.com: postmaster@example.net\npostmaster: admin@example.com\n")
    assert aliases.expand("sales@example.com", LOCAL) == ["postmaster@example.net"]


def test_an_alias_naming_itself_keeps_its_own_mailbox(tmp_path: Path) -> None:
    aliases = load(tmp_path, "alice@example.com: Alice@example.com, archive@example.com\n")
    assert aliases.expand("alice@example.com", LOCAL) == ["Alice@example.com", "archive@example.com"]


def test_loop_is_an_error(tmp_path: Path) -> None:
    aliases = load(tmp_path, "a@example.com: b@example.com\nb@example.com: c, x@example.net\nc: a@example.com\n")
    with pytest.raises(AliasError, match=r"loop: a@example.com -> b@example.com -> c@example.com -> a@example.com"):
        aliases.expand("a@example.com", LOCAL)
    with pytest.raises(AliasError, match=str(tmp_path / "aliases")):
        aliases.expand("b@example.com", LOCAL)


def test_depth_limit(tmp_path: Path) -> None:
    chain = "".join(f"l{i}: l{i + 1}\n" for i in range(MAX_DEPTH))  # l0 .. l9 are aliases: 10 levels
    aliases = load(tmp_path, chain)
    assert aliases.expand("l0@example.com", LOCAL) == [f"l{MAX_DEPTH}@example.com"]
    aliases = load(tmp_path, chain + f"l{MAX_DEPTH}: end@example.net\n")  # 11 levels
    with pytest.raises(AliasError, match="deeper than 10 levels"):
        aliases.expand("l0@example.com", LOCAL)
    assert aliases.expand("l1@example.com", LOCAL) == ["end@example.net"]


def test_diamond_is_not_a_loop(tmp_path: Path) -> None:
    aliases = load(tmp_path, "top: left, right\nleft: shared\nright: shared, r@example.net\nshared: s@example.net\n")
    assert aliases.expand("top@example.com", LOCAL) == ["s@example.net", "r@example.net"]


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("info@example.com alice@example.com\n", 1, "expected 'name: target"),
    ("# c\n\ninfo: \n", 3, "info has no targets"),
    ("ok: a@example.com\ninfo: a@example.com,,b@example.com\n", 2, "empty target"),
    ("info: a@example.com,\n", 1, "empty target"),
    ("info: |/usr/bin/procmail\n", 1, "unsupported target"),
    ("info: /var/mail/info\n", 1, "unsupported target"),
    ("info: :include:/etc/list\n", 1, "unsupported target"),
    ("info: alice @example.com\n", 1, "bad target address"),
    ("info: a@example.com  # inline comment\n", 1, "bad target address"),
    ("info: a@@example.com\n", 1, "bad target address"),
    ("info: <a@example.com>\n", 1, "bad target address"),
    ("in fo: a@example.com\n", 1, "bad alias name"),
    (": a@example.com\n", 1, "bad alias name"),
    ("info@: a@example.com\n", 1, "bad alias name"),
    ("a\n\n\nInfo: x@example.net\nINFO: y@example.net\n", 1, "expected"),
    ("ok: x@example.net\nInfo: x@example.net\n\nINFO: y@example.net\n", 4, "INFO is already defined on line 2"),
])
def test_bad_lines_name_file_line_and_problem(tmp_path: Path, text: str, line: int, problem: str) -> None:
    with pytest.raises(AliasError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'aliases'}:{line}: ")
    assert problem in message


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_bytes(b"a: b@example.com\nc: \xff@example.com\n")
    with pytest.raises(AliasError, match=r"aliases:2: not UTF-8"):
        Aliases.load(str(path))


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Aliases.load(str(tmp_path / "absent"))


def test_alias_error_is_a_value_error() -> None:
    assert issubclass(AliasError, ValueError)


def test_whitespace_and_comments(tmp_path: Path) -> None:
    aliases = load(tmp_path, "  # indented comment\n\t\ninfo :  a@example.com ,b@example.com  \r\n")
    assert aliases.expand("info@example.com", LOCAL) == ["a@example.com", "b@example.com"]
