"""The in-process store: exact for one process, nothing to run.

Every operation is synchronous and finishes before the event loop runs
anything else, so in one process nothing can interleave with it: that is
the atomicity.  The ``*_at`` methods take the time explicitly and do no
I/O, so one instance can also be kept by a process without an event loop
(a supervisor answering its workers, as it answers for the connection
limits in ``smtpd/anvil.py``).

A node's worker processes share the one instance their supervisor keeps
for their rates (``state/shared.py``; their duplicate cache is a table in
shared memory, ``state/duplicates.py``); for limits that hold across nodes
use the Redis store (``docs/scale-out.md``).

Memory stays bounded: windows and keys whose time is over are dropped at
most once per :data:`PRUNE_INTERVAL`, and the TTL set keeps at most
``max_keys`` keys (the oldest go first).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence

from . import Store, Window

PRUNE_INTERVAL = 60.0  # seconds between sweeps for expired windows and keys
MAX_KEYS = 1_000_000  # TTL-set entries kept at most (about 150 bytes each)


class MemoryStore(Store):
    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 max_keys: int = MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._events: dict[str, tuple[float, deque[float]]] = {}  # key -> (seconds, times)
        self._expiry: dict[str, float] = {}  # TTL set: key -> when it expires
        self._last_prune = clock()

    # ------------------------------------------------------------ the Store interface

    async def admit(self, windows: Sequence[Window]) -> int | None:
        return self.admit_at(windows, self._clock())

    async def seen(self, keys: Sequence[str]) -> set[str]:
        return self.seen_at(keys, self._clock())

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        """Answered at once: there is no round trip to overlap, so no task either."""
        answer: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        answer.set_result(self.seen_at(keys, self._clock()))
        return answer

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        self.remember_at(keys, ttl, self._clock())

    async def close(self) -> None:
        self._events.clear()
        self._expiry.clear()

    # ------------------------------------------------------------ synchronous core

    def admit_at(self, windows: Sequence[Window], now: float) -> int | None:
        self._prune(now)
        for index, window in enumerate(windows):
            if len(self._recent(window, now)) >= window.limit:
                return index
        for window in windows:
            self._recent(window, now).append(now)
        return None

    def count_at(self, window: Window, now: float) -> int:
        """Events in ``window`` now (for inspection and tests)."""
        return len(self._recent(window, now))

    def seen_at(self, keys: Sequence[str], now: float) -> set[str]:
        self._prune(now)
        return {key for key in keys if self._expiry.get(key, now) > now}

    def remember_at(self, keys: Sequence[str], ttl: float, now: float) -> None:
        self._prune(now)
        for key in keys:
            self._expiry.pop(key, None)  # re-inserted last: the dict stays in age order
            self._expiry[key] = now + ttl
        while len(self._expiry) > self._max_keys:
            del self._expiry[next(iter(self._expiry))]

    def _recent(self, window: Window, now: float) -> deque[float]:
        """The window's event times, those older than ``seconds`` dropped."""
        entry = self._events.get(window.key)
        if entry is None or entry[0] != window.seconds:
            times = entry[1] if entry is not None else deque()
            entry = self._events[window.key] = (window.seconds, times)
        times = entry[1]
        horizon = now - window.seconds
        while times and times[0] <= horizon:
            times.popleft()
        return times

    def _prune(self, now: float) -> None:
        if now - self._last_prune < PRUNE_INTERVAL:
            return
        self._last_prune = now
        for key in [key for key, (seconds, times) in self._events.items()
                    if not times or times[-1] <= now - seconds]:
            del self._events[key]
        for key in [key for key, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[key]
