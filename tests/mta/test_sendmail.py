"""mta-sendmail without a server: its options as cron, PHP and scripts pass them, its exit
codes (sysexits.h), the file it drops, and -bs's SMTP transcript."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from mta import maildrop, sendmail, smtpstdio
from mta.config import parse
from mta.maildrop import Drop, DropRecipient
from mta.sendmail import UsageError, parse as parse_args


def test_cron_and_php_command_lines() -> None:
    cron = parse_args(["-t", "-i"])
    assert cron.extract and cron.ignore_dots and cron.mode == "mail" and cron.recipients == []
    php = parse_args(["-t", "-i", "-f", "bounce@example.com"])
    assert php.sender == "bounce@example.com" and php.extract
    assert parse_args(["-ti", "-fbounce@example.com"]).sender == "bounce@example.com"
    script = parse_args(["-oi", "-odb", "-oem", "-F", "Backup Robot", "-r", "<>", "root", "a@x.test, b@x.test"])
    assert script.ignore_dots and script.full_name == "Backup Robot" and script.sender == ""
    assert script.recipients == ["root", "a@x.test, b@x.test"] and script.warnings == []


def test_modes_dsn_options_and_the_end_of_options() -> None:
    assert [parse_args([f"-b{m}"]).mode for m in "mspi"] == ["mail", "smtp", "mailq", "noop"]
    assert parse_args(["-I"]).mode == "noop"
    dsn = parse_args(["-N", "success,delay", "-R", "hdrs", "-V", "env-1", "-C", "/etc/x.toml"])
    assert (dsn.notify, dsn.ret, dsn.envid, dsn.config) == (("SUCCESS", "DELAY"), "HDRS", "env-1", "/etc/x.toml")
    assert parse_args(["-N", "never"]).notify == ("NEVER",)
    assert parse_args(["--", "-odd@x.test"]).recipients == ["-odd@x.test"]
    assert parse_args(["a@x.test", "-t"]).extract  # options after addresses, as GNU getopt allows


def test_unknown_options_are_ignored_with_a_warning_and_known_ones_silently() -> None:
    opts = parse_args(["-z", "-Gv", "-L", "label", "-h", "17", "-O", "x=y", "a@x.test"])
    assert opts.warnings == ["ignoring the unknown option -z"] and opts.recipients == ["a@x.test"]


@pytest.mark.parametrize("args, why", [
    (["-f"], "-f needs a value"),
    (["-bv"], "-bv is not supported"),
    (["-N", "sometimes"], "-N takes never"),
    (["-N", "never,success"], "-N takes never"),
    (["-R", "all"], "-R takes full or hdrs"),
    (["-V", "a b\x01"], "-V takes printable ASCII"),
    (["-q"], "use `mta queue retry --all`"),
])
def test_wrong_option_values_are_usage_errors(args: list[str], why: str) -> None:
    with pytest.raises(UsageError, match=f".*{why}"):
        parse_args(args)


# --- the whole command, into a maildrop in tmp_path ---------------------------------------------

@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nhostname = "mx.test"\n[queue]\npath = "{tmp_path}/spool"\n'
                    "[limits]\nmax_message_bytes = 2000\n")
    maildrop.prepare(str(tmp_path / "spool-maildrop"))
    return path


def run(config: Path, args: list[str], stdin: bytes, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, prog: str = "sendmail") -> tuple[int, str, list[tuple[Drop, bytes]]]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = sendmail.main(["-C", str(config), *args], prog=prog)
    new = config.parent / "spool-maildrop" / "new"
    drops = [maildrop.decode(p.read_bytes(), 10**6) for p in sorted(new.iterdir())]
    return code, capsys.readouterr().err, drops


def test_a_message_is_dropped_with_its_envelope_and_exit_0(config_file: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, err, [(drop, message)] = run(config_file, ["-t", "-i", "-f", "bounce@example.com", "-N", "failure", "-z",
                                                     "root"],
                                       b"To: a@x.test\nBcc: b@x.test, A@X.test\nSubject: s\n\nbody\n.\nmore\n",
                                       capsys, monkeypatch)
    assert code == 0 and err == "mta-sendmail: ignoring the unknown option -z\n"
    assert drop == Drop("bounce@example.com", (DropRecipient("root@mx.test", ("FAILURE",)),
                                               DropRecipient("a@x.test", ("FAILURE",)),
                                               DropRecipient("b@x.test", ("FAILURE",))))
    assert b"Bcc" not in message and message.endswith(b"\r\n\r\nbody\r\n.\r\nmore\r\n")
    assert b"\r\nFrom: bounce@example.com\r\n" in message


def test_the_default_sender_is_the_user_at_the_hostname(config_file: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd
    code, _err, [(drop, _)] = run(config_file, ["a@x.test"], b"Subject: s\n\nbody\n", capsys, monkeypatch)
    assert code == 0 and drop.sender == f"{pwd.getpwuid(os.getuid()).pw_name}@mx.test"


@pytest.mark.parametrize("args, stdin, code, why", [
    ([], b"Subject: s\n\nbody\n", 64, "no recipients"),
    (["-t"], b"Subject: s\n\nbody\n", 64, "no recipients"),
    (["a@b@x.test"], b"body\n", 67, "recipient"),
    (["-f", "a b@x.test", "c@x.test"], b"body\n", 65, "sender"),
    (["a@x.test"], b"x" * 2001, 65, "larger than [limits] max_message_bytes (2000 bytes)"),
    (["a@x.test"], b"x" * 1900 + b"\n", 65, "larger than [limits] max_message_bytes"),  # with the added fields
    (["a@x.test"], b"Received: x\n" * 51 + b"\nbody\n", 65, "a mail loop?"),
    (["-bv", "a@x.test"], b"", 64, "-bv is not supported"),
])
def test_refusals_exit_with_sysexits_codes_and_drop_nothing(
        config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        args: list[str], stdin: bytes, code: int, why: str) -> None:
    got, err, drops = run(config_file, args, stdin, capsys, monkeypatch)
    assert (got, drops) == (code, []) and why in err, err


def test_no_maildrop_or_no_configuration_is_a_temporary_or_configuration_failure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(f'[queue]\npath = "{tmp_path}/spool"\n')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"body\n")))
    assert sendmail.main(["-C", str(config), "a@x.test"], prog="sendmail") == 75
    assert f"no maildrop at {tmp_path}/spool-maildrop (config: {config})" in capsys.readouterr().err
    assert sendmail.main(["-C", str(tmp_path / "absent.toml"), "a@x.test"], prog="sendmail") == 78
    assert "configuration: " in capsys.readouterr().err
    assert sendmail.main(["-C", str(tmp_path / "absent.toml")], prog="newaliases") == 0  # -bi needs nothing


# --- -bs -----------------------------------------------------------------------------------------

def test_bs_is_an_smtp_session_on_stdin_and_stdout(tmp_path: Path) -> None:
    cfg = parse({"server": {"hostname": "mx.test"}, "queue": {"path": str(tmp_path / "spool")}})
    maildrop.prepare(cfg.queue.maildrop_dir)
    session = (b"EHLO client\r\nMAIL FROM:<a@x.test> RET=HDRS ENVID=e1\r\nRCPT TO:<postmaster>\r\n"
               b"RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;old@y.test\r\nDATA\r\n"
               b"Subject: bs\r\n\r\n..dot\r\n.\r\nMAIL FROM:<bad\r\nQUIT\r\n")
    read, write = os.pipe()
    try:
        assert smtpstdio.run(cfg, io.BufferedReader(io.BytesIO(session)), write) == 0
        os.close(write)
        with os.fdopen(read, "rb") as out:
            transcript = out.read().decode().splitlines()
    finally:
        for fd in (read, write):
            try:
                os.close(fd)
            except OSError:
                pass
    [path] = (tmp_path / "spool-maildrop" / "new").iterdir()
    assert transcript == [
        "220 mx.test ESMTP", "250-mx.test", "250-PIPELINING", "250-SIZE 26214400", "250-8BITMIME", "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES", "250-CHUNKING", "250 DSN",
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
        f"250 2.0.0 Ok: queued as {path.name}",
        "501 5.1.7 Bad sender address syntax: missing closing >",
        "221 2.0.0 mx.test closing connection",
    ]
    drop, message = maildrop.decode(path.read_bytes(), 10**6)
    assert drop == Drop("a@x.test", (DropRecipient("postmaster@mx.test", None, "rfc822;postmaster"),
                                     DropRecipient("b@y.test", ("SUCCESS", "FAILURE"), "rfc822;old@y.test")),
                        "HDRS", "e1")
    assert message.startswith(b"Subject: bs\r\nDate: ") and message.endswith(b"\r\n\r\n.dot\r\n")

