"""A test milter on libmilter itself (Debian's python3-milter), run by /usr/bin/python3.

    /usr/bin/python3 libmilter_peer.py inet:PORT@127.0.0.1 | unix:/path

What it does is chosen by the envelope sender's local part (see eom and envfrom),
so one running milter serves every test. Headers are @noreply (SMFIP_NR_HDR), HELO is
@nocallback (SMFIP_NOHELO), and body() may answer SKIP, so negotiation is exercised.
Not a pytest module: it imports Milter, which only the system Python has.
"""

import sys
import time

import Milter


class TestMilter(Milter.Base):
    def __init__(self):
        self.id = Milter.uniqueID()

    def connect(self, hostname, family, hostaddr):
        self.client = (hostname, hostaddr)
        return Milter.CONTINUE

    @Milter.nocallback
    def hello(self, hostname):
        return Milter.CONTINUE

    def envfrom(self, sender, *args):
        self.sender = sender.strip("<>")
        self.local = self.sender.split("@")[0]
        self.mail_args = args
        self.rcpts = []
        self.headers = []
        self.chunks = 0
        self.body_bytes = 0
        if self.local == "reject":
            self.setreply("550", "5.7.1", "sender refused by test milter")
            return Milter.REJECT
        if self.local == "hang":
            time.sleep(5)  # longer than the tests' 1 s step timeout
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *args):
        self.rcpts.append(rcpt.strip("<>"))
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.headers.append((name, value))
        return Milter.CONTINUE

    def body(self, chunk):
        self.chunks += 1
        self.body_bytes += len(chunk)
        if self.local == "skip":
            return Milter.SKIP
        return Milter.CONTINUE

    def eom(self):
        local = self.local
        if local == "tempfail":
            self.setreply("451", "4.7.1", "scanner busy, try later")
            return Milter.TEMPFAIL
        if local == "plainreject":
            return Milter.REJECT
        if local == "discard":
            return Milter.DISCARD
        if local == "accept":
            return Milter.ACCEPT
        if local == "headers":
            self.addheader("X-Added", "by libmilter")
            self.chgheader("Subject", 1, "[scanned] " + dict(self.headers).get("Subject", ""))
            self.chgheader("X-Remove", 2, "")
            self.addheader("X-Top", "first", 0)
        elif local == "body":
            self.replacebody(b"replaced body\r\n")
        elif local == "rcpts":
            self.addrcpt("<added@example.test>")
            self.delrcpt("<gone@example.test>")
            self.chgfrom("<new-sender@example.test>", "BODY=8BITMIME")
        elif local == "quarantine":
            self.quarantine("held by test milter")
        elif local == "sleep":
            time.sleep(0.2)  # bench/run --content: concurrent sessions must overlap their waits
            self.addheader("X-Slept", "0.2")
        elif local == "slow":
            for _ in range(6):
                time.sleep(0.4)
                self.progress()
            self.addheader("X-Slow", "done")
        elif local in ("report", "skip"):
            seen = {
                "rcpts": ",".join(self.rcpts),
                "args": ",".join(self.mail_args),
                "headers": ",".join(name for name, _ in self.headers),
                "chunks": str(self.chunks),
                "bytes": str(self.body_bytes),
                "client": f"{self.client[0]}/{self.client[1][0] if self.client[1] else ''}",
            }
            for macro in ("{i}", "j", "_", "{client_addr}", "{auth_authen}", "{tls_version}"):
                seen[macro] = self.getsymval(macro) or ""
            for key, value in seen.items():
                self.addheader("X-Seen-" + key.strip("{}"), value)
        return Milter.ACCEPT


def main():
    Milter.factory = TestMilter
    print("test milter ready", file=sys.stderr, flush=True)
    Milter.runmilter("mta-test", sys.argv[1], timeout=60)


if __name__ == "__main__":
    main()
