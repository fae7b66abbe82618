"""Per-client connection limits, like Postfix's anvil(8).

Two numbers per client IP: connections open now, and connections opened in
the last ``time_unit`` seconds.  Clients in mynetworks are exempt
(``smtpd_client_event_limit_exceptions = $mynetworks``).

With one process the handler counts here directly.  With several workers
the counting must see every worker's connections, so one ``ClientLimits``
lives in the supervisor and the workers ask it (``anvil.py``), as Postfix's
smtpd processes ask its single anvil(8) daemon.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class ClientLimits:
    def __init__(self, max_concurrent: int, max_rate: int, time_unit: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_concurrent = max_concurrent
        self._max_rate = max_rate
        self._time_unit = time_unit
        self._clock = clock
        self._open: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self._last_prune = clock()

    def reconfigure(self, max_concurrent: int, max_rate: int, time_unit: float) -> None:
        """New limits (SIGHUP); the connections counted so far stay counted."""
        self._max_concurrent = max_concurrent
        self._max_rate = max_rate
        self._time_unit = time_unit

    def connect(self, ip: str) -> bool:
        """Count a new connection; False when it is over a limit (and then it is not counted)."""
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
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]

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
