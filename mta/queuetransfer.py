"""`mta queue transfer --to HOST:PORT (ID...|--domain D|--all)`: this node's queued
messages relayed to another mta node over SMTP, each deleted here only after its 250.

Which messages, and how they are kept from the local scheduler meanwhile, is `mta queue
export --delete`'s machinery (mta/queueexport.py's Export, which Transfer extends): while
the server runs, each batch is held through the scheduler and read once no session
carries it; a stopped server's spool is locked for the whole run. What was not moved is
released at the end (a deferred recipient becomes due now).

Per message, one SMTP transaction with the envelope as a next hop would get it (the
lines mta/bsmtp.py's `commands` gives: MAIL FROM with SIZE, BODY, SMTPUTF8, RET, ENVID;
one RCPT TO with NOTIFY, ORCPT per recipient still queued, ready, deferred or held),
then the stored content as it is, under one added header field
`X-Mta-Transfer: id=<our id>; from=<our hostname>` (the receiving node recognises it:
workers/inbound/transferin.py). The DSN duty moves with the message: the other node
sends the bounces and notices from then on.

- All RCPTs 250, then DATA/BDAT 250: the message is deleted here at once, before the next.
- A refusal (MAIL, any RCPT, DATA): RSET, the message stays here (released at the end),
  named on stderr; nothing is sent half (no recipient is split off its message).
- The connection breaks or the other node says 421: the run stops; what it held is
  released, except a message whose content was already out: the other node may have it,
  so it stays held here and is named. Run the transfer again: a copy the other node
  already had is logged there as `event=transfer_duplicate` (at most one per break).
  The same holds when this command is killed between the other node's 250 and our delete.

A receiving node that lets this one relay only over TLS or after AUTH: `--starttls`
(required: no STARTTLS offered, or a certificate that does not verify against
`--ca-file` or the system's CAs, stops the run before any message) and `--user NAME
--password-file FILE` (AUTH after STARTTLS: a password is never sent in clear).

Progress on stderr each second, a summary on stdout; exit 1 when anything stayed here.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import ssl
import sys
from dataclasses import dataclass
from typing import Final

from mtaqueue.backend import QueueError
from mtaqueue.records import Envelope

from mta import adminclient, bsmtp, messages, queuebulk
from mta.adminclient import ControlError
from mta.config import Config
from mta.outfile import Pacer
from mta.queueexport import Export, ExportError
from mta.sections import split_hostport
from mta.smtp import client as smtpclient

REPLY_SECONDS: Final = 300.0  # the longest wait for one reply (the other node's commit is in it)


class TransferError(ExportError):
    """The transfer stopped; the message says what to do."""


class Uncertain(TransferError):
    """The content was sent but its reply never came: the other node may have the message."""


@dataclass(frozen=True)
class Login:
    """How the session gets the right to relay beyond the other node's mynetworks."""

    tls: ssl.SSLContext | None = None  # STARTTLS, required, with this verification
    user: str = ""
    password: str = ""


