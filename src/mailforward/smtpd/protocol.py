"""The SMTP protocol engine: aiosmtpd's connection machinery, Postfix's manners.

aiosmtpd gives us the asyncio protocol, timeouts and the STARTTLS upgrade.
This subclass replaces its command loop and command parsers so that:

* every reply is a Postfix-style reply with an enhanced status code
  (``replies``), and there is no AUTH, EXPN, HELP or VRFY;
* only ``<CRLF>.<CRLF>`` ends DATA, so no SMTP smuggling; a bare LF or bare
  CR is either normalised to CRLF (``[server] forbid_bare_newline = "normalize"``,
  Postfix's ``smtpd_forbid_bare_newline = normalize``) or answered with 521
  and a hang-up (``"reject"``).  Either way the message handed on has CRLF
  line ends only, so every later reader -- our verifier, the signer, the next
  hop, the recipient's MUA -- sees the same lines (bytes verified = bytes
  signed = bytes sent);
* data lines of any length are kept intact (up to the message size limit);
* a session is closed after ``hard_error_limit`` errors, and on timeout with
  421, as Postfix does.

Policy is not decided here: syntax is checked, then the handler is asked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from ..addresses import Address
from . import replies
from .replies import Reply

if TYPE_CHECKING:
    from .handler import SmtpHandler

log = logging.getLogger(__name__)

MAX_COMMAND_LINE = 2048  # Postfix's line_length_limit; RFC 5321 requires at least 512

NORMALIZE = "normalize"
REJECT = "reject"
BARE_NEWLINE_POLICIES = (NORMALIZE, REJECT)

_LINE_END = re.compile(rb"\r\n|\r|\n")


def normalize_line_ends(data: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF (RFC 5322 2.3 allows no other line end)."""
    return _LINE_END.sub(b"\r\n", data)


class ClientSession(Session):  # type: ignore[misc]
    """aiosmtpd's Session plus what policy needs to know about the client."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.client_ip = ""
        self.local_ip = ""
        self.in_mynetworks = False
        self.errors = 0
        self.admitted = False


class Transaction(Envelope):  # type: ignore[misc]
    """aiosmtpd's Envelope plus the parsed sender and the expanded destinations."""

    def __init__(self) -> None:
        super().__init__()
        self.sender: Address | None = None
        self.has_sender = False
        self.destinations: list[str] = []
        self.aliases: dict[str, str] = {}  # destination -> the RCPT address that led to it
        self.forward_sender = ""  # the envelope sender to forward with (SRS), fixed at MAIL
        self.rcpt_attempts = 0


