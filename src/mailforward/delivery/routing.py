"""Where to deliver mail for a destination domain: MX lookup and address resolution.

RFC 5321 §5.1, with Postfix's behaviour where the RFC leaves room:

* MX records are tried by preference; hosts of equal preference come in
  random order (RFC 5321 asks for that, to spread load).  An injected
  ``random.Random`` makes that order reproducible.
* No MX records (NOERROR, no data) means the "implicit MX": the domain's own
  addresses.  NXDOMAIN is a permanent failure, and so is a null MX (RFC 7505).
* SERVFAIL, timeouts and unreachable nameservers are temporary failures: the
  sender must retry, never bounce, during a DNS outage (Postfix's "Host not
  found, try again").
* An MX host that does not resolve is skipped.  Only when none resolves does
  routing fail, temporarily if any lookup failed temporarily (it might have
  been the one that works), permanently otherwise.
* Each host yields its IPv4 addresses first, then IPv6, so hosts on
  IPv4-only networks still reach the MX that was asked for first.  An address
  already reached through an earlier MX host is not listed again.

Errors carry the ``Reply`` to tell the sender, with Postfix's texts, so the
caller never has to interpret DNS outcomes itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import dns.name
import dns.rdata
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from ..addresses import normalize_domain
from ..dns import DnsTemporaryError, make_resolver, resolve
from ..errors import AddressError, MailforwardError
from ..hostport import DEFAULT_SMTP_PORT, ip_address_text, parse_relayhost
from ..reply import Reply

DEFAULT_PORT = DEFAULT_SMTP_PORT

_NOT_FOUND = "Host or domain name not found."


class RoutingError(MailforwardError):
    """No next hop could be found; ``reply`` is what to tell the sender."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class PermanentRoutingError(RoutingError):
    """DNS said definitively that there is nowhere to deliver: bounce (5xx)."""


class TemporaryRoutingError(RoutingError):
    """DNS could not answer (SERVFAIL, timeout, no nameserver): retry later (4xx)."""


@dataclass(frozen=True)
class NextHop:
    """One place to try: the MX ``host`` name (for logs, TLS names) and one ``address``."""

    host: str
    address: str
    port: int


class _Outcome(Enum):
    """A lookup's result; the values are Postfix's texts for the failures."""

    FOUND = "found"
    NXDOMAIN = "Host not found"
    NODATA = "Host found but no data record of requested type"
    TEMPORARY = "Host not found, try again"


@dataclass(frozen=True)
class _Lookup:
    name: str
    rdtype: str
    outcome: _Outcome
    records: tuple[dns.rdata.Rdata, ...] = ()

    @property
    def description(self) -> str:
        """Postfix's "Name service error" sentence, for reply texts."""
        return (f"Name service error for name={self.name} type={self.rdtype}: "
                f"{self.outcome.value}")


@dataclass(frozen=True)
class _HostAddresses:
    """A host's addresses, or why it has none (``failure`` is None when it has some)."""

    host: str
    addresses: tuple[str, ...]
    failure: _Lookup | None


