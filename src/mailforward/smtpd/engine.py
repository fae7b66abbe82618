"""Our SMTP server engine: framing, the command state machine, limits and timers.

It owns the bytes; the handler (``handler.py``) owns the decisions.  The
engine reads the socket in large chunks into one buffer and cuts commands
and message data out of it itself, so that:

* memory per session is bounded by the message size limit: DATA and BDAT go
  into one growing buffer, and once a message is over the limit only the
  last few bytes are kept (to find the end), never a list of lines;
* there is one timer per wait for the client (``command_timeout``), not one
  per line;
* only ``<CRLF>.<CRLF>`` ends DATA.  A bare LF or bare CR is either normalised
  to CRLF once the message is complete (``normalize``, Postfix's
  ``smtpd_forbid_bare_newline = normalize``) or refused with 521
  (``reject``); either way everything after the engine sees CRLF only, so
  the bytes verified are the bytes signed and sent, and no smuggled second
  transaction can exist;
* every complete transaction is answered, even when the client has already
  shut down its sending side (half-close after the final dot);
* an HTTP request or a header line sent as a command ends the session at
  once (Postfix's ``smtpd_forbidden_commands``), trusted client or not, so a
  browser cannot be turned into an SMTP client (cross-protocol attacks);
* after STARTTLS, anything the client pipelined in plain text is discarded
  (CVE-2011-0411), and the session starts over as RFC 3207 requires;
* a reply never fails to encode: client text is echoed as printable ASCII
  (``Reply.about``) and every reply is ASCII;
* on shutdown (:meth:`SmtpConnection.close_when_idle`) a session between
  commands gets ``421 4.3.2`` at once, while a DATA or BDAT transaction (or a
  command in progress) finishes and gets its reply first.

Policy lives behind :class:`SessionHandler`; the engine checks only syntax and
command order.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..reply import Reply
from . import replies
from .session import ClientSession, Transaction

log = logging.getLogger(__name__)

LINE_LENGTH_LIMIT = 2048  # Postfix's line_length_limit; RFC 5321 requires at least 512
NORMALIZE = "normalize"
REJECT = "reject"
BARE_NEWLINE_POLICIES = (NORMALIZE, REJECT)
FORBIDDEN_COMMANDS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "OPTIONS"})

_DATA_END = b"\r\n.\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_STUFFED_DOT = re.compile(rb"(?m)^\.")
_BDAT = re.compile(r"(\d{1,10})(?: +(LAST))?", re.IGNORECASE)


def normalize_line_ends(data: bytes | bytearray) -> bytearray:
    """Every bare CR and bare LF becomes CRLF (RFC 5322 2.3 allows no other line end)."""
    return bytearray(_LINE_END.sub(b"\r\n", data))


def has_bare_line_end(data: bytes | bytearray) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


@dataclass(frozen=True)
class EngineSettings:
    hostname: str
    message_size_limit: int
    command_timeout: float
    hard_error_limit: int
    bare_newline: str = NORMALIZE


class SessionHandler(Protocol):
    """The decisions the engine asks for; each returns the reply to send."""

    def connected(self, session: ClientSession, peer: tuple[str, int],
                  local: tuple[str, int]) -> Reply | None: ...

    def disconnected(self, session: ClientSession) -> None: ...

    async def mail(self, session: ClientSession, txn: Transaction, path: str,
                   params: list[str]) -> Reply: ...

    async def rcpt(self, session: ClientSession, txn: Transaction, path: str,
                   params: list[str]) -> Reply: ...

    async def data(self, session: ClientSession, txn: Transaction,
                   content: bytearray) -> Reply:
        """The complete message, CRLF only; the buffer is the handler's to edit in place."""
        ...


EnvelopeDecision = Callable[[ClientSession, Transaction, str, list[str]], Awaitable[Reply]]


class _Closed(Exception):
    """The client went away (EOF, reset) or we hung up: end the session quietly."""


