"""The in-process store shared by a node's worker processes, kept by their supervisor.

With ``[server] workers`` above 1 and no Redis, the workers must still count
together: one :class:`~.memory.MemoryStore` lives in the supervisor, and
each worker asks it over its own channel (a Unix socket pair made before
the fork), as the workers ask the supervisor's anvil for connection counts
(``smtpd/anvil.py``).  The supervisor runs no event loop, so its side
(:class:`StoreService` with one :class:`StoreChannel` per worker) is
non-blocking and driven by its selector; the worker's side
(:class:`SocketStore`) is a :class:`~.Store` like the others.

One JSON object per line, answered in order::

    worker -> supervisor                                   supervisor -> worker
    {"op": "admit", "windows": [[key, limit, seconds]...]}  {"full": index or null}
    {"op": "seen", "keys": [...]}                           {"seen": [...]}
    {"op": "remember", "keys": [...], "ttl": seconds}        {}

A supervisor that does not answer within the timeout, or a channel that
closed, makes the call raise :class:`~.StoreUnavailable`, handled like a
Redis outage (``[limits] redis_failure``).

The supervisor (``smtpd/supervisor.py``) keeps one :class:`StoreService`
when ``[limits]`` names no Redis, makes each worker's store channel beside
its anvil channel and drives both from the same selector; the worker's
``Service`` hands its end to ``abuse_from_settings``.  The counts and the
duplicate cache live as long as the supervisor: a worker that dies and is
replaced finds them as they were.  With Redis configured there is no store
channel: every process asks Redis.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..channel import LineChannel
from . import StoreUnavailable, Window
from .memory import MemoryStore

STORE_TIMEOUT = 2.0  # seconds a worker waits for the supervisor's answer
MAX_LINE = 1 << 20  # one request: keys of a message's destinations fit many times over


# ---------------------------------------------------------------- supervisor side


class StoreChannel(LineChannel):
    """The supervisor's end of one worker's store channel."""

    protocol = "store"
    max_line = MAX_LINE


class StoreService:
    """Answers every worker's requests from one :class:`MemoryStore`."""

    def __init__(self, store: MemoryStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store if store is not None else MemoryStore(clock)
        self.clock = clock

    def serve(self, channel: StoreChannel) -> bool:
        """Handle what the channel has sent; False when it closed (then close it)."""
        lines = channel.lines()
        if lines is None:
            return False
        out = bytearray()
        for line in lines:
            answer = self.answer(line)
            if answer is not None:
                out += json.dumps(answer, separators=(",", ":")).encode() + b"\n"
        if out:
            channel.send(bytes(out))
        return True

    def answer(self, line: bytes) -> dict[str, Any] | None:
        """The reply to one request; None for a ``remember`` the worker does not wait for."""
        try:
            request = json.loads(line)
            op = request["op"]
            now = self.clock()
            if op == "admit":
                windows = [Window(str(k), int(n), float(s)) for k, n, s in request["windows"]]
                return {"full": self.store.admit_at(windows, now)}
            if op == "seen":
                return {"seen": sorted(self.store.seen_at([str(k) for k in request["keys"]], now))}
            if op == "remember":
                self.store.remember_at([str(k) for k in request["keys"]], float(request["ttl"]),
                                       now)
                return None if request.get("quiet") else {}
        except (ValueError, KeyError, TypeError) as error:
            return {"error": f"{type(error).__name__}: {error}"}
        return {"error": f"unknown op {op!r}"}


# ---------------------------------------------------------------- worker side


class SocketStore:
    """A worker's store: the supervisor's, asked over the worker's channel."""

    description = "the supervisor (shared by this node's workers)"

    def __init__(self, sock: socket.socket, timeout: float = STORE_TIMEOUT) -> None:
        self._sock = sock
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._lost = False

    async def _connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock,
                                                                  limit=MAX_LINE + 1)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _channel(self) -> asyncio.StreamWriter:
        if self._connecting is None:  # once, however many ask at first
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            await asyncio.shield(self._connecting)
        except OSError as error:
            raise StoreUnavailable(f"the supervisor's store: {error}") from None
        if self._lost or self._writer is None or self._writer.is_closing():
            raise StoreUnavailable("the supervisor's store: channel closed")
        return self._writer

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        writer = await self._channel()
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        writer.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        try:
            answer = await asyncio.wait_for(asyncio.shield(waiter), self._timeout)
        except TimeoutError:
            raise StoreUnavailable(f"the supervisor's store: no answer within "
                                   f"{self._timeout:g} s") from None
        if "error" in answer:
            raise StoreUnavailable(f"the supervisor's store: {answer['error']}")
        return answer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if self._waiting:
                    waiter = self._waiting.popleft()
                    if not waiter.done():  # an answer to a question that timed out: dropped
                        waiter.set_result(json.loads(line))
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self._lost = True
            while self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_exception(StoreUnavailable("the supervisor's store: channel closed"))

    async def admit(self, windows: Sequence[Window]) -> int | None:
        if not windows:
            return None
        answer = await self._ask({"op": "admit", "windows": [[w.key, w.limit, w.seconds]
                                                              for w in windows]})
        full = answer.get("full")
        return None if full is None else int(full)

    async def seen(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        return set((await self._ask({"op": "seen", "keys": list(keys)}))["seen"])

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        """Told, not asked: the supervisor applies it in order with this worker's later
        questions, and the sender's 250 does not wait a round trip for it."""
        if keys:
            writer = await self._channel()
            writer.write(json.dumps({"op": "remember", "keys": list(keys), "ttl": ttl,
                                     "quiet": True}, separators=(",", ":")).encode() + b"\n")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await asyncio.wait([self._reader_task], timeout=2)
            self._reader_task.cancel()
        if self._writer is None:
            self._sock.close()
