"""Per-client connection limits, like Postfix's anvil(8).

Two numbers per client IP: connections open now, and connections opened in
the last ``time_unit`` seconds.  Clients in mynetworks are exempt
(``smtpd_client_event_limit_exceptions = $mynetworks``).
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
        self._open: dict[str, int] = defaultdict(int)
        self._recent: dict[str, deque[float]] = defaultdict(deque)

    def connect(self, ip: str) -> bool:
        """Count a new connection; False when it is over a limit (and then it is not counted)."""
        now = self._clock()
        recent = self._recent[ip]
        while recent and recent[0] <= now - self._time_unit:
            recent.popleft()
        if self._open[ip] >= self._max_concurrent or len(recent) >= self._max_rate:
            return False
        recent.append(now)
        self._open[ip] += 1
        return True

    def disconnect(self, ip: str) -> None:
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]
            if not self._recent.get(ip):
                self._recent.pop(ip, None)

    def open_connections(self, ip: str) -> int:
        return self._open.get(ip, 0)
