"""Per-client connection limits, like Postfix's anvil(8).

Two numbers per client IP: connections open now, and connections opened in
the last ``time_unit`` seconds.  Clients in ``[server] client_limit_exceptions``
(by default ``mynetworks``) are exempt: never counted, never refused, as
Postfix's ``smtpd_client_event_limit_exceptions = $mynetworks`` keeps smtpd
from asking anvil about them at all.

With one process the handler counts here directly.  With several workers
the counting must see every worker's connections, so one ``ClientLimits``
lives in the supervisor and the workers ask it (``anvil.py``), as Postfix's
smtpd processes ask its single anvil(8) daemon.  Who is exempt is decided
where the connection arrives, before any question is asked: the
supervisor's instance has no exceptions and counts whatever it is asked about.
"""

from __future__ import annotations

import ipaddress
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

from ..config import IpNetwork, ServerSettings, parse_networks

EXCEPTIONS_KEY = "[server] client_limit_exceptions"


class ClientLimits:
    """Anvil's connection counters for the clients of one process (or, in the supervisor,
    of all its workers), with the exempt clients left out before anything is counted."""

    def __init__(self, max_concurrent: int, max_rate: int, time_unit: float,
                 clock: Callable[[], float] = time.monotonic, *,
                 exceptions: Iterable[str] = ()) -> None:
        self._max_concurrent = max_concurrent
        self._max_rate = max_rate
        self._time_unit = time_unit
        self._clock = clock
        self._exceptions: tuple[IpNetwork, ...] = parse_networks(exceptions, EXCEPTIONS_KEY)
        self._open: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self._last_prune = clock()

    @classmethod
    def for_server(cls, server: ServerSettings) -> ClientLimits:
        """The limits ``[server]`` asks for, for a process that counts its own clients."""
        return cls(server.client_connection_count_limit, server.client_connection_rate_limit,
                   server.client_connection_rate_time_unit, exceptions=server.limit_exceptions)

    def reconfigure(self, max_concurrent: int, max_rate: int, time_unit: float, *,
                    exceptions: Iterable[str]) -> None:
        """New limits and exceptions (SIGHUP); the connections counted so far stay counted
        and are released when they close, even when their client is exempt now."""
        self._max_concurrent = max_concurrent
        self._max_rate = max_rate
        self._time_unit = time_unit
        self._exceptions = parse_networks(exceptions, EXCEPTIONS_KEY)

    def exempt(self, ip: str) -> bool:
        """The client is in the exceptions: the limits neither count nor refuse it."""
        if not self._exceptions:
            return False  # the common case costs no address parsing
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 client on a dual-stack [::] listener
        return any(address in network for network in self._exceptions)

    def connect(self, ip: str) -> bool:
        """Count a new connection; False when it is over a limit (and then it is not counted).
        An exempt client is admitted without being counted."""
        if self.exempt(ip):
            return True
        now = self._clock()
        self._prune(now)
        recent = self._recent[ip]
        while recent and recent[0] <= now - self._time_unit:
            recent.popleft()
        if self._open.get(ip, 0) >= self._max_concurrent or len(recent) >= self._max_rate:
            return False
        recent.append(now)
        self._open[ip] = self._open.get(ip, 0) + 1
        return True

    def disconnect(self, ip: str) -> None:
        """One of ``ip``'s connections closed.  Nothing to release when none is counted (the
        client was exempt when it connected): whether it is exempt now does not matter."""
        count = self._open.get(ip, 0) - 1
        if count > 0:
            self._open[ip] = count
        else:
            self._open.pop(ip, None)

    def _prune(self, now: float) -> None:
        """Once per time unit, forget clients with nothing open and nothing in their window,
        so memory does not grow with every address that ever connected."""
        if now - self._last_prune < self._time_unit:
            return
        self._last_prune = now
        horizon = now - self._time_unit
        for ip in [ip for ip, times in self._recent.items()
                   if ip not in self._open and (not times or times[-1] <= horizon)]:
            del self._recent[ip]

    def open_connections(self, ip: str) -> int:
        return self._open.get(ip, 0)
