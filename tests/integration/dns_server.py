"""A real authoritative DNS server for tests: UDP and TCP on 127.0.0.1, one background thread.

Built on dnspython's message API. It serves the names under one origin ("test." by
default) and answers REFUSED for anything else, so a test cannot leak to real DNS by
mistake. Per name it holds rrsets (MX, A, AAAA, CNAME, TXT... as text); a name never
configured (or removed by nxdomain()) is NXDOMAIN unless a configured name lies below
it; a type the name lacks is NODATA; both carry the SOA in the authority section (its
TTL and minimum set the negative TTL; `set_soa(None)` leaves it out). Names (or one
type of them) can answer SERVFAIL or never answer. Every query is counted per (name,
type), over UDP and TCP alike; the data can change while the server runs. A response
too large for UDP goes out truncated (TC), and the client asks again over TCP.

    server = DnsServer()
    server.set("example.test", "MX", "10 mx1.example.test.", "20 mx2.example.test.", ttl=60)
    server.set("mx1.example.test", "A", "192.0.2.1")
    resolver_config = [server.nameserver]        # "127.0.0.1:PORT"
    assert server.count("example.test", "MX") == 0
    server.close()

Invariant: after close() returns, the thread has ended and the sockets are closed.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
from collections import Counter
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"
UDP_PAYLOAD_WITHOUT_EDNS = 512
TCP_IDLE_SECONDS = 5.0
MAX_CNAME_CHAIN = 8
_LENGTH = struct.Struct("!H")


class DnsServer:
    def __init__(self, origin: str = "test.", soa_ttl: int = 300, negative_ttl: int = 300) -> None:
        self.origin = dns.name.from_text(origin)
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._servfail: set[tuple[dns.name.Name, int | None]] = set()
        self._drop: set[tuple[dns.name.Name, int | None]] = set()
        self._counts: Counter[tuple[dns.name.Name, int]] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (name, type, "udp"|"tcp") of every query, in order
        self._soa: dns.rrset.RRset | None = None
        self.set_soa(soa_ttl, negative_ttl)
        self._udp, self._tcp = _bind_pair()
        self.port: int = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self.errors: list[BaseException] = []  # our own bugs while answering; close() raises the first
        self._thread = threading.Thread(target=self._serve, name=f"dns-server:{self.port}", daemon=True)
        self._thread.start()

    @property
    def nameserver(self) -> str:
        """For MxResolver / [dns] nameservers."""
        return f"{HOST}:{self.port}"

    # --- zone data (any thread, any time) --------------------------------------------

    def set(self, name: str, rdtype: str, *rdatas: str, ttl: int = 300) -> None:
        """Replace the `rdtype` records of `name` (none given: remove them)."""
        owner, kind = self._name(name), dns.rdatatype.from_text(rdtype)
        with self._lock:
            rrsets = self._records.setdefault(owner, {})
            if rdatas:
                rrsets[kind] = dns.rrset.from_text_list(owner, ttl, dns.rdataclass.IN, kind, list(rdatas),
                                                        origin=dns.name.root, relativize=False)
            else:
                rrsets.pop(kind, None)

    def add(self, name: str, rdtype: str, *rdatas: str, ttl: int = 300) -> None:
        """Add records to those `name` has of `rdtype` (the rrset takes `ttl`)."""
        owner, kind = self._name(name), dns.rdatatype.from_text(rdtype)
        with self._lock:
            old = self._records.get(owner, {}).get(kind)
            texts = [r.to_text() for r in old] if old is not None else []
        self.set(name, rdtype, *texts, *rdatas, ttl=ttl)

    def mx(self, name: str, *exchanges: tuple[int, str], ttl: int = 300) -> None:
        """MX records from (preference, host) pairs."""
        self.set(name, "MX", *(f"{pref} {host.rstrip('.')}." for pref, host in exchanges), ttl=ttl)

    def host(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """A and AAAA records of `name` from its addresses (either family, any order)."""
        self.set(name, "A", *[a for a in addresses if ":" not in a], ttl=ttl)
        self.set(name, "AAAA", *[a for a in addresses if ":" in a], ttl=ttl)
        with self._lock:
            self._records.setdefault(self._name(name), {})  # the name exists even without addresses

    def null_mx(self, name: str, ttl: int = 300) -> None:
        """RFC 7505: the domain accepts no mail."""
        self.set(name, "MX", "0 .", ttl=ttl)

    def exists(self, name: str) -> None:
        """The name exists with no records of its own: every type is NODATA."""
        with self._lock:
            self._records.setdefault(self._name(name), {})

    def nxdomain(self, name: str) -> None:
        """Remove the name and everything it answers: queries get NXDOMAIN."""
        owner = self._name(name)
        with self._lock:
            self._records.pop(owner, None)
            self._servfail = {s for s in self._servfail if s[0] != owner}
            self._drop = {s for s in self._drop if s[0] != owner}

    def servfail(self, name: str, rdtype: str | None = None) -> None:
        """Answer SERVFAIL for `name` (only for `rdtype` when given)."""
        with self._lock:
            self._servfail.add((self._name(name), _type_or_none(rdtype)))

    def drop(self, name: str, rdtype: str | None = None) -> None:
        """Never answer `name` (only for `rdtype` when given): the client times out."""
        with self._lock:
            self._drop.add((self._name(name), _type_or_none(rdtype)))

    def heal(self, name: str) -> None:
        """Undo servfail() and drop() for `name`."""
        owner = self._name(name)
        with self._lock:
            self._servfail = {s for s in self._servfail if s[0] != owner}
            self._drop = {s for s in self._drop if s[0] != owner}

    def set_soa(self, ttl: int | None, minimum: int = 300) -> None:
        """The SOA of negative answers: negative TTL = min(ttl, minimum). None: answer without one."""
        with self._lock:
            self._soa = None if ttl is None else dns.rrset.from_text(
                self.origin, ttl, "IN", "SOA", f"ns.{self.origin} hostmaster.{self.origin} 1 3600 600 86400 {minimum}")

    def count(self, name: str, rdtype: str) -> int:
        """Queries received for (name, type) since the start or the last reset_counts()."""
        with self._lock:
            return self._counts[(self._name(name), dns.rdatatype.from_text(rdtype))]

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.log.clear()

    def _name(self, name: str) -> dns.name.Name:
        owner = dns.name.from_text(name)
        if not owner.is_subdomain(self.origin):
            raise ValueError(f"{name} is outside the origin {self.origin} this server serves")
        return owner

    # --- answering (pure but for the counters) ---------------------------------------

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query in wire format; None: no answer (dropped or unparsable)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return self._wire(response, query, transport)
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self._counts[(qname, qtype)] += 1
            self.log.append((qname.to_text(), dns.rdatatype.to_text(qtype), transport))
            if {(qname, None), (qname, qtype)} & self._drop:
                return None
            if {(qname, None), (qname, qtype)} & self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif not qname.is_subdomain(self.origin) or question.rdclass != dns.rdataclass.IN:
                response.flags &= ~dns.flags.AA
                response.set_rcode(dns.rcode.REFUSED)
            else:
                self._fill(response, qname, qtype)
        return self._wire(response, query, transport)

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        name = qname
        for _ in range(MAX_CNAME_CHAIN):
            rrsets = self._records.get(name)
            if rrsets is not None and qtype in rrsets:
                response.answer.append(rrsets[qtype])
                return
            if rrsets is not None and dns.rdatatype.CNAME in rrsets and qtype != dns.rdatatype.CNAME:
                cname = rrsets[dns.rdatatype.CNAME]
                response.answer.append(cname)
                name = cname[0].target
                if not name.is_subdomain(self.origin):
                    return  # the resolver follows it elsewhere
                continue
            if rrsets is None and not any(n.is_subdomain(name) for n in self._records) and name != self.origin:
                response.set_rcode(dns.rcode.NXDOMAIN)
            if self._soa is not None:
                response.authority.append(self._soa)
            return

    def _wire(self, response: dns.message.Message, query: dns.message.Message, transport: str) -> bytes:
        if transport == "tcp":
            return response.to_wire(max_size=65535)  # 0 would mean the query's EDNS payload
        limit = max(query.payload, UDP_PAYLOAD_WITHOUT_EDNS) if query.edns >= 0 else UDP_PAYLOAD_WITHOUT_EDNS
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:  # the client retries over TCP
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    # --- the thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ, "udp")
            selector.register(self._tcp, selectors.EVENT_READ, "tcp")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                for key, _ in selector.select():
                    if key.data == "wake":
                        return
                    try:
                        if key.data == "udp":
                            self._on_udp()
                        else:
                            self._on_tcp_accept()
                    except Exception as exc:  # a bug here: keep serving, fail the test at close()
                        self.errors.append(exc)

    def _on_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self.answer(wire, "udp")
        if reply is not None:
            try:
                self._udp.sendto(reply, peer)
            except OSError:
                pass  # the client went away; nothing to tell it

    def _on_tcp_accept(self) -> None:
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._connections.add(conn)
        threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(TCP_IDLE_SECONDS)
        try:
            while (header := _recv_exactly(conn, _LENGTH.size)) is not None:
                wire = _recv_exactly(conn, _LENGTH.unpack(header)[0])
                if wire is None:
                    return
                reply = self.answer(wire, "tcp")
                if reply is not None:
                    conn.sendall(_LENGTH.pack(len(reply)) + reply)
        except OSError:
            return  # idle timeout, reset, or closed by close()
        except Exception as exc:  # a bug here: fail the test at close()
            self.errors.append(exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = list(self._connections)
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError("the DNS test server thread did not stop")
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            sock.close()
        if self.errors:
            raise RuntimeError(f"the DNS test server failed {len(self.errors)} time(s)") from self.errors[0]

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _type_or_none(rdtype: str | None) -> int | None:
    return None if rdtype is None else int(dns.rdatatype.from_text(rdtype))


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on one free loopback port."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((HOST, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((HOST, udp.getsockname()[1]))
        except OSError as exc:
            udp.close()
            tcp.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError("no free port for both UDP and TCP on 127.0.0.1")
