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
``Service`` hands its end to ``abuse_from_settings``.  The counts live as
long as the supervisor: a worker that dies and is replaced finds them as
they were.  With Redis configured there is no store channel: every process
asks Redis.

The duplicate cache of the supervisor's workers is not asked here: they
read and write it in memory they share (``state/duplicates.py``), which
saves a round trip per message.  A worker's store is then a
:class:`~.duplicates.TableBackedStore` in front of its :class:`SocketStore`,
which carries only ``admit``.  ``seen`` and ``remember`` are still answered
here, for a :class:`SocketStore` used on its own.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..channel import LineChannel
from . import Store, StoreUnavailable, Window
from .memory import MemoryStore

STORE_TIMEOUT = 2.0  # seconds a worker waits for the supervisor's answer
MAX_LINE = 1 << 20  # one request: keys of a message's destinations fit many times over

T = TypeVar("T")


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

Read = Callable[[dict[str, Any]], T]
"""What a caller makes of the supervisor's answer to its request."""


class SocketStore(Store):
    """A worker's store: the supervisor's, asked over the worker's channel.

    Each request written gets a future for its answer, queued in the order the
    supervisor answers.  :meth:`ask_seen` writes its question at once and hands
    out that future: the question is on its way before the caller's other work,
    and no task stands between the channel and the answer.
    """

    description = "the supervisor (shared by this node's workers)"

    def __init__(self, sock: socket.socket, timeout: float = STORE_TIMEOUT) -> None:
        self._sock = sock
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: collections.deque[tuple[asyncio.Future[Any], Read[Any]]] = \
            collections.deque()
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
        writer = self._open_writer()
        if writer is None:
            raise StoreUnavailable("the supervisor's store: channel closed")
        return writer

    def _open_writer(self) -> asyncio.StreamWriter | None:
        """The channel, when it is connected and not closed."""
        if self._lost or self._writer is None or self._writer.is_closing():
            return None
        return self._writer

    def _send(self, writer: asyncio.StreamWriter, request: dict[str, Any],
              read: Read[T]) -> asyncio.Future[T]:
        """Write ``request`` now; the future is ``read`` of its answer, or raises
        :class:`StoreUnavailable` (an error answer, none within the timeout, the channel lost).

        A future cancelled by its caller keeps its place in the queue: its answer,
        when it comes, is dropped.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        self._waiting.append((answer, read))
        writer.write(_line(request))
        timer = loop.call_later(self._timeout, _no_answer, answer, self._timeout)
        answer.add_done_callback(lambda _: timer.cancel())
        return answer

    async def _ask(self, request: dict[str, Any], read: Read[T]) -> T:
        return await self._send(await self._channel(), request, read)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if self._waiting:
                    answer, read = self._waiting.popleft()
                    if not answer.done():  # else timed out or no longer wanted: dropped
                        _settle(answer, read, json.loads(line))
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self._lost = True
            while self._waiting:
                answer, _ = self._waiting.popleft()
                if not answer.done():
                    answer.set_exception(StoreUnavailable("the supervisor's store: channel closed"))

    async def admit(self, windows: Sequence[Window]) -> int | None:
        if not windows:
            return None
        return await self._ask({"op": "admit", "windows": [[w.key, w.limit, w.seconds]
                                                           for w in windows]}, _full_window)

    async def seen(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        return await self._ask({"op": "seen", "keys": list(keys)}, _seen_keys)

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        """The question written now, when the channel is open (else connecting first, in a task)."""
        writer = self._open_writer()
        if writer is None:
            return super().ask_seen(keys)
        return self._send(writer, {"op": "seen", "keys": list(keys)}, _seen_keys)

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        """Told, not asked: the supervisor applies it in order with this worker's later
        questions, and the sender's 250 does not wait a round trip for it."""
        if keys:
            writer = await self._channel()
            writer.write(_line({"op": "remember", "keys": list(keys), "ttl": ttl,
                                "quiet": True}))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await asyncio.wait([self._reader_task], timeout=2)
            self._reader_task.cancel()
        if self._writer is None:
            self._sock.close()


def _line(request: dict[str, Any]) -> bytes:
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


def _settle(answer: asyncio.Future[T], read: Read[T], reply: dict[str, Any]) -> None:
    """The supervisor's reply to a pending request, made its answer."""
    if "error" in reply:
        answer.set_exception(StoreUnavailable(f"the supervisor's store: {reply['error']}"))
        return
    try:
        answer.set_result(read(reply))
    except (KeyError, TypeError, ValueError) as error:
        answer.set_exception(StoreUnavailable(f"the supervisor's store: bad answer: {error!r}"))


def _no_answer(answer: asyncio.Future[Any], timeout: float) -> None:
    if not answer.done():
        answer.set_exception(StoreUnavailable(f"the supervisor's store: no answer within "
                                              f"{timeout:g} s"))


def _full_window(reply: dict[str, Any]) -> int | None:
    full = reply.get("full")
    return None if full is None else int(full)


def _seen_keys(reply: dict[str, Any]) -> set[str]:
    return {str(key) for key in reply["seen"]}
