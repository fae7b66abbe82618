"""Host and port syntax, in one place: listen addresses, nameservers, relay hosts, database hosts.

Postfix's forms: ``host``, ``host:port``, ``[host]:port`` (brackets: no MX
lookup, and the way to give an IPv6 address a port), and a bare IPv6
address (more than one colon: it cannot carry a port).  Errors are
``ConfigError`` naming what was given.
"""

from __future__ import annotations

import ipaddress

from .addresses import normalize_domain
from .errors import AddressError, ConfigError

DEFAULT_SMTP_PORT = 25


def split_host_port(text: str) -> tuple[str, str | None, bool]:
    """``[host]:port``, ``[host]``, ``host:port``, ``host`` or a bare IPv6 address.

    Returns (host, port text or None, bracketed).  A bare IPv6 address has
    more than one colon, so it cannot carry a port: brackets are needed then.
    """
    entry = text.strip()
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid host {text!r}")
        return host, (rest[1:] if rest else None), True
    if entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        return host, port_text, False
    return entry, None, False


def parse_port(port_text: str, whole: str) -> int:
    """A TCP/UDP port 1-65535; ConfigError naming ``whole`` otherwise."""
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"invalid port in {whole!r}")
    return int(port_text)


def ip_address_text(text: str) -> str | None:
    """The canonical form of an IP address, or None when ``text`` is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_host_port(text: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port 0: any free port); the port is required unless a
    default is given.  Errors name ``key``."""
    try:
        host, port_text, _ = split_host_port(text)
    except ConfigError:
        raise ConfigError(f"{key}: {text!r} is not host:port") from None
    if port_text is None and default_port is not None:
        return host, default_port
    if not host or port_text is None or not (port_text.isascii() and port_text.isdigit()) \
            or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    return host, int(port_text)


def parse_relayhost(text: str, default_port: int = DEFAULT_SMTP_PORT) -> tuple[str, int, bool]:
    """Postfix ``relayhost`` syntax as (host, port, bracketed).

    ``[host]:port`` (bracketed: no MX lookup), ``host:port``, ``host``;
    ``[IPv6:addr]`` and ``[addr]`` for IPv6.  IP addresses come back
    canonical, names normalised like every other domain.
    """
    host, port_text, bracketed = split_host_port(text)
    if bracketed and host[:5].lower() == "ipv6:":
        host = host[5:]
    port = default_port if port_text is None else parse_port(port_text, text)
    address = ip_address_text(host)
    if address is not None:
        return address, port, bracketed
    try:
        return normalize_domain(host), port, bracketed
    except AddressError as e:
        raise ConfigError(f"invalid relay host {text!r}: {e}") from None
