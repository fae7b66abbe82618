"""Shared state for abuse control: sliding-window counters and a TTL set.

What several SMTP sessions, worker processes or nodes must agree on lives
behind one small interface, :class:`Store`, with two implementations:

* :class:`~.memory.MemoryStore` (the default): in this process, exact for
  one process; nothing to run.
* :class:`~.redis.RedisStore`: Redis, shared by every process and node
  that names the same server (``[limits] redis_url``); each operation is
  one atomic Lua script or one pipeline, and has a timeout.

A node's worker processes without Redis use the supervisor's ``MemoryStore``
for rates (``shared.py``) and a table in shared memory for duplicates
(``duplicates.py``).

Two operations cover everything the checks need:

* :meth:`Store.admit` -- rate limits.  A sliding window counts the events
  of the last ``seconds`` seconds exactly (a log of their times, not fixed
  buckets).  ``admit`` takes several windows at once (a client's and a
  sender's, say) and records one event in every one of them only when
  every one has room; otherwise it records nothing and says which window
  was full.  Refused attempts are not counted: at most ``limit`` events
  are admitted in any ``seconds``-long interval, and a client that keeps
  trying gets in again as soon as its oldest admitted event leaves the
  window.
* :meth:`Store.seen` / :meth:`Store.remember` -- a set of keys that expire
  after a time to live: the duplicate-suppression cache.  :meth:`Store.ask_seen`
  is ``seen`` put early and answered later, so that the question's round trip
  overlaps the caller's other work.

A store that cannot answer raises :class:`StoreUnavailable`, never a wrong
answer; what to do then is the caller's policy (``[limits] redis_failure``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import MailforwardError

if TYPE_CHECKING:
    from ..config import LimitsSettings

__all__ = ["Store", "StoreUnavailable", "Window", "open_store"]


class StoreUnavailable(MailforwardError):
    """The store did not answer (unreachable, timed out, failed): nothing was decided."""


@dataclass(frozen=True)
class Window:
    """A sliding window: at most ``limit`` events per ``seconds`` under ``key``."""

    key: str
    limit: int
    seconds: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.seconds <= 0:
            raise ValueError(f"window {self.key!r}: limit and seconds must be positive")


class Store(Protocol):
    """What abuse control asks of shared state.  The stores subclass it explicitly, which
    gives them the default :meth:`ask_seen` (and mypy checks them against it)."""

    async def admit(self, windows: Sequence[Window]) -> int | None:
        """Atomically: when every window has room, record one event in each and return
        None; otherwise record nothing and return the index of the first full window."""
        ...

    async def seen(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are in the TTL set (remembered and not yet expired)."""
        ...

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        """:meth:`seen`, asked now and answered by the future.

        A caller with other work to do before it needs the answer (signing a
        message, say) asks first and awaits the future after that work: the
        store's round trip overlaps the work instead of following it.  The
        future raises what ``seen`` would.  A caller that no longer wants the
        answer cancels the future, or retrieves its exception when it is done
        (else asyncio logs "exception was never retrieved").

        This default runs ``seen`` in a task; a store that can send the question
        at once hands out the future of its answer instead.
        """
        return asyncio.get_running_loop().create_task(self.seen(keys))

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        """Put ``keys`` in the TTL set for ``ttl`` seconds (an existing key's time is renewed)."""
        ...

    async def close(self) -> None: ...


def open_store(settings: LimitsSettings) -> Store:
    """The store ``[limits]`` names: Redis (direct or through Sentinel), else this process.

    Nothing is connected yet: a Redis that is down at start is one that is
    down later, handled by ``[limits] redis_failure`` on each use.
    """
    if settings.redis_sentinels:
        from .redis import RedisStore
        return RedisStore.from_sentinels(settings.sentinel_addresses(),
                                         settings.redis_sentinel_master, settings.redis_url,
                                         settings.redis_prefix, settings.redis_timeout)
    if settings.redis_url:
        from .redis import RedisStore
        return RedisStore.from_url(settings.redis_url, settings.redis_prefix,
                                   settings.redis_timeout)
    from .memory import MemoryStore
    return MemoryStore()