class Wire(asyncio.Protocol):
    """The transport's bytes into one buffer, with flow control both ways.

    Our own protocol object rather than a StreamReader, so that the engine
    owns every byte received: at STARTTLS nothing the client sent in plain
    text can hide in a library buffer and be read as if it came over TLS.
    """

    HIGH_WATER = 256 * 1024  # stop reading from a client this far ahead of us

    def __init__(self, start: Callable[[Wire], None]) -> None:
        self.start = start
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self._data = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._deadline = 0.0  # loop time by which the pending receive() must be answered
        self._idle_timer: asyncio.TimerHandle | None = None
        self._waiting = False
        self._timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.start(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._data.set()
        if len(self.buffer) > self.HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._data.set()
        return True  # keep our side open: a half-closed client still gets its reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.eof = True
        self._data.set()
        self._writable.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def take(self) -> bytearray:
        """Everything buffered so far; reading resumes if it was paused."""
        data, self.buffer = self.buffer, bytearray()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def wake(self) -> None:
        """Make a pending :meth:`receive` return without new bytes (for a shutdown)."""
        self._data.set()

    async def receive(self, timeout: float) -> bool:
        """Wait until more bytes (or EOF) arrive, or :meth:`wake` is called; False when
        ``timeout`` seconds passed first.

        One timer per connection, not one per wait: each wait only moves the
        deadline, and the timer, when it fires, re-arms itself for the deadline
        if that has moved on.  A session waits eight times per message; arming
        and cancelling a timer each time was a measurable share of its CPU.
        """
        if self.buffer or self.eof:
            return True
        self._data.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        if self._idle_timer is None:
            self._idle_timer = loop.call_at(self._deadline, self._idle_check)
        self._waiting, self._timed_out = True, False
        try:
            await self._data.wait()
        finally:
            self._waiting = False
        return not self._timed_out

    def _idle_check(self) -> None:
        """The timer: end a wait past its deadline, or re-arm for a later one."""
        self._idle_timer = None
        if not self._waiting or self.lost:
            return  # the next wait arms a new timer
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._timed_out = True
            self._data.set()
        else:
            self._idle_timer = loop.call_at(self._deadline, self._idle_check)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("connection lost")
        await self._writable.wait()

    def peer(self, name: str) -> tuple[str, int]:
        info = self.transport.get_extra_info(name) if self.transport is not None else None
        return (str(info[0]), int(info[1])) if info else ("", 0)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        self.buffer.clear()
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, context, server_side=True)
        assert transport is not None
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SmtpConnection:
    """One client connection, from the banner to the close."""

    def __init__(self, handler: SessionHandler, settings: EngineSettings,
                 tls: ssl.SSLContext | None, wire: Wire) -> None:
        self.handler = handler
        self.settings = settings
        self.tls = tls
        self.wire = wire
        self.session = ClientSession()
        self.txn = Transaction()
        self.buffer = bytearray()  # taken from the wire, not yet parsed
        self.errors = 0
        self.replies: list[bytes] = []  # written in one go when the pipelined commands run out
        self.chunks: bytearray | None = None  # BDAT chunks so far; None outside BDAT
        self.chunks_size = 0
        self.closing = False  # shutting down: no further command is read
        self.awaiting_command = False  # waiting for the client's next command line
        self.commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "HELO": self.helo, "EHLO": self.ehlo, "MAIL": self.mail, "RCPT": self.rcpt,
            "DATA": self.data, "BDAT": self.bdat, "RSET": self.rset, "NOOP": self.noop,
            "QUIT": self.quit, "VRFY": self.vrfy, "ETRN": self.etrn,
            "STARTTLS": self.starttls, "AUTH": self.auth,
        }

    # ------------------------------------------------------------ the session

    async def run(self) -> None:
        try:
            refusal = self.handler.connected(self.session, self.wire.peer("peername"),
                                             self.wire.peer("sockname"))
            if refusal is not None:
                await self.hang_up(refusal)
                return
            if self.closing:
                await self.hang_up(replies.shutting_down(self.settings.hostname))
            await self.send(f"220 {self.settings.hostname} ESMTP")
            while True:
                line = await self.read_line()
                await self.dispatch(line)
        except _Closed:
            pass
        except (ConnectionError, ssl.SSLError):
            pass
        except Exception as error:  # a bug of ours: the client retries, the log has it
            log.error("client %s: internal error", self.session.client_ip, exc_info=error)
            await self._send_quietly(replies.INTERNAL_ERROR)
        finally:
            if self.session.admitted:
                self.session.admitted = False
                self.handler.disconnected(self.session)
            self.wire.close()

    def close_when_idle(self) -> None:
        """Shut down gracefully: 421 4.3.2 before the next command is read.

        A command in progress, and a DATA or BDAT transaction up to its last
        chunk, still finishes and gets its reply (a 250 there means the mail
        was delivered: cutting it would make the sender send it again).  A
        session waiting for its next command is woken and told now.
        """
        self.closing = True
        if self.awaiting_command:
            self.wire.wake()

    async def dispatch(self, line: bytes) -> None:
        if b"\r" in line or b"\0" in line or not line.strip():
            await self.reply(replies.BAD_SYNTAX)
            return
        verb_bytes, _, arg_bytes = line.strip().partition(b" ")
        verb = verb_bytes.decode("latin-1").upper()
        if verb in FORBIDDEN_COMMANDS or verb.endswith(":") or not verb[:1].isalpha():
            log.warning("client %s: non-SMTP command (%s), hanging up", self.session.client_ip,
                        replies.printable(verb[:20]))
            await self.hang_up(replies.FORBIDDEN_COMMAND)
        command = self.commands.get(verb)
        if command is None or self.chunks is not None and verb not in ("BDAT", "RSET", "QUIT",
                                                                          "NOOP"):
            await self.reply(replies.UNRECOGNIZED if command is None else replies.BDAT_EXPECTED)
            return
        await command(arg_bytes.strip().decode("utf-8", errors="surrogateescape"))

    # ------------------------------------------------------------ I/O

    async def send(self, text: str) -> None:
        """Queue one reply line; :meth:`flush` writes them when the client's pipelined
        commands run out (RFC 2920), so a multi-line EHLO or a pipelined envelope is one write."""
        self.replies.append(text.encode("ascii", "replace") + b"\r\n")

    async def flush(self) -> None:
        if self.replies:
            self.wire.write(b"".join(self.replies))
            self.replies.clear()
        await self.wire.drain()

    async def reply(self, reply: Reply) -> None:
        """Send a reply; count errors and hang up at the hard error limit, as Postfix does."""
        await self.send(str(reply))
        if reply.code >= 400 and reply.code != 421:
            self.errors += 1
            if self.errors >= self.settings.hard_error_limit:
                await self.hang_up(replies.too_many_errors(self.settings.hostname))

    async def hang_up(self, reply: Reply) -> None:
        await self._send_quietly(reply)
        raise _Closed()

    async def _send_quietly(self, reply: Reply) -> None:
        try:
            await self.send(str(reply))
            await self.flush()
        except (ConnectionError, ssl.SSLError, RuntimeError):
            pass

    async def read_more(self) -> None:
        """Flush our replies, then wait (up to the command timeout) for more bytes."""
        await self.flush()
        while True:
            if self.closing and self.awaiting_command:
                await self.hang_up(replies.shutting_down(self.settings.hostname))
            if not await self.wire.receive(self.settings.command_timeout):
                await self.hang_up(replies.timeout_exceeded(self.settings.hostname))
            chunk = self.wire.take()
            if chunk or self.wire.eof:
                break
            # Woken by close_when_idle() without new bytes: a session waiting for a
            # command hangs up above; one in the middle of DATA or BDAT reads on.
        if not chunk:
            raise _Closed()
        if self.buffer:
            self.buffer += chunk
        else:
            self.buffer = chunk

    async def read_line(self) -> bytes:
        """The next command line without its line end (CRLF, or a bare LF when normalising)."""
        scanned = 0
        while True:
            if self.closing and self.chunks is None:
                await self.hang_up(replies.shutting_down(self.settings.hostname))
            end = self.buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                if len(line) > LINE_LENGTH_LIMIT:
                    await self.reply(replies.LINE_TOO_LONG)
                    scanned = 0
                    continue
                return await self._command_line(line)
            if len(self.buffer) > LINE_LENGTH_LIMIT:
                await self._discard_long_line()
                scanned = 0
                continue
            scanned = len(self.buffer)
            self.awaiting_command = self.chunks is None  # between BDAT chunks: not idle
            try:
                await self.read_more()
            finally:
                self.awaiting_command = False

    async def _command_line(self, line: bytes) -> bytes:
        if line.endswith(b"\r\n"):
            return line[:-2]
        if self.settings.bare_newline == REJECT:
            await self.hang_up(replies.BARE_NEWLINE)
        return line[:-1]

    async def _discard_long_line(self) -> None:
        while (end := self.buffer.find(b"\n")) < 0:
            self.buffer.clear()
            await self.read_more()
        del self.buffer[:end + 1]
        await self.reply(replies.LINE_TOO_LONG)

    async def read_exactly(self, count: int, keep: bool) -> bytes:
        """``count`` bytes (BDAT), kept or (over the size limit) only consumed."""
        kept = bytearray()
        while count:
            if not self.buffer:
                await self.read_more()
            piece = self.buffer[:count]
            del self.buffer[:len(piece)]
            count -= len(piece)
            if keep:
                kept += piece
        return bytes(kept)

    async def read_data(self) -> bytearray | Reply:
        """The message after DATA, up to ``<CRLF>.<CRLF>``, unstuffed and line-normalised.

        The data begins at a line start, so a first line of "." ends it too.
        Once over the size limit, all but the last four bytes are dropped:
        the terminator can still be found, and memory stays bounded.
        """
        limit = self.settings.message_size_limit
        data, self.buffer = self.buffer, bytearray()
        dropped = scanned = 0
        while True:
            if not dropped and data[:3] == b".\r\n":
                content_end, rest = 0, 3
                break
            found = data.find(_DATA_END, scanned)
            if found >= 0:
                content_end, rest = found + 2, found + 5
                break
            if dropped + len(data) > limit + len(_DATA_END):
                dropped += len(data) - 4
                del data[:-4]
            scanned = max(len(data) - 4, 0)
            self.buffer = data
            await self.read_more()
            data, self.buffer = self.buffer, bytearray()
        self.buffer = data[rest:]
        if dropped + content_end > limit:
            return replies.MESSAGE_TOO_BIG
        del data[content_end:]  # the buffer becomes the message: no second copy
        if data.find(b"\n.") >= 0 or data[:1] == b".":
            data = bytearray(_STUFFED_DOT.sub(b"", data))
        return self.line_ends(data)

    def line_ends(self, content: bytearray) -> bytearray | Reply:
        """Apply the bare-newline policy to a complete message."""
        if not has_bare_line_end(content):
            return content
        if self.settings.bare_newline == REJECT:
            if content.count(b"\n") != content.count(b"\r\n"):
                return replies.BARE_NEWLINE
            return replies.BARE_CARRIAGE_RETURN
        return normalize_line_ends(content)

    # ------------------------------------------------------------ state

    def reset_transaction(self) -> None:
        self.txn = Transaction()
        self.chunks = None
        self.chunks_size = 0

    def need_greeting(self) -> Reply | None:
        return None if self.session.host_name else replies.NEED_HELO

    # ------------------------------------------------------------ commands

    async def helo(self, arg: str) -> None:
        await self._greet(arg, extended=False)

    async def ehlo(self, arg: str) -> None:
        await self._greet(arg, extended=True)

    async def _greet(self, hostname: str, extended: bool) -> None:
        if not hostname or " " in hostname:
            await self.reply(replies.EHLO_SYNTAX if extended else replies.HELO_SYNTAX)
            return
        self.reset_transaction()
        self.session.host_name = hostname
        self.session.extended_smtp = extended
        name = self.settings.hostname
        if not extended:
            await self.send(f"250 {name}")
            return
        lines = [name, "PIPELINING", f"SIZE {self.settings.message_size_limit}"]
        if self.tls is not None and not self.session.tls:
            lines.append("STARTTLS")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        for line in lines[:-1]:
            await self.send(f"250-{line}")
        await self.send(f"250 {lines[-1]}")

    async def mail(self, arg: str) -> None:
        refusal = self.need_greeting() or (replies.NESTED_MAIL if self.txn.has_sender else None)
        await self._envelope(arg, "FROM:", replies.MAIL_SYNTAX, refusal, self.handler.mail)

    async def rcpt(self, arg: str) -> None:
        refusal = self.need_greeting() or (None if self.txn.has_sender else replies.NEED_MAIL)
        await self._envelope(arg, "TO:", replies.RCPT_SYNTAX, refusal, self.handler.rcpt)

    async def _envelope(self, arg: str, keyword: str, syntax: Reply, refusal: Reply | None,
                        decide: EnvelopeDecision) -> None:
        """MAIL and RCPT: command order first, then the path's syntax, then the handler."""
        path, params = split_path(arg, keyword)
        if refusal is not None or path is None:
            await self.reply(refusal or syntax)
            return
        await self.reply(await decide(self.session, self.txn, path, params))

    def _data_refusal(self) -> Reply | None:
        if not self.session.host_name:
            return replies.NEED_HELO
        if not self.txn.has_sender:
            return replies.NEED_RCPT
        if not self.txn.rcpt_tos:
            return replies.NO_VALID_RECIPIENTS
        return None

    async def data(self, arg: str) -> None:
        if arg:
            await self.reply(replies.ARGUMENT_NOT_ALLOWED)
            return
        refusal = self._data_refusal()
        if refusal is not None:
            await self.reply(refusal)
            return
        await self.send(str(replies.START_DATA))
        content = await self.read_data()
        await self._finish(content)

    async def bdat(self, arg: str) -> None:
        """RFC 3030: chunks of exact size; the same limits and policy as DATA once LAST arrives."""
        match = _BDAT.fullmatch(arg)
        if match is None:
            await self.reply(replies.BDAT_SYNTAX)
            return
        size, last = int(match.group(1)), match.group(2) is not None
        refusal = self._data_refusal()
        keep = refusal is None and self.chunks_size + size <= self.settings.message_size_limit
        chunk = await self.read_exactly(size, keep)  # consumed even when refused (RFC 3030 2)
        if refusal is not None:
            self.reset_transaction()
            await self.reply(refusal)
            return
        if self.chunks is None:
            self.chunks = bytearray()
        self.chunks += chunk
        self.chunks_size += size
        if not last:
            await self.send(str(replies.chunk_received(size)))
            return
        if self.chunks_size > self.settings.message_size_limit:
            content: bytearray | Reply = replies.MESSAGE_TOO_BIG
        else:
            content, self.chunks = self.line_ends(self.chunks), None
        await self._finish(content)

    async def _finish(self, content: bytearray | Reply) -> None:
        """The end of DATA or the last BDAT: one reply, then a fresh transaction."""
        if content in (replies.BARE_NEWLINE, replies.BARE_CARRIAGE_RETURN):
            assert isinstance(content, Reply)
            await self.hang_up(content)
        if isinstance(content, Reply):
            result = content
        else:
            result = await self.handler.data(self.session, self.txn, content)
        self.reset_transaction()
        await self.reply(result)

    async def rset(self, arg: str) -> None:
        self.reset_transaction()
        await self.reply(replies.OK)

    async def noop(self, arg: str) -> None:
        await self.reply(replies.OK)

    async def quit(self, arg: str) -> None:
        await self.hang_up(replies.BYE)

    async def vrfy(self, arg: str) -> None:
        await self.reply(replies.VRFY_DISABLED)

    async def auth(self, arg: str) -> None:
        await self.reply(replies.AUTH_NOT_ENABLED)

    async def etrn(self, arg: str) -> None:
        await self.reply(replies.ETRN_REFUSED.about(arg) if arg else replies.ETRN_REFUSED)

    async def starttls(self, arg: str) -> None:
        if self.tls is None or self.session.tls:
            await self.reply(replies.NOT_IMPLEMENTED)
            return
        if arg:
            await self.reply(replies.ARGUMENT_NOT_ALLOWED)
            return
        await self.send(str(replies.READY_FOR_TLS))
        await self.flush()
        self.buffer.clear()  # plaintext pipelined behind STARTTLS must not count (CVE-2011-0411)
        try:
            async with asyncio.timeout(self.settings.command_timeout):
                await self.wire.start_tls(self.tls)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as error:
            log.info("client %s: TLS handshake failed (%s)", self.session.client_ip,
                     type(error).__name__)
            raise _Closed() from None
        self.session.tls = True
        self.session.host_name = ""  # RFC 3207 4.2: forget what the client said before
        self.session.extended_smtp = False
        self.reset_transaction()


def split_path(arg: str, keyword: str) -> tuple[str | None, list[str]]:
    """``FROM:<path> PARAMS`` -> (path without brackets, params); (None, []) on bad syntax."""
    if arg[:len(keyword)].upper() != keyword:
        return None, []
    rest = arg[len(keyword):].strip()
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            return None, []
        return rest[1:end], rest[end + 1:].split()
    path, _, params = rest.partition(" ")
    return (path, params.split()) if path else (None, [])


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted strings."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1