class Relay:
    """One SMTP session to the other node, a transaction per message."""

    def __init__(self, host: str, port: int, helo: str, login: Login) -> None:
        self.where = f"{host}:{port}"
        try:
            # host given here, not to connect(): STARTTLS checks the certificate against it
            self.smtp = smtplib.SMTP(host, port, local_hostname=helo, timeout=REPLY_SECONDS)
            self._ehlo()
            if login.tls is not None:
                self._starttls(login.tls)
            if login.user:
                self._login(login.user, login.password)
        except TransferError:
            self.smtp.close()
            raise
        except OSError as exc:
            raise TransferError(f"cannot reach {self.where}: {exc}") from None
        if not self.smtp.has_extn("dsn"):
            raise TransferError(f"{self.where} does not offer DSN: the messages' DSN parameters would be lost")

    def _ehlo(self) -> None:
        code, text = self.smtp.ehlo()
        if code != 250:
            raise TransferError(f"{self.where} answered EHLO with {code} {text.decode('utf-8', 'replace')}")

    def _starttls(self, context: ssl.SSLContext) -> None:
        if not self.smtp.has_extn("starttls"):
            raise TransferError(f"{self.where} does not offer STARTTLS (--starttls): is it the right listener, "
                                "with [tls] configured?")
        try:
            code, text = self.smtp.starttls(context=context)
        except ssl.SSLCertVerificationError as exc:
            raise TransferError(f"{self.where}'s certificate does not verify ({exc.verify_message}): give the CA "
                                "that signed it with --ca-file") from None
        except ssl.SSLError as exc:
            raise TransferError(f"the TLS handshake with {self.where} failed: {exc}") from None
        if code != 220:
            raise TransferError(f"{self.where} refused STARTTLS: {code} {text.decode('utf-8', 'replace')}")
        self._ehlo()

    def _login(self, user: str, password: str) -> None:
        try:
            self.smtp.login(user, password)
        except smtplib.SMTPNotSupportedError:
            raise TransferError(f"{self.where} does not offer AUTH here: use its submission listener, or "
                                "--starttls if it offers AUTH after TLS only") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise TransferError(f"{self.where} refused the login of {user!r}: {exc.smtp_code} "
                                f"{exc.smtp_error.decode('utf-8', 'replace')}: check --user and --password-file"
                                ) from None
        except smtplib.SMTPException as exc:
            raise TransferError(f"AUTH with {self.where} failed: {exc}") from None

    def send(self, envelope: Envelope, lines: list[str], content: bytes) -> str | None:
        """One message: None once the other node answered 250 after its content; else why not
        (the transaction reset). TransferError when the session is gone, Uncertain when
        it went after the content was out."""
        self.smtp.command_encoding = "utf-8" if envelope.smtputf8 else "ascii"
        try:
            for line in lines:
                refusal = self._expect(line, 250)
                if refusal:
                    return refusal
            canonical = smtpclient.canonical_body(content) == content
            if canonical:
                refusal = self._expect("DATA", 354)
                if refusal:
                    return refusal
        except OSError as exc:
            raise TransferError(f"the session with {self.where} broke: {exc}") from None
        try:
            if canonical:
                self.smtp.send(smtpclient.stuff_body(content, canonical=True))
            else:  # not CRLF text (BDAT stored it so): only BDAT carries it exactly
                self.smtp.send(f"BDAT {len(content)} LAST\r\n".encode("ascii") + content)
            code, text = self.smtp.getreply()
        except OSError as exc:
            raise Uncertain(f"the session with {self.where} broke after the content of {envelope.id}: {exc}") from None
        if code == 421:
            raise Uncertain(f"{self.where} closed the session after the content of {envelope.id}: "
                            f"{code} {text.decode('utf-8', 'replace')}")
        return None if code == 250 else self._reset("content", code, text)

    def _expect(self, line: str, wanted: int) -> str | None:
        code, text = self.smtp.docmd(line)
        if code == 421:
            raise TransferError(f"{self.where} closed the session: {code} {text.decode('utf-8', 'replace')}")
        return None if code == wanted else self._reset(line.partition(":")[0].partition(" ")[0], code, text)

    def _reset(self, what: str, code: int, text: bytes) -> str:
        self.smtp.rset()
        return f"{self.where} refused {what}: {code} {text.decode('utf-8', 'replace')}"

    def close(self) -> None:
        try:
            self.smtp.quit()
        except OSError:
            self.smtp.close()  # gone already: nothing to say goodbye to


class Transfer(Export):
    command = "mta queue transfer"
    not_done = "left here"

    def __init__(self, cfg: Config, args: argparse.Namespace, spool: object, running: bool, login: Login) -> None:
        super().__init__(cfg, args, spool, running)  # type: ignore[arg-type]
        self.relay: Relay | None = None
        self.login = login

    def run(self) -> int:
        with self.ids:
            if self.running and self._scheduler_down():
                raise TransferError(f"a server holds the spool at {self.cfg.queue.path} but its scheduler does "
                                    "not answer (starting or stopping?): try again")
            host, port = split_hostport(self.args.to)
            self.relay = Relay(host, port, self.args.helo or self.cfg.server.hostname, self.login)
            try:
                self._send()
            except BaseException:
                if self.running:
                    self._undo()
                raise
            finally:
                self.relay.close()
            print(f"transferred {self.count} message(s) to {self.args.to}"
                  + (f"; {self.finished} finished one(s) left out" if self.finished else "")
                  + (f"; {self.skipped} left here (named above)" if self.skipped else ""))
            if self.running and self.skipped:
                self._release("S")
        return 1 if self.skipped else 0

    def _scheduler_down(self) -> bool:
        return adminclient.ask_scheduler(self.cfg, messages.ActiveQuery(), messages.ActiveJobs) is None

    def _send(self) -> None:
        assert self.relay is not None
        total = self.spool.totals()["messages"] if self.args.all else len(self.args.ids)
        field = f"X-Mta-Transfer: id={{}}; from={self.cfg.server.hostname}\r\n"
        pacer = Pacer()
        for batch in self._batches():
            for envelope, body in self._settled(batch) if self.running else self._read(batch):
                try:
                    lines = bsmtp.commands(envelope)
                except ValueError as exc:  # an address no MAIL or RCPT can carry
                    self._skip(envelope, str(exc))
                    continue
                if not lines:
                    self.finished += 1
                    continue
                try:
                    refusal = self.relay.send(envelope, lines, field.format(envelope.id).encode() + body)
                except Uncertain as exc:
                    self.holding.pop(envelope.id, None)  # never released: the other node may have it
                    raise Uncertain(f"{exc}; it stays held here: run the transfer again (a copy the other node "
                                    "already has is logged there as event=transfer_duplicate)") from None
                if refusal:
                    self._skip(envelope, refusal)
                    continue
                if self.running:
                    self._scheduler(messages.QueueCommand("delete", (envelope.id,)))
                else:
                    self.spool.delete([envelope.id])
                self.ids.write(f"{envelope.id} T\n")
                self.count += 1
                if pacer.due():
                    print(queuebulk.progress_line("transferred", self.count, total), file=sys.stderr, flush=True)


