"""The Redis store: counters and the duplicate cache shared by every node.

Each node names the same Redis (``[limits] redis_url``, or Sentinel with
``redis_sentinels``); every key starts with ``[limits] redis_prefix``.

* A sliding window is a sorted set of event times (microseconds).  One Lua
  script trims every window of the request, checks that each has room, and
  only then adds the event to all of them: Redis runs a script alone, so no
  other node's request can come in between (no read-modify-write race).
  The time is Redis's own (``TIME``), one clock for every node.
* The TTL set is plain keys with an expiry (``SET ... PX``), read with ``MGET``.

Every call has a deadline (``[limits] redis_timeout``, connecting
included) and redis-py's own retries are off: a Redis that is down, slow or
unreachable makes the call raise :class:`~.StoreUnavailable` within the
deadline, never hang.  After a failure the store does not try again for
:data:`RETRY_INTERVAL` seconds and answers :class:`StoreUnavailable` at
once, so an outage costs each SMTP command nothing but the policy's answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from . import Store, StoreUnavailable, Window

log = logging.getLogger("mailforward.state")

T = TypeVar("T")

RETRY_INTERVAL = 1.0  # seconds without a try after a failure
MAX_CONNECTIONS = 64  # per process; more concurrent calls wait for one (within the deadline)

# KEYS: the windows.  ARGV[1]: this event's unique member; ARGV[2]: the time in
# microseconds, or "" for Redis's clock; then per window its limit and its length in µs.
ADMIT_SCRIPT = """
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
end
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local span = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - span)
  if redis.call('ZCARD', key) >= limit then
    return i
  end
end
for i, key in ipairs(KEYS) do
  local span = tonumber(ARGV[2 + 2 * i])
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, math.ceil(span / 1000) + 1000)
end
return 0
"""


class RedisStore(Store):
    """``clock`` (seconds) replaces Redis's own clock: for tests that need exact times.

    :meth:`ask_seen` is the default (a task): redis-py sends a command only from a coroutine.
    """

    def __init__(self, client: redis.asyncio.Redis, prefix: str, timeout: float, *,
                 clock: Callable[[], float] | None = None, description: str = "redis") -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock
        self.description = description
        self._admit_script = client.register_script(ADMIT_SCRIPT)
        self._member_prefix = secrets.token_hex(6)
        self._members = itertools.count()
        self._down_until = 0.0
        self._last_error = ""
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    @classmethod
    def from_url(cls, url: str, prefix: str, timeout: float, *,
                 clock: Callable[[], float] | None = None) -> RedisStore:
        client = redis.asyncio.Redis.from_url(url, **_client_options(timeout))
        return cls(client, prefix, timeout, clock=clock, description=_describe(url))

    @classmethod
    def from_sentinels(cls, sentinels: Sequence[tuple[str, int]], service: str, url: str,
                       prefix: str, timeout: float) -> RedisStore:
        """The master Sentinel names for ``service``; ``url`` may give its password and db."""
        options: dict[str, Any] = _client_options(timeout)
        if url:
            parts = urlsplit(url)
            if parts.password:
                options["password"] = unquote(parts.password)
            if parts.username:
                options["username"] = unquote(parts.username)
            if parts.path.strip("/"):
                options["db"] = int(parts.path.strip("/"))
        sentinel_options = {k: v for k, v in _client_options(timeout).items()
                            if k != "max_connections"}  # the Sentinels' own connections
        sentinel = Sentinel(list(sentinels), sentinel_kwargs=sentinel_options,  # type: ignore[no-untyped-call]
                            **options)
        client = sentinel.master_for(service)
        return cls(client, prefix, timeout,
                   description=f"redis sentinel {service} via "
                               + ",".join(f"{h}:{p}" for h, p in sentinels))

    # ------------------------------------------------------------ the Store interface

    async def admit(self, windows: Sequence[Window]) -> int | None:
        if not windows:
            return None
        member = f"{self._member_prefix}:{next(self._members)}"
        now = "" if self._clock is None else str(int(self._clock() * 1_000_000))
        args: list[str | int] = [member, now]
        for window in windows:
            args += [window.limit, int(window.seconds * 1_000_000)]
        keys = [self._prefix + window.key for window in windows]
        result = await self._call(lambda: self._admit_script(keys=keys, args=args))
        index = int(result)
        return None if index == 0 else index - 1

    async def seen(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        values = await self._call(lambda: self._client.mget([self._prefix + k for k in keys]))
        return {key for key, value in zip(keys, values, strict=True) if value is not None}

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        if not keys:
            return
        milliseconds = max(1, int(ttl * 1000))

        async def store() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._prefix + key, b"1", px=milliseconds)
                await pipe.execute()

        await self._call(store)

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                close = getattr(self._client, "aclose", None)  # redis-py >= 5.0.1
                await (close() if close is not None else self._client.close())
        except (RedisError, OSError, TimeoutError):
            pass

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless Redis answers (ignores the retry pause)."""
        self._down_until = 0.0
        await self._call(self._client.ping)

    # ------------------------------------------------------------ deadline and failures

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        now = time.monotonic()
        if now < self._down_until:
            raise StoreUnavailable(f"{self.description}: not retried yet after: {self._last_error}")
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                return await operation()
        except (RedisError, OSError, TimeoutError, EOFError) as error:
            self._down_until = time.monotonic() + RETRY_INTERVAL
            self._last_error = (f"timed out after {self._timeout:g} s"
                                if isinstance(error, TimeoutError) and not str(error)
                                else f"{type(error).__name__}: {error}")
            raise StoreUnavailable(f"{self.description}: {self._last_error}") from error


def _client_options(timeout: float) -> dict[str, Any]:
    """One try per call (no redis-py retries), bounded connect and socket times."""
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0), "max_connections": MAX_CONNECTIONS}


def _describe(url: str) -> str:
    """The URL without a password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return f"redis {url}"
    netloc = parts.netloc.rpartition("@")[2]
    return f"redis {parts.scheme}://{netloc}{parts.path}"