def _literal_address(domain: str) -> str | None:
    """The address in an RFC 5321 address literal (``[1.2.3.4]``, ``[IPv6:...]``), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    address = ip_address_text(inner)
    if address is None:
        raise PermanentRoutingError(Reply(550, "5.1.3", f"<{domain}>: Bad address literal"))
    return address


def _is_null_mx(records: Sequence[MX]) -> bool:
    """RFC 7505: the domain's only exchange is ".", it accepts no mail.

    A "." mixed with real exchanges violates RFC 7505; those "." entries are
    simply skipped, as they lead nowhere.
    """
    return bool(records) and all(mx.exchange == dns.name.root for mx in records)


class MxRouter:
    """Finds next hops by DNS: MX for mail domains, plain addresses for ``[relayhost]``.

    Each lookup may take up to ``timeout`` seconds; MX hosts are resolved
    concurrently, so a domain costs at most about twice that.
    """

    def __init__(self, nameservers: Sequence[str] = (), port: int = DEFAULT_PORT,
                 timeout: float = 10.0, rng: random.Random | None = None) -> None:
        self.port = port
        self.timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._resolver = make_resolver(nameservers, timeout)

    async def next_hops(self, domain: str) -> list[NextHop]:
        """Where mail for ``domain`` goes, best first; raises a RoutingError when nowhere."""
        literal = _literal_address(domain)
        if literal is not None:
            return [NextHop(literal, literal, self.port)]
        try:
            name = normalize_domain(domain)
        except AddressError:
            raise PermanentRoutingError(
                Reply(550, "5.1.2", f"<{domain}>: Bad destination domain name")) from None
        return await self._mx_hops(name, self.port)

    async def relay_hops(self, relay: str) -> list[NextHop]:
        """Next hops for a Postfix-style ``relayhost``: ``[host]:port`` skips the MX lookup.

        Raises ConfigError when ``relay`` is not valid relayhost syntax.
        """
        host, port, bracketed = parse_relayhost(relay, self.port)
        if ip_address_text(host) is not None:
            return [NextHop(host, host, port)]
        if bracketed:
            return await self._host_hops([host], port, subject=host, status="5.1.2")
        return await self._mx_hops(host, port)

    async def _mx_hops(self, domain: str, port: int) -> list[NextHop]:
        mx = await self._query(domain, "MX")
        if mx.outcome is _Outcome.NXDOMAIN:
            raise PermanentRoutingError(
                Reply(550, "5.1.2", f"<{domain}>: {_NOT_FOUND} {mx.description}"))
        if mx.outcome is _Outcome.TEMPORARY:
            raise TemporaryRoutingError(
                Reply(451, "4.4.3", f"<{domain}>: {_NOT_FOUND} {mx.description}"))
        if mx.outcome is _Outcome.NODATA:
            return await self._host_hops([domain], port, subject=domain, status="5.1.2")
        records = [rd for rd in mx.records if isinstance(rd, MX)]
        if _is_null_mx(records):
            raise PermanentRoutingError(
                Reply(556, "5.1.10", f"<{domain}>: Domain does not accept mail (null MX)"))
        return await self._host_hops(self._exchanges(records), port, subject=domain,
                                     status="5.4.4")

    def _exchanges(self, records: Sequence[MX]) -> list[str]:
        """Exchange names by preference, ties shuffled, duplicates and "." dropped."""
        by_preference: dict[int, list[str]] = {}
        for mx in records:
            if mx.exchange != dns.name.root:
                host = mx.exchange.to_text(omit_final_dot=True).lower()
                by_preference.setdefault(mx.preference, []).append(host)
        ordered: list[str] = []
        for preference in sorted(by_preference):
            tied = by_preference[preference]
            self._rng.shuffle(tied)
            ordered.extend(host for host in tied if host not in ordered)
        return ordered

    async def _host_hops(self, hosts: Sequence[str], port: int, subject: str,
                         status: str) -> list[NextHop]:
        """Every address of ``hosts``, in order, each once; fails only when there are none.

        ``status`` is the enhanced code for the permanent failure: 5.1.2 when
        the destination itself has no address, 5.4.4 when its MX hosts have none.
        """
        resolved = await asyncio.gather(*(self._addresses(host) for host in hosts))
        hops: list[NextHop] = []
        seen: set[str] = set()
        for result in resolved:
            for address in result.addresses:
                if address not in seen:
                    seen.add(address)
                    hops.append(NextHop(result.host, address, port))
        if hops:
            return hops
        failures = [r.failure for r in resolved if r.failure is not None]
        temporary = [f for f in failures if f.outcome is _Outcome.TEMPORARY]
        if temporary:
            raise TemporaryRoutingError(
                Reply(451, "4.4.3", f"<{subject}>: {_NOT_FOUND} {temporary[0].description}"))
        detail = f" {failures[0].description}" if failures else ""
        raise PermanentRoutingError(Reply(550, status, f"<{subject}>: {_NOT_FOUND}{detail}"))

    async def _addresses(self, host: str) -> _HostAddresses:
        """A then AAAA addresses of ``host``; the most telling failure when it has none."""
        lookups = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"))
        addresses = tuple(rd.address for lookup in lookups for rd in lookup.records
                          if isinstance(rd, (A, AAAA)))
        if addresses:
            return _HostAddresses(host, addresses, None)
        temporary = [lookup for lookup in lookups if lookup.outcome is _Outcome.TEMPORARY]
        return _HostAddresses(host, (), temporary[0] if temporary else lookups[0])

    async def _query(self, name: str, rdtype: str) -> _Lookup:
        """One DNS lookup, as the three outcomes routing cares about (policy: ``mailforward.dns``)."""
        try:
            answer = await resolve(self._resolver, name, rdtype)
        except DnsTemporaryError:
            return _Lookup(name, rdtype, _Outcome.TEMPORARY)
        if answer.nxdomain:
            return _Lookup(name, rdtype, _Outcome.NXDOMAIN)
        if not answer.records:
            return _Lookup(name, rdtype, _Outcome.NODATA)
        return _Lookup(name, rdtype, _Outcome.FOUND, answer.records)


Route = list[NextHop] | Reply  # a domain's next hops, or why it has none


class Router:
    """Next hops for a domain: through ``relay_host`` when set, else by MX."""

    def __init__(self, resolver: MxRouter, relay_host: str = "") -> None:
        self.resolver = resolver
        self.relay_host = relay_host

    async def next_hops(self, domain: str) -> list[NextHop]:
        if self.relay_host:
            return await self.resolver.relay_hops(self.relay_host)
        return await self.resolver.next_hops(domain)

    async def routes(self, domains: Sequence[str]) -> dict[str, Route]:
        """Next hops for every domain at once; a RoutingError becomes that domain's reply.

        With ``relay_host`` every domain goes the same way: one lookup, and
        the same list for all of them (so they share transactions).  Any
        other exception propagates: it is a bug or a configuration error,
        not an answer about a domain.
        """
        if self.relay_host and domains:
            try:
                hops: Route = await self.next_hops(domains[0])
            except RoutingError as e:
                hops = e.reply
            return {domain: hops for domain in domains}
        found = await asyncio.gather(*(self._route(domain) for domain in domains))
        return dict(zip(domains, found, strict=True))

    async def _route(self, domain: str) -> Route:
        try:
            return await self.next_hops(domain)
        except RoutingError as e:
            return e.reply