def login_of(args: argparse.Namespace) -> Login:
    """--starttls, --ca-file, --user, --password-file as a Login; ValueError saying what is wrong."""
    if (args.user is None) != (args.password_file is None):
        raise ValueError("--user and --password-file go together")
    if args.user is not None and not args.starttls:
        raise ValueError("--user needs --starttls: a password is never sent in clear")
    if args.ca_file and not args.starttls:
        raise ValueError("--ca-file applies to --starttls")
    tls = None
    if args.starttls:
        try:
            tls = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--ca-file {args.ca_file}: {exc}") from None
    password = ""
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"--password-file: {exc}") from None
        if not password:
            raise ValueError(f"--password-file {args.password_file}: the first line is empty")
    return Login(tls, args.user or "", password)


def run_transfer(cfg: Config, args: argparse.Namespace) -> int:
    from mtaqueue.backend_lmdb import LmdbBackend

    from mta.master.listeners import ServeError
    from mta.serve import lock_spool
    if not (args.ids or args.domain or args.all):
        print("mta queue transfer: name message IDs, --domain D or --all", file=sys.stderr)
        return 2
    try:
        split_hostport(args.to)
        login = login_of(args)
    except ValueError as exc:
        print(f"mta queue transfer: {exc}", file=sys.stderr)
        return 2
    try:
        lock_fd: int | None = lock_spool(cfg.queue.path)  # stopped: no server may start before we are done
    except ServeError:
        lock_fd = None  # running: the scheduler holds, then deletes
    try:
        spool = LmdbBackend(cfg.queue.path, cfg.queue.max_size_bytes, readonly=True, recount=False)
        try:
            return Transfer(cfg, args, spool, running=lock_fd is None, login=login).run()
        finally:
            spool.close()
    except (OSError, QueueError, ControlError, ExportError) as exc:
        print(f"mta queue transfer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mta queue transfer: interrupted", file=sys.stderr)
        return 130
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def add_parsers(qsub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    q = qsub.add_parser("transfer", parents=[common],
                        help="relay queued messages to another mta node over SMTP, each deleted here after its 250")
    q.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="the other node's SMTP listener (it must let this node relay: mynetworks, or --user)")
    q.add_argument("--helo", metavar="NAME", help="the EHLO name (default: [server] hostname)")
    q.add_argument("--starttls", action="store_true",
                   help="STARTTLS before anything is sent (required: the run stops if it is not offered or the "
                        "certificate does not verify)")
    q.add_argument("--ca-file", metavar="FILE", help="with --starttls: the CA that signed the other node's "
                   "certificate (PEM; default: the system's CAs)")
    q.add_argument("--user", metavar="NAME", help="AUTH as NAME after STARTTLS (the other node relays for its users)")
    q.add_argument("--password-file", metavar="FILE", help="the password for --user: the first line of FILE")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", metavar="ID", default=[])
    which.add_argument("--domain", help="every message with a queued recipient at this destination")
    which.add_argument("--all", action="store_true", help="every message")
    q.set_defaults(func=run_transfer, needs_spool=True)
