"""The one way this package asks DNS anything: resolvers, lookups, one error policy.

Delivery (MX routing), inbound verification (pyspf, dkimpy, DMARC) and the
operator's ``check`` used to each wrap dnspython with their own idea of what
an exception means, so the same SERVFAIL was "no record" in one place and
"try again" in another.  Every lookup now goes through :func:`resolve` (or
:func:`resolve_sync` for the libraries that block), with one policy:

* NXDOMAIN and NODATA mean "not there": an :class:`Answer` without records
  (``nxdomain`` tells the two apart for the callers whose verdict differs,
  such as routing's implicit MX).  A name that cannot exist in DNS (an empty
  or over-long label, bad IDNA) is NXDOMAIN too: nobody could publish it.
* Everything else -- timeout, SERVFAIL, REFUSED, an unreachable nameserver,
  a malformed reply -- raises :class:`DnsTemporaryError`.  "Could not ask"
  must never be mistaken for "not there": the first is retried (4xx,
  ``temperror``), the second is a verdict.

Resolvers use ``[delivery] nameservers`` when set, so a split-horizon or test
resolver sees what the server sees, and the system's otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.resolver
from dns.rdtypes.ANY.TXT import TXT

from .errors import ConfigError, MailforwardError
from .hostport import ip_address_text, parse_port, split_host_port
from .ops.metrics import dns_timer

__all__ = [
    "MAX_ATTEMPT_TIMEOUT",
    "Answer",
    "CacheOnlyResolver",
    "DnsTemporaryError",
    "make_resolver",
    "make_sync_resolver",
    "parse_nameserver",
    "resolve",
    "resolve_sync",
    "txt_records",
    "txt_records_sync",
]

MAX_ATTEMPT_TIMEOUT = 2.0
"""Seconds for one try at one nameserver (dnspython's own default)."""

DNS_PORT = 53
CACHE_SIZE = 10_000  # answers kept per resolver (dnspython's LRU cache honours each TTL)


class DnsTemporaryError(MailforwardError):
    """DNS could not answer (timeout, SERVFAIL, REFUSED, network trouble): ask again later.

    ``reason`` is a short plain-words cause for operators; the message is
    ``"NAME TYPE: reason"``.
    """

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{name} {rdtype}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """What DNS said about ``name``/``rdtype``: its records, or none.

    No records with ``nxdomain`` set: the name does not exist; without it:
    the name exists but has no record of this type (NODATA).
    """

    name: str
    rdtype: str
    records: tuple[dns.rdata.Rdata, ...] = ()
    nxdomain: bool = False


# ---------------------------------------------------------------- configuration


def parse_nameserver(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address, as (address, port).

    Only IP literals: a nameserver named by hostname would need a resolver to
    find the resolver.
    """
    host, port_text, _ = split_host_port(text)
    address = ip_address_text(host)
    if address is None:
        raise ConfigError(f"invalid nameserver {text!r}: not an IP address")
    return address, DNS_PORT if port_text is None else parse_port(port_text, text)


def make_resolver(nameservers: Sequence[str], timeout: float) -> dns.asyncresolver.Resolver:
    """An asyncio resolver for the given nameservers, or the system's when there are none."""
    return _configure(dns.asyncresolver.Resolver, nameservers, timeout)


def make_sync_resolver(nameservers: Sequence[str], timeout: float) -> dns.resolver.Resolver:
    """The same, blocking: for libraries that resolve synchronously (pyspf, dkimpy)."""
    return _configure(dns.resolver.Resolver, nameservers, timeout)


class CacheOnlyResolver(dns.resolver.Resolver):
    """Answers from another resolver's cache alone, and counts what it could not answer.

    Verification's libraries block, so their lookups run in a thread pool --
    and then their pure-Python work runs there too, holding the GIL the event
    loop needs (every socket write of the loop then waits for it).  Most
    lookups are answered from the cache (one sender domain's SPF and DMARC
    records, again and again), so a check is first tried on the loop with
    this resolver: a name not cached fails at once, as a temporary error,
    without a packet sent; ``misses`` says so, and the caller runs the check
    again, in the pool, with the real resolver.
    """

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        super().__init__(configure=False)
        self.nameservers = []  # nobody to ask: a miss is NoNameservers, at once
        self.cache = resolver.cache
        self.lifetime = resolver.lifetime
        self.timeout = resolver.timeout
        self.misses = 0

    def resolve(self, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        try:
            return super().resolve(*args, **kwargs)
        except dns.resolver.NoNameservers:
            self.misses += 1
            raise


R = TypeVar("R", dns.asyncresolver.Resolver, dns.resolver.Resolver)


def _configure(kind: type[R], nameservers: Sequence[str], timeout: float) -> R:
    """``timeout`` bounds each lookup as a whole; a single nameserver try gets
    at most half of it, so a silent first nameserver leaves time for the next.
    """
    if nameservers:
        resolver = kind(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)
                                for address, port in map(parse_nameserver, nameservers)]
    else:
        try:
            resolver = kind()
        except dns.resolver.NoResolverConfiguration as e:
            raise ConfigError(f"no nameservers configured and no system resolver: {e}") from None
    resolver.lifetime = timeout
    resolver.timeout = min(MAX_ATTEMPT_TIMEOUT, timeout / 2)
    # Answers are kept for their TTL, as a local caching resolver would keep them:
    # mail from one sender domain asks the same SPF/DMARC/key names again and again.
    resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
    return resolver


# ---------------------------------------------------------------- lookups


async def resolve(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> Answer:
    """Look ``name``/``rdtype`` up; raises DnsTemporaryError when DNS cannot say."""
    qname = _query_name(name)
    if qname is None:
        return Answer(name, rdtype, nxdomain=True)
    with dns_timer(rdtype):
        try:
            answer = await resolver.resolve(qname, rdtype, search=False)
        except (dns.exception.DNSException, OSError) as e:
            return _without_records(name, rdtype, e)
    return Answer(name, rdtype, tuple(answer))


def resolve_sync(resolver: dns.resolver.Resolver, name: str, rdtype: str,
                 lifetime: float | None = None) -> Answer:
    """:func:`resolve` for blocking callers; ``lifetime`` may shorten the resolver's."""
    qname = _query_name(name)
    if qname is None:
        return Answer(name, rdtype, nxdomain=True)
    with dns_timer(rdtype):
        try:
            answer = resolver.resolve(qname, rdtype, search=False, lifetime=lifetime)
        except (dns.exception.DNSException, OSError) as e:
            return _without_records(name, rdtype, e)
    return Answer(name, rdtype, tuple(answer))


async def txt_records(resolver: dns.asyncresolver.Resolver, name: str) -> list[bytes]:
    """Each TXT record at ``name``, its strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    return _joined_txt(await resolve(resolver, name, "TXT"))


def txt_records_sync(resolver: dns.resolver.Resolver, name: str,
                     lifetime: float | None = None) -> list[bytes]:
    """:func:`txt_records` for blocking callers."""
    return _joined_txt(resolve_sync(resolver, name, "TXT", lifetime))


def _joined_txt(answer: Answer) -> list[bytes]:
    return [b"".join(rdata.strings) for rdata in answer.records if isinstance(rdata, TXT)]


@functools.lru_cache(maxsize=4096)
def _query_name(name: str) -> dns.name.Name | None:
    """``name`` as an absolute DNS name, or None when no such name can exist."""
    try:
        return dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


def _without_records(name: str, rdtype: str, error: Exception) -> Answer:
    """The policy: NXDOMAIN/NODATA are answers; every other failure is temporary."""
    if isinstance(error, (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN)):
        return Answer(name, rdtype, nxdomain=True)
    if isinstance(error, dns.resolver.NoAnswer):
        return Answer(name, rdtype)
    raise DnsTemporaryError(name, rdtype, _reason(error)) from None


def _reason(error: Exception) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "no answer within the timeout"
    if isinstance(error, dns.resolver.NoNameservers):
        return "the nameservers failed (SERVFAIL or REFUSED)"
    if isinstance(error, OSError):
        return f"network error ({error.strerror or type(error).__name__})"
    return f"DNS error ({type(error).__name__})"
