"""The supervisor's end of a channel to one worker: lines over a Unix socket pair.

``mailforward serve`` with ``[server] workers`` above 1 gives each worker
channels made before the fork (``smtpd/supervisor.py``): one to the anvil
(connection counts, ``smtpd/anvil.py``) and one to the limits store
(``state/shared.py``).  The supervisor runs no event loop, so its ends are
non-blocking and driven by its selector: :meth:`LineChannel.lines` on
``EVENT_READ``, :meth:`LineChannel.flush` on ``EVENT_WRITE`` (registered
while :attr:`LineChannel.wants_write`).  Each protocol is lines answered in
order; what a line means is the service's business, not the channel's.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("mailforward.smtpd")

RECEIVE_SIZE = 1 << 16


class LineChannel:
    """Non-blocking lines in and out; ``max_line`` bounds a line still incomplete."""

    protocol = "channel"  # named in the log
    max_line = 512

    def __init__(self, sock: socket.socket, worker: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.worker = worker
        self._in = bytearray()
        self._out = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def lines(self) -> list[bytes] | None:
        """Complete lines received so far; None when the worker's end closed (or misbehaved)."""
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        self._in += data
        *complete, rest = self._in.split(b"\n")
        if len(rest) > self.max_line:
            log.error("worker %d: %s protocol error (line too long)", self.worker, self.protocol)
            return None
        self._in = bytearray(rest)
        return [bytes(line) for line in complete]

    def send(self, data: bytes) -> None:
        self._out += data
        self.flush()

    def flush(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._out.clear()  # the worker is gone; its end is read as closed next
            return
        del self._out[:sent]

    def close(self) -> None:
        self.sock.close()
