"""The duplicate cache of a node's worker processes: a table in memory they all map.

With ``[server] workers`` above 1 and no Redis, the duplicate question
(``smtpd/abuse.py``) is asked for every message with a Message-ID.  Asked
of the supervisor's store over a socket it costs a round trip to another
process per message even when nothing waits on it; asked of this table it
costs a hash and a read of memory.  So the supervisor maps one
:class:`SharedDuplicateTable` (anonymous, ``MAP_SHARED``) before it forks
its first worker, every worker inherits the mapping, and each reads and
writes it directly: the supervisor takes no part after that.  A worker
that dies and is replaced maps the same table, so what it remembered is
still there; a restart of the service starts empty, as before.

Rate limits stay with the supervisor's store (``state/shared.py``): a
sliding window must be exact, which a lock-free table cannot promise.
:class:`TableBackedStore` is the worker's store: duplicates here, ``admit``
there.

**The table.**  A fixed number of slots (a power of two), each the first
16 bytes of SHA-256 of a key and the key's expiry (``time.monotonic()``,
``CLOCK_MONOTONIC``: one clock for every process on the machine).  A key
lives in the first :data:`PROBE` slots from the one its digest names (the
array has ``PROBE - 1`` slots more at its end, so that window never wraps).
Remembering a key reuses its slot, else takes an empty or expired one, else
evicts the one that expires first: when the table is full, the oldest
entries go, like Postfix's bounded caches.  Memory is fixed:
``SLOT.size`` (24) bytes a slot, touched pages only.

**No lock.**  A lock held by a worker killed with ``kill -9`` would stop
every other worker at its next message; this table has none, and every
race between workers only loses memory, never invents it:

* Two workers filling the same free slot at once: one key is kept, the
  other lost.  A retry of the lost one is forwarded again -- what happens
  today when a retry reaches another worker before the first one's
  ``remember`` (Redis and the supervisor's store have that race too).
* A read during a write (a "torn" slot: part old, part new): the digest is
  then that of a remembered key, or a mix of two that matches no key short
  of a 128-bit collision; the expiry is one that was written (or, torn
  itself, any number: NaN or past means "absent").  So the worst a torn
  slot does is keep a *delivered* message's key a while longer, or lose it.
  Nothing here can say "seen" for a message that was not delivered.

Digest and expiry are written together, in one slice assignment (one
``memcpy``), which keeps such windows as short as they can be.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import struct
import time
from collections.abc import Callable, Sequence

from . import Store, Window

SLOT = struct.Struct("=16sd")  # digest of the key, its expiry (time.monotonic())
PROBE = 8  # slots a key may be in, from the one its digest names
DEFAULT_SLOTS = 1 << 20  # ~1 M keys, the in-process store's bound (MAX_KEYS); 24 MiB

__all__ = ["DEFAULT_SLOTS", "PROBE", "SharedDuplicateTable", "TableBackedStore"]


class SharedDuplicateTable:
    """A bounded TTL set of keys in anonymous shared memory, mapped before a fork so that
    the parent and every child read and write the same table (no lock: see the module)."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"duplicate table: {slots} slots is not a power of two")
        self.slots = slots
        self._mask = slots - 1
        self._map = mmap.mmap(-1, (slots + PROBE - 1) * SLOT.size)  # MAP_SHARED, zeroed

    def seen_at(self, keys: Sequence[str], now: float) -> set[str]:
        """Which of ``keys`` are remembered and not expired at ``now``."""
        return {key for key in keys if self._find(_digest(key), now)}

    def remember_at(self, keys: Sequence[str], ttl: float, now: float) -> None:
        """Remember ``keys`` until ``now + ttl`` (a remembered key's time is renewed)."""
        for key in keys:
            self._put(_digest(key), now + ttl, now)

    def close(self) -> None:
        """Unmap this process's view (the others keep theirs)."""
        self._map.close()

    def home(self, key: str) -> int:
        """The first slot ``key`` may be in (for tests: keys with the same home compete)."""
        return self._home(_digest(key))

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") & self._mask

    def _window(self, digest: bytes) -> tuple[int, list[tuple[bytes, float]]]:
        """The offset of the key's probe window and its slots, read in one copy."""
        start = self._home(digest) * SLOT.size
        return start, list(SLOT.iter_unpack(self._map[start:start + PROBE * SLOT.size]))

    def _find(self, digest: bytes, now: float) -> bool:
        _, entries = self._window(digest)
        return any(stored == digest and expiry > now for stored, expiry in entries)

    def _put(self, digest: bytes, expiry: float, now: float) -> None:
        start, entries = self._window(digest)
        offset = start + _choose(entries, digest, now) * SLOT.size
        self._map[offset:offset + SLOT.size] = SLOT.pack(digest, expiry)  # one write, both


def _choose(entries: list[tuple[bytes, float]], digest: bytes, now: float) -> int:
    """The slot for ``digest`` in its window: its own, else the first free (empty, expired
    or unreadable), else the one that expires first (the oldest, all having one ttl)."""
    free = None
    for index, (stored, expiry) in enumerate(entries):
        if stored == digest:
            return index
        if free is None and not expiry > now:  # "not >": NaN (a torn write) counts as free
            free = index
    if free is not None:
        return free
    return min(range(len(entries)), key=lambda index: entries[index][1])


def _digest(key: str) -> bytes:
    """16 bytes of SHA-256: two different keys share them with odds of 2**-128."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:16]


class TableBackedStore(Store):
    """A worker's store: duplicates in the shared table (answered at once, no round trip),
    rate limits and closing delegated to ``counters`` (the supervisor's store)."""

    def __init__(self, table: SharedDuplicateTable, counters: Store,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.counters = counters
        self._clock = clock  # must be CLOCK_MONOTONIC (the table's expiries) but in tests
        self.description = getattr(counters, "description", "this process")
        self.duplicates_description = (f"memory shared by this node's workers "
                                       f"({table.slots} entries)")

    async def admit(self, windows: Sequence[Window]) -> int | None:
        return await self.counters.admit(windows)

    async def seen(self, keys: Sequence[str]) -> set[str]:
        return self.table.seen_at(keys, self._clock())

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        """Answered at once: nothing to overlap, so no task either."""
        answer: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        answer.set_result(self.table.seen_at(keys, self._clock()))
        return answer

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        self.table.remember_at(keys, ttl, self._clock())

    async def close(self) -> None:
        """Closes the counters' store; the table is the supervisor's and stays mapped."""
        await self.counters.close()
