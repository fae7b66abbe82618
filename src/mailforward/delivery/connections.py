"""Outbound SMTP sessions kept open between transactions: Postfix's scache, in-process.

After a transaction that ended cleanly, the session goes back to the cache
instead of being closed; the next transaction to the same next hop takes it
(most recently used first), sends RSET, and skips connect, EHLO and
STARTTLS.  When the next hop offers PIPELINING (RFC 2920), the RSET is not
a round trip of its own here: the session is handed over ``unchecked`` and
the client writes the RSET in front of the transaction's MAIL FROM, checks
its reply first, and reports it with :meth:`ConnectionCache.checked`.

A session is keyed by its next hop (address, port) and by the TLS policy it
was set up with, so a session is only reused for what it was opened for.

Bounds (``[delivery]`` settings, Postfix's names in brackets):

* ``connection_idle_time`` -- an idle session is closed (QUIT) after this
  many seconds by a timer [smtp_connection_cache_time_limit];
* ``connection_reuse_time`` -- a session older than this is not reused
  [smtp_connection_reuse_time_limit];
* ``connection_cache_hop_limit`` -- idle sessions per next hop, the oldest
  one goes first;
* ``connection_cache_size`` -- idle sessions in all, the oldest goes first;
  0 turns reuse off.

A cached session the next hop closed meanwhile (its 421 or FIN was seen),
or whose RSET fails (here, or pipelined by the client), is closed and the
next one tried, then a new connection opened: the caller never sees it.
:meth:`ConnectionCache.close` closes every idle session; the delivery object
calls it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import aiosmtplib

log = logging.getLogger(__name__)

RSET_TIMEOUT = 20.0  # Postfix's smtp_rset_timeout


@dataclass(frozen=True)
class HopKey:
    """What a session may be reused for: the same address, port and TLS policy."""

    address: str
    port: int
    tls: str = "may"  # opportunistic STARTTLS, the only policy so far


@dataclass(eq=False)
class Session:
    """One open SMTP session and its history."""

    client: aiosmtplib.SMTP
    key: HopKey
    opened: float  # loop time
    transactions: int = 0
    reused: bool = False  # taken from the cache for the current transaction
    # Taken without RSET: the transaction pipelines it in front of MAIL and checks its reply.
    unchecked: bool = False
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def connected(self) -> bool:
        return self.client.is_connected


def dismiss(client: aiosmtplib.SMTP) -> None:
    """Close a session politely without waiting: QUIT is written, then the socket is closed.

    The transport flushes what is buffered before it closes, so the next hop
    reads QUIT; its answer does not matter to us.
    """
    protocol = client.protocol
    if protocol is not None and protocol.is_connected:
        try:
            protocol.write(b"QUIT\r\n")
        except (aiosmtplib.SMTPException, RuntimeError, OSError):
            pass
    client.close()


class ConnectionCache:
    """Idle sessions per next hop, bounded in number and idle time (see the module docstring)."""

    def __init__(self, size: int = 100, hop_limit: int = 50, idle_time: float = 2.0,
                 reuse_time: float = 300.0, rset_timeout: float = RSET_TIMEOUT) -> None:
        self.size = size
        self.hop_limit = hop_limit
        self.idle_time = idle_time
        self.reuse_time = reuse_time
        self.rset_timeout = rset_timeout
        # hop -> its idle sessions, oldest first; the dict itself is in least recently used order
        self._idle: OrderedDict[HopKey, list[Session]] = OrderedDict()
        self._count = 0
        self._closed = False
        self.opened = 0  # sessions opened through this cache (statistics, tests)
        self.reused = 0  # transactions that found a live session here

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.hop_limit > 0 and self.idle_time > 0 and not self._closed

    @property
    def idle(self) -> int:
        """How many sessions are idle in the cache now."""
        return self._count

    async def take(self, key: HopKey) -> Session | None:
        """A session to ``key``, reset with RSET; None when there is none.

        A next hop offering PIPELINING gets no RSET here: the session comes
        back ``unchecked``, and the transaction writes the RSET together with
        its envelope (one round trip less per message) and calls
        :meth:`checked` once the RSET was answered.
        """
        while True:
            session = self._pop(key)
            if session is None:
                return None
            if not session.connected:  # the next hop closed it while it was idle
                session.client.close()
                continue
            if self._too_old(session):
                dismiss(session.client)
                continue
            if session.client.supports_extension("pipelining"):
                session.reused = session.unchecked = True
                return session
            try:
                await session.client.rset(timeout=self.rset_timeout)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                log.debug("cached session to %s:%d is unusable (%s): closed", key.address,
                          key.port, type(error).__name__)
                session.client.close()
                continue
            session.reused = True
            self.reused += 1
            return session

    def checked(self, session: Session) -> None:
        """The RSET pipelined on an ``unchecked`` session was accepted: the session is reused."""
        session.unchecked = False
        self.reused += 1

    def put(self, session: Session) -> None:
        """Keep ``session`` for the next transaction to its hop, or close it."""
        session.reused = session.unchecked = False
        if not self.enabled or not session.connected or self._too_old(session):
            dismiss(session.client)
            return
        sessions = self._idle.setdefault(session.key, [])
        if len(sessions) >= self.hop_limit:
            self._evict(session.key)
        while self._count >= self.size:
            self._evict(next(iter(self._idle)))
        sessions = self._idle.setdefault(session.key, [])
        sessions.append(session)
        self._idle.move_to_end(session.key)
        self._count += 1
        session._timer = asyncio.get_running_loop().call_later(self.idle_time, self._expire, session)

    async def close(self) -> None:
        """Close every idle session (QUIT) and cache nothing from now on."""
        self._closed = True
        for sessions in list(self._idle.values()):
            for session in sessions:
                self._cancel_timer(session)
                dismiss(session.client)
        self._idle.clear()
        self._count = 0

    # --- internals

    def _too_old(self, session: Session) -> bool:
        return asyncio.get_running_loop().time() - session.opened >= self.reuse_time

    def _pop(self, key: HopKey) -> Session | None:
        sessions = self._idle.get(key)
        if not sessions:
            return None
        session = sessions.pop()  # the most recently used: the least likely to be timed out
        self._count -= 1
        if not sessions:
            del self._idle[key]
        self._cancel_timer(session)
        return session

    def _evict(self, key: HopKey) -> None:
        """Close the oldest idle session of ``key``."""
        sessions = self._idle.get(key)
        if not sessions:
            self._idle.pop(key, None)
            return
        session = sessions.pop(0)
        self._count -= 1
        if not sessions:
            del self._idle[key]
        self._cancel_timer(session)
        dismiss(session.client)

    def _expire(self, session: Session) -> None:
        session._timer = None
        sessions = self._idle.get(session.key)
        if sessions is None or session not in sessions:
            return
        sessions.remove(session)
        self._count -= 1
        if not sessions:
            del self._idle[session.key]
        dismiss(session.client)

    @staticmethod
    def _cancel_timer(session: Session) -> None:
        if session._timer is not None:
            session._timer.cancel()
            session._timer = None
