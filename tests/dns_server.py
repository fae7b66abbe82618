"""A real DNS server on loopback, serving an in-memory zone, for tests that resolve.

Tests must never resolve through the machine's own resolver: answers there
depend on the network.  ``LoopbackDNSServer`` answers over UDP and TCP on
127.0.0.1 (same port, as resolvers expect for the TCP retry after a
truncated UDP reply) from zone-file text; ``SilentNameserver`` reads queries
and never answers, for timeouts.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from types import TracebackType

from dnslib import QTYPE, RCODE, RR, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from zone-file records; names in ``servfail`` get SERVFAIL, names in
    ``refused`` REFUSED (a server not serving them).

    A name with no record at all is NXDOMAIN; a name with records of other
    types only is NODATA (NOERROR, empty answer).  No CNAME chasing, no
    wildcards: tests spell out what they need.
    """

    def __init__(self, zone: str, servfail: Iterable[str] = (), refused: Iterable[str] = ()) -> None:
        self.records: list[RR] = RR.fromZone(zone)
        self.servfail = {DNSLabel(name) for name in servfail}
        self.refused = {DNSLabel(name) for name in refused}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()  # qr, aa, ra set; same id and question
        qname, qtype = request.q.qname, request.q.qtype
        with self._lock:
            self.queries.append((str(qname).rstrip(".").lower(), QTYPE[qtype]))
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if qname in self.refused:
            reply.header.rcode = RCODE.REFUSED
            return reply
        owned = [rr for rr in self.records if rr.rname == qname]  # DNSLabel: case-insensitive
        if not owned:
            reply.header.rcode = RCODE.NXDOMAIN
        for rr in owned:
            if rr.rtype == qtype:
                reply.add_answer(rr)
        return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    """dnslib's default logger prints every packet to stdout."""

    def __init__(self) -> None:
        super().__init__(log="-recv,-send,-request,-reply,-truncated,-error,-data",
                         prefix=False, logf=lambda _: None)


class LoopbackDNSServer:
    """``ZoneResolver`` served on 127.0.0.1 over UDP and TCP; ``nameserver`` is "ip:port"."""

    def __init__(self, resolver: BaseResolver) -> None:
        self.resolver = resolver
        self._servers: list[DNSServer] = []
        self.port = 0

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LoopbackDNSServer:
        for _ in range(20):  # the UDP port picked by the OS may be taken for TCP: retry
            udp = DNSServer(self.resolver, address="127.0.0.1", port=0, logger=_QuietLogger())
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(self.resolver, address="127.0.0.1", port=port, tcp=True,
                                logger=_QuietLogger())
            except OSError:
                udp.server.server_close()
                continue
            self.port, self._servers = port, [udp, tcp]
            for server in self._servers:
                server.start_thread()
            return self
        raise RuntimeError("no loopback port free for both UDP and TCP")

    def stop(self) -> None:
        # shutdown() waits out serve_forever's 0.5 s poll: stop both servers at once.
        stoppers = [threading.Thread(target=server.stop) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper, server in zip(stoppers, self._servers, strict=True):
            stopper.join(timeout=5)
            server.server.server_close()
            server.thread.join(timeout=5)
        self._servers = []

    def __enter__(self) -> LoopbackDNSServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class SilentNameserver:
    """A bound UDP socket on loopback that receives queries and never replies."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SilentNameserver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