class SmtpProtocol(SMTP):  # type: ignore[misc]
    line_length_limit = MAX_COMMAND_LINE

    def __init__(self, handler: SmtpHandler, *, hostname: str, message_size_limit: int,
                 timeout: float, hard_error_limit: int,
                 tls_context: ssl.SSLContext | None = None,
                 bare_newline: str = NORMALIZE) -> None:
        super().__init__(handler, data_size_limit=message_size_limit, enable_SMTPUTF8=True,
                         decode_data=False, hostname=hostname, ident="ESMTP",
                         tls_context=tls_context, timeout=timeout)
        self.handler = handler
        self.hard_error_limit = hard_error_limit
        self.normalize_bare_newlines = bare_newline == NORMALIZE
        self._commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "HELO": self.smtp_HELO, "EHLO": self.smtp_EHLO, "MAIL": self.smtp_MAIL,
            "RCPT": self.smtp_RCPT, "DATA": self.smtp_DATA, "RSET": self.smtp_RSET,
            "NOOP": self.smtp_NOOP, "QUIT": self.smtp_QUIT, "VRFY": self.smtp_VRFY,
            "STARTTLS": self.smtp_STARTTLS, "AUTH": self.smtp_AUTH, "ETRN": self.smtp_ETRN,
        }

    def _create_session(self) -> ClientSession:
        session = ClientSession(self.loop)
        if self.session is not None:  # after STARTTLS: same client, state reset (RFC 3207)
            for name in ("client_ip", "local_ip", "in_mynetworks", "errors", "admitted"):
                setattr(session, name, getattr(self.session, name))
        return session

    def _create_envelope(self) -> Transaction:
        return Transaction()

    # ------------------------------------------------------------ plumbing

    async def reply(self, reply: Reply | str) -> None:
        """Send a reply; count errors and hang up at the hard error limit."""
        await self.push(str(reply))
        if isinstance(reply, Reply) and reply.code >= 400 and reply.code != 421:
            self.session.errors += 1
            if self.session.errors >= self.hard_error_limit:
                await self.hang_up(replies.too_many_errors(self.hostname))

    async def hang_up(self, reply: Reply) -> None:
        await self.push(str(reply))
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is not None:
            self._writer.write(f"{replies.timeout_exceeded(self.hostname)}\r\n".encode())
        super()._timeout_cb()

    def connection_lost(self, error: Exception | None) -> None:
        if self.session is not None and self.session.admitted:
            self.session.admitted = False
            self.handler.client_disconnected(self.session)
        super().connection_lost(error)

    async def handle_exception(self, error: Exception) -> str:
        """An internal error is a 451 with no internal text; the details go to the log."""
        log.error("client %s: internal error", self.session.client_ip, exc_info=error)
        return str(replies.reply_for_error(error))

    # ------------------------------------------------------------ command loop

    async def _handle_client(self) -> None:
        refusal = self.handler.client_connected(self.session, self.transport)
        if refusal is not None:
            await self.hang_up(refusal)
            return
        await self.push(f"220 {self.hostname} ESMTP")
        while self.transport is not None:
            try:
                line = await self._read_command()
                if line is None:
                    continue
                if line.endswith(b"\r\n"):
                    await self._dispatch(line[:-2])
                elif self.normalize_bare_newlines:
                    await self._dispatch(line[:-1])
                else:
                    await self.hang_up(replies.BARE_NEWLINE)
                    return
            except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
                self._writer.close()
                return
            except TLSSetupException:
                self.transport.close()
                return
            except Exception as error:
                await self.handle_exception(error)
                await self.reply(replies.reply_for_error(error))

    async def _read_command(self) -> bytes | None:
        try:
            return bytes(await self._reader.readuntil(b"\n"))
        except asyncio.LimitOverrunError:
            await self._discard_line()
            await self.reply(replies.LINE_TOO_LONG)
            return None

    async def _discard_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.readexactly(e.consumed)

    async def _dispatch(self, line: bytes) -> None:
        if b"\r" in line or b"\0" in line or not line.strip():
            await self.reply(replies.BAD_SYNTAX)
            return
        verb, _, arg_bytes = line.strip().partition(b" ")
        try:
            command = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            command = ""
        method = self._commands.get(command)
        if method is None:
            await self.reply(replies.UNRECOGNIZED)
            return
        self._reset_timeout()
        await method(arg_bytes.strip().decode("utf-8", errors="surrogateescape"))

    # ------------------------------------------------------------ commands

    async def smtp_HELO(self, arg: str) -> None:
        await self._greet(arg, extended=False)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._greet(arg, extended=True)

    async def _greet(self, hostname: str, extended: bool) -> None:
        if not hostname or " " in hostname:
            await self.reply(replies.EHLO_SYNTAX if extended else replies.HELO_SYNTAX)
            return
        self._set_rset_state()
        self.session.host_name = hostname
        self.session.extended_smtp = extended
        if not extended:
            await self.push(f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit}"]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        for line in lines[:-1]:
            await self.push(f"250-{line}")
        await self.push(f"250 {lines[-1]}")

    async def smtp_MAIL(self, arg: str) -> None:
        if not self.session.host_name:
            await self.reply(replies.NEED_HELO)
            return
        if self.envelope.has_sender:
            await self.reply(replies.NESTED_MAIL)
            return
        path, params = _split_path(arg, "FROM:")
        if path is None or params is None:
            await self.reply(replies.MAIL_SYNTAX)
            return
        await self.reply(await self.handler.handle_MAIL(self, self.session, self.envelope, path, params))

    async def smtp_RCPT(self, arg: str) -> None:
        if not self.session.host_name:
            await self.reply(replies.NEED_HELO)
            return
        if not self.envelope.has_sender:
            await self.reply(replies.NEED_MAIL)
            return
        path, params = _split_path(arg, "TO:")
        if path is None or params is None:
            await self.reply(replies.RCPT_SYNTAX)
            return
        if params:
            await self.reply(replies.BAD_PARAMETER)
            return
        await self.reply(await self.handler.handle_RCPT(self, self.session, self.envelope, path))

    async def smtp_DATA(self, arg: str) -> None:
        if not self.session.host_name:
            await self.reply(replies.NEED_HELO)
            return
        if arg:
            await self.reply(replies.ARGUMENT_NOT_ALLOWED)
            return
        if not self.envelope.has_sender:
            await self.reply(replies.NEED_RCPT)
            return
        if not self.envelope.rcpt_tos:
            await self.reply(replies.NO_VALID_RECIPIENTS)
            return
        await self.push(str(replies.START_DATA))
        content = await self._read_data()
        if content in (replies.BARE_NEWLINE, replies.BARE_CARRIAGE_RETURN):
            assert isinstance(content, Reply)
            await self.hang_up(content)
            return
        if isinstance(content, Reply):
            result = content
        else:
            result = await self.handler.handle_DATA(self, self.session, self.envelope, content)
        self._set_post_data_state()
        await self.reply(result)

    async def _read_data(self) -> bytes | Reply:
        """Read until ``<CRLF>.<CRLF>``; a bare LF or CR ends nothing.

        Bare line ends are normalised to CRLF once the data is complete (after
        dot-unstuffing, which works on the lines as the client framed them),
        or refused in ``reject`` mode.

        A line longer than the reader's buffer arrives in pieces; each byte
        is counted once against the size limit, and a long line's pieces are
        dropped (all but the last byte, for the CRLF check) once over it.
        Only a whole ``.<CRLF>`` line ends the data.
        """
        limit = self.data_size_limit
        lines: list[bytes] = []
        size = 0
        head = b""  # the pieces of a long line read so far
        continued = False
        while True:
            try:
                piece = bytes(await self._reader.readuntil(b"\n"))
            except asyncio.LimitOverrunError as e:
                chunk = bytes(await self._reader.readexactly(e.consumed))
                size += len(chunk)
                head = head + chunk if size <= limit else chunk[-1:]
                continued = True
                continue
            self._reset_timeout()
            line, head = head + piece, b""
            if line == b".\r\n" and not continued:
                break
            if not self.normalize_bare_newlines:
                if not line.endswith(b"\r\n"):
                    return replies.BARE_NEWLINE
                if b"\r" in line[:-2]:
                    return replies.BARE_CARRIAGE_RETURN
            continued = False
            size += len(piece)
            if size <= limit:
                lines.append(line[1:] if line.startswith(b".") else line)
            else:
                lines.clear()
        if size > limit:
            return replies.MESSAGE_TOO_BIG
        return normalize_line_ends(b"".join(lines))

    async def smtp_RSET(self, arg: str) -> None:
        self._set_rset_state()
        await self.reply(replies.OK)

    async def smtp_NOOP(self, arg: str) -> None:
        await self.reply(replies.OK)

    async def smtp_QUIT(self, arg: str) -> None:
        await self.push(str(replies.BYE))
        if self.transport is not None:
            self.transport.close()

    async def smtp_VRFY(self, arg: str) -> None:
        await self.reply(replies.VRFY_DISABLED)

    async def smtp_AUTH(self, arg: str) -> None:
        await self.reply(replies.AUTH_NOT_ENABLED)

    async def smtp_ETRN(self, arg: str) -> None:
        await self.reply(replies.ETRN_REFUSED.about(arg) if arg else replies.ETRN_REFUSED)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_context is None or self._tls_protocol is not None:
            await self.reply(replies.NOT_IMPLEMENTED)
            return
        if arg:
            await self.reply(replies.ARGUMENT_NOT_ALLOWED)
            return
        await self.push(str(replies.READY_FOR_TLS))
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter,
                                                  server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error


def _split_path(arg: str, keyword: str) -> tuple[str | None, list[str] | None]:
    """``FROM:<path> PARAMS`` -> (path without brackets, params); (None, None) on bad syntax."""
    if arg[: len(keyword)].upper() != keyword:
        return None, None
    rest = arg[len(keyword):].strip()
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            return None, None
        return rest[1:end], rest[end + 1:].split()
    path, _, params = rest.partition(" ")
    return (path, params.split()) if path else (None, None)


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

