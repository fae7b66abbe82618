"""A small in-process TTL cache in front of any lookup table.

A busy server should not ask the database on every RCPT.  Positive and
negative answers have their own TTLs; a temporary failure is never cached,
so the first lookup after an outage goes to the database again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from .base import LookupTable

MAX_ENTRIES = 50_000


class CachedTable:
    def __init__(self, table: LookupTable, ttl: float, negative_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._table = table
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, Any]] = {}

    async def _cached(self, kind: str, key: str, lookup: Callable[[str], Awaitable[Any]]) -> Any:
        now = self._clock()
        hit = self._entries.get((kind, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await lookup(key)  # TemporaryLookupError propagates, uncached
        ttl = self._ttl if value else self._negative_ttl
        if ttl > 0:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))
            self._entries[(kind, key)] = (now + ttl, value)
        return value

    async def domain_is_hosted(self, domain: str) -> bool:
        result: bool = await self._cached("domain", domain, self._table.domain_is_hosted)
        return result

    async def alias_destinations(self, address: str) -> tuple[str, ...] | None:
        result: tuple[str, ...] | None = await self._cached(
            "alias", address, self._table.alias_destinations)
        return result

    async def sender_domain_is_hosted(self, domain: str) -> bool:
        result: bool = await self._cached("sender", domain, self._table.sender_domain_is_hosted)
        return result

    async def close(self) -> None:
        await self._table.close()
