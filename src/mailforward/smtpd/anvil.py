"""Per-client connection limits shared by every worker: the supervisor plays anvil(8).

Postfix's smtpd processes ask one anvil daemon, so a client's connections
are counted whichever process accepted them.  Here the supervisor keeps the
one :class:`~.limits.ClientLimits` and each worker asks it over its own
channel, a Unix socket pair made before the fork, in lines of ASCII:

===================  ==================
worker -> supervisor  supervisor -> worker
===================  ==================
``ready``            (nothing)
``connect <ip>``     ``ok`` or ``refused``
``disconnect <ip>``  (nothing)
===================  ==================

Answers come in the order of the questions.  The supervisor remembers the
connections each channel holds, so the counts of a worker that dies are
released with it.

When the supervisor does not answer within :data:`ANVIL_TIMEOUT` the worker
admits the client and logs a warning: it fails open, as Postfix's smtpd does
when anvil is unreachable.  The limits keep one client from taking every
session; refusing all mail because the counter is slow would be the larger
outage.  A channel that closes means the supervisor is gone: the worker
stops (:attr:`AnvilClient.lost`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Iterable

from ..channel import LineChannel
from ..config import ServerSettings
from .limits import ClientLimits

log = logging.getLogger("mailforward.smtpd")

ANVIL_TIMEOUT = 2.0  # seconds a worker waits for an answer before admitting anyway
MAX_LINE = 512  # an IPv6 address and a verb fit many times over

READY = b"ready"
CONNECT = b"connect"
DISCONNECT = b"disconnect"
OK = b"ok"
REFUSED = b"refused"


# ---------------------------------------------------------------- supervisor side


class AnvilChannel(LineChannel):
    """The supervisor's end of one worker's anvil channel (non-blocking, driven by a selector)."""

    protocol = "anvil"
    max_line = MAX_LINE

    def __init__(self, sock: socket.socket, worker: int) -> None:
        super().__init__(sock, worker)
        self.ready = False  # the worker said it is serving
        self.held: collections.Counter[str] = collections.Counter()  # admitted, still open


class AnvilService:
    """Answers the workers' questions with one :class:`ClientLimits` for all of them."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits

    def serve(self, channel: AnvilChannel) -> bool:
        """Handle what the channel has sent; False when it closed (then :meth:`release` it)."""
        lines = channel.lines()
        if lines is None:
            return False
        replies = bytearray()
        for line in lines:
            verb, _, ip_bytes = line.strip().partition(b" ")
            ip = ip_bytes.decode("ascii", "replace")
            if verb == CONNECT and ip:
                admitted = self.limits.connect(ip)
                if admitted:
                    channel.held[ip] += 1
                replies += (OK if admitted else REFUSED) + b"\n"
            elif verb == DISCONNECT and ip:
                if channel.held[ip] > 0:  # admitted without us (fail-open) is not ours to count
                    channel.held[ip] -= 1
                    self.limits.disconnect(ip)
                if channel.held[ip] <= 0:
                    del channel.held[ip]
            elif verb == READY:
                channel.ready = True
            else:
                log.warning("worker %d: anvil protocol error (%r ignored)", channel.worker,
                            line[:40])
        if replies:
            channel.send(bytes(replies))
        return True

    def release(self, channel: AnvilChannel) -> None:
        """The worker is gone, and its clients' connections with it."""
        for ip, count in channel.held.items():
            for _ in range(count):
                self.limits.disconnect(ip)
        channel.held.clear()


# ---------------------------------------------------------------- worker side


class AnvilClient:
    """A worker's end of its channel: asks whether a client may connect, tells when it left."""

    def __init__(self, sock: socket.socket, timeout: float = ANVIL_TIMEOUT) -> None:
        self._sock = sock
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[bool]] = collections.deque()
        self.lost = asyncio.Event()  # set when the supervisor's end closed

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if not self._waiting:
                    continue
                waiter = self._waiting.popleft()
                if not waiter.done():  # a late answer to a question that timed out: dropped
                    waiter.set_result(line.strip() != REFUSED)
        except (ConnectionError, OSError):
            pass
        finally:
            self.lost.set()
            while self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(True)

    def _send(self, line: bytes) -> bool:
        if self._writer is None or self.lost.is_set() or self._writer.is_closing():
            return False
        self._writer.write(line + b"\n")
        return True

    def ready(self) -> None:
        """Tell the supervisor this worker is serving."""
        self._send(READY)

    async def ask(self, ip: str) -> bool:
        """May ``ip`` open one more connection?  True also when the anvil cannot answer."""
        waiter = asyncio.get_running_loop().create_future()
        if not self._send(CONNECT + b" " + ip.encode("ascii", "replace")):
            return True  # shutting down: the limits no longer matter
        self._waiting.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self._timeout)
        except TimeoutError:
            log.warning("client=%s admitted without a connection count: the supervisor did not "
                        "answer within %.0f s", ip, self._timeout)
            return True

    def release(self, ip: str) -> None:
        self._send(DISCONNECT + b" " + ip.encode("ascii", "replace"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await asyncio.wait([self._reader_task], timeout=2)
            self._reader_task.cancel()


class SharedLimits(ClientLimits):
    """:class:`ClientLimits` as the handler uses it, answered by the supervisor's anvil.

    ``SmtpHandler.connected`` calls :meth:`connect` synchronously, so the
    server asks first (:meth:`admit`, awaited just before the session runs)
    and :meth:`connect` hands that answer over.  Nothing else runs between
    the two: the session coroutine goes from ``admit`` straight into the
    handler's ``connected`` without yielding to the loop.  The counting
    itself happens in the supervisor; the inherited counters stay unused
    (``open_connections`` is always 0 here).

    An exempt client (``[server] client_limit_exceptions``) is decided here,
    in the worker: it costs no question and no release, so the supervisor
    never hears of it (Postfix's smtpd does not talk to anvil for it either).
    What the supervisor admitted is remembered per client, so a release is
    sent exactly for those, even when a reload changed who is exempt meanwhile.
    """

    def __init__(self, anvil: AnvilClient, max_concurrent: int, max_rate: int,
                 time_unit: float, *, exceptions: Iterable[str] = ()) -> None:
        super().__init__(max_concurrent, max_rate, time_unit, exceptions=exceptions)
        self.anvil = anvil
        self._answers: dict[str, bool] = {}
        self._counted: collections.Counter[str] = collections.Counter()  # admitted by anvil

    @classmethod
    def for_worker(cls, anvil: AnvilClient, server: ServerSettings) -> SharedLimits:
        """The limits ``[server]`` asks for, counted by the supervisor behind ``anvil``."""
        return cls(anvil, server.client_connection_count_limit,
                   server.client_connection_rate_limit, server.client_connection_rate_time_unit,
                   exceptions=server.limit_exceptions)

    async def admit(self, ip: str) -> None:
        if not self.exempt(ip):
            self._answers[ip] = await self.anvil.ask(ip)

    def connect(self, ip: str) -> bool:
        if self.exempt(ip):
            return True
        admitted = self._answers.pop(ip, True)
        if admitted:
            self._counted[ip] += 1
        return admitted

    def disconnect(self, ip: str) -> None:
        counted = self._counted.pop(ip, 0)
        if not counted:
            return  # exempt when it connected: the supervisor never counted it
        if counted > 1:
            self._counted[ip] = counted - 1
        self.anvil.release(ip)
