"""Outbound SMTP transactions, via aiosmtplib: one per next hop, on a cached session if any.

Results are per recipient (a ``Reply`` each: 250 accepted, 4xx deferred,
5xx failed), like aiosmtplib's own per-recipient errors.  A next hop that
cannot be reached, or that answers 4xx before any recipient was offered,
raises :class:`TryNextHop`: the caller (:mod:`.transactions`) goes on to the
next one, as Postfix's smtp(8) does.

Sessions come from a :class:`.connections.ConnectionCache`: after a
transaction that ended cleanly the session is kept (no QUIT), and the next
transaction to the same next hop sends RSET instead of connecting, EHLO and
STARTTLS again.  A cached session that turns out to be dead before anything
was sent is replaced by the next cached one or a new connection,
transparently.  STARTTLS is opportunistic (any certificate: the point is
privacy, not identity) and every session uses the one client
:class:`ssl.SSLContext` built with the :class:`ClientSettings`, never one
per connection.

To a next hop that offers PIPELINING (RFC 2920) the envelope is one write:
RSET (on a cached session), MAIL FROM, every RCPT TO and DATA, then the
replies are read in order -- one round trip instead of three or more per
message.  The results are those of the one-at-a-time exchange a next hop
without PIPELINING gets: a refused RCPT fails only its recipient, a refused
MAIL every recipient, and no content is sent unless a recipient was
accepted and DATA answered 354.  The RSET's reply is read first: a cached
session the next hop closed meanwhile shows there, before any content.
The replies are read by :class:`_ReplyReader`, not by aiosmtplib, whose
protocol loses replies that arrive together.

The final dot is written by :func:`send_data`, which sets
:attr:`Commit.past_dot` the moment it is: from then on the next hop may have
the message, so the caller never cancels that transaction (it awaits the
answer, bounded by the command timeout) -- cancelling it would make a retry
send the message a second time.

Nothing that goes wrong while offering a message escapes from here as an
exception other than :class:`TryNextHop`: an address that cannot be written
is a permanent failure before any connection, UTF-8 that the next hop
cannot carry is a permanent ``553 5.6.7``, 8-bit content that it cannot
carry a permanent ``554 5.6.3``.  Replies passed back from downstream name
the alias the sender used, never the private forwarding target.

What the sender declared travels on when the next hop offers the extension,
and is dropped otherwise (RFC 3461 4.1), per transaction (a reused session
keeps the extensions its EHLO offered): ``BODY`` (RFC 6152; ``8BITMIME`` is
also declared for undeclared 8-bit content), and the DSN parameters ``RET``
and ``ENVID`` on MAIL, ``NOTIFY`` and ``ORCPT`` on each RCPT.  8-bit content
is never sent to a hop without 8BITMIME: those recipients fail (no 7-bit
conversion; see :data:`EIGHT_BIT_UNSUPPORTED`).  A recipient that asked for
``NOTIFY=SUCCESS`` and is accepted by a hop without DSN gets
:data:`RELAYED_WITHOUT_DSN` instead of :data:`ACCEPTED`: the sender is owed a
"relayed" DSN (RFC 3461 6.2.1), which the caller sends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiosmtplib
import aiosmtplib.email
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

from ..addresses import is_sendable
from ..reply import Reply
from .base import MAX_ENVID, Message, conceal_destinations, is_xtext, orcpt_parts
from .connections import ConnectionCache, HopKey, Session
from .routing import NextHop

log = logging.getLogger(__name__)

ACCEPTED = Reply(250, "2.0.0", "Ok")
SMTPUTF8_UNSUPPORTED = Reply(553, "5.6.7",
                             "destination does not support SMTPUTF8, which this message needs")
UNWRITABLE_SENDER = Reply(553, "5.1.7", "sender address cannot be written in an SMTP command")
UNWRITABLE_RECIPIENT = Reply(553, "5.1.3",
                             "recipient address cannot be written in an SMTP command")
# RFC 3463 5.6.3, conversion required but not supported: we do not downgrade to 7 bits.
EIGHT_BIT_UNSUPPORTED = Reply(554, "5.6.3",
                              "next hop does not accept 8-bit data, which this message has")
# Accepted by a hop that cannot pass NOTIFY=SUCCESS on: the sender gets a "relayed" DSN.
RELAYED_WITHOUT_DSN = Reply(250, "2.0.0", "Ok: relayed to a next hop that does not offer DSN")


def client_tls_context() -> ssl.SSLContext:
    """The client side of opportunistic STARTTLS: nothing is verified, so no CA is loaded.

    Built once (loading the system's CA bundle took ~24 ms per connection)
    and shared by every outbound session.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class ClientSettings:
    helo: str
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    tls_context: ssl.SSLContext = field(default_factory=client_tls_context, compare=False,
                                        repr=False)


@dataclass
class Commit:
    """Where one transaction is: ``past_dot`` once the final dot has been written.

    For the log lines only (never told to the sender): ``relay`` is the next
    hop once it answered (``host[address]:port``; "" while none did) and
    ``answer`` its reply to the final dot as it gave it.
    """

    past_dot: bool = False
    relay: str = ""
    answer: str = ""


class TryNextHop(Exception):
    """This hop could not take the message (unreachable, 4xx before any recipient)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _StaleSession(Exception):
    """A cached session died before anything of this transaction was accepted."""


def downstream_reply(error: aiosmtplib.SMTPResponseException, destination: str,
                     message: Message) -> Reply:
    """The downstream's code, enhanced code and text, about the alias the sender used.

    The text is passed back to the sender, so the private target is replaced
    by its alias wherever the downstream echoed it, and the ``<alias>:``
    prefix is added only when the text does not already start with it.
    """
    status, _, text = error.message.partition(" ")
    if not (status[:1] in ("2", "4", "5") and status.count(".") == 2):
        status, text = ("5.0.0" if error.code >= 500 else "4.0.0"), error.message
    text = conceal_destinations(text, message.aliases)
    prefix = f"<{message.alias_of(destination)}>:"
    if not text.lower().startswith(prefix.lower()):
        text = f"{prefix} {text}"
    return Reply(error.code, status, text)


def relay_name(hop: NextHop) -> str:
    """Postfix's ``relay=`` value: ``host[address]:port``."""
    return f"{hop.host}[{hop.address}]:{hop.port}"


def failure_reason(error: BaseException) -> str:
    """Why a connection failed or was lost, in the words of the system (``Connection refused``,
    ``timed out``), else the exception's type: never the library's text, which may say more."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TimeoutError | aiosmtplib.SMTPTimeoutError):
            return "timed out"
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return type(error).__name__


def unreachable(hop: NextHop, why: str) -> Reply:
    return Reply(451, "4.4.1", f"connect to {hop.host}[{hop.address}]:{hop.port}: {why}")


@functools.lru_cache(maxsize=4096)
def writable(address: str) -> bool:
    """Whether ``address`` can go into our MAIL FROM or RCPT TO exactly as it is.

    Asked for every address of every message, and the answer depends on the
    address alone: remembered for the busy ones (aiosmtplib's parse is slow).

    It must be a plain mailbox (:func:`..addresses.is_sendable`), and
    aiosmtplib must write it unchanged: its parser drops comments and
    refuses whitespace that our address syntax lets through (U+00A0, ...).
    """
    if not is_sendable(address):
        return False
    try:
        return aiosmtplib.email.quote_address(address) == f"<{address}>"
    except ValueError:
        return False


def refuse_unwritable(message: Message, recipients: Sequence[str]) -> dict[str, Reply]:
    """Failures for addresses that cannot be written: no hop could take them, so no connection."""
    if not writable(message.sender):
        return {rcpt: UNWRITABLE_SENDER for rcpt in recipients}
    return {rcpt: UNWRITABLE_RECIPIENT.about(message.alias_of(rcpt))
            for rcpt in recipients if not writable(rcpt)}


class SmtpClient:
    """Transactions to next hops, on sessions from ``cache`` (none kept when it is None)."""

    def __init__(self, settings: ClientSettings, cache: ConnectionCache | None = None) -> None:
        self.settings = settings
        self.cache = cache if cache is not None else ConnectionCache(size=0)

    async def close(self) -> None:
        await self.cache.close()

    async def transaction(self, hop: NextHop, message: Message, recipients: Sequence[str],
                          commit: Commit) -> dict[str, Reply]:
        """Offer ``message`` to ``recipients`` at ``hop``: a reply each, or TryNextHop.

        Cached sessions come first; one found dead before any content was sent
        is closed and the next one tried, then a new session opened.
        """
        key = HopKey(hop.address, hop.port)
        while (session := await self.cache.take(key)) is not None:
            commit.relay = relay_name(hop)
            try:
                return await self._use(session, hop, message, recipients, commit)
            except _StaleSession:
                commit.relay = ""
                log.debug("%s: cached session to %s:%d was closed: reconnecting",
                          message.queue_id, hop.address, hop.port)
        try:
            session = await self._open(hop, key)
        except aiosmtplib.SMTPResponseException as e:  # it answered: refused us
            commit.relay = relay_name(hop)
            return _refused(e, hop, message, recipients)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            raise TryNextHop(unreachable(hop, failure_reason(e))) from e
        commit.relay = relay_name(hop)
        try:
            return await self._use(session, hop, message, recipients, commit)
        except _StaleSession as e:  # only for reused sessions: this one is new
            raise AssertionError("a new session cannot be stale") from e

    async def _open(self, hop: NextHop, key: HopKey) -> Session:
        """Connect, EHLO, opportunistic STARTTLS (with the shared context), EHLO again."""
        s = self.settings
        client = aiosmtplib.SMTP(hostname=hop.address, port=hop.port, local_hostname=s.helo,
                                 timeout=s.command_timeout, start_tls=False, use_tls=False,
                                 validate_certs=False, tls_context=s.tls_context)
        try:
            await client.connect(timeout=s.connect_timeout)
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls(server_hostname=hop.host, tls_context=s.tls_context)
                await client.ehlo()
        except BaseException:
            client.close()
            raise
        self.cache.opened += 1
        return Session(client, key, asyncio.get_running_loop().time())

    async def _use(self, session: Session, hop: NextHop, message: Message,
                   recipients: Sequence[str], commit: Commit) -> dict[str, Reply]:
        """One transaction on ``session``; the session is kept (cache) or closed after it."""
        client = session.client
        keep = False
        try:
            refusal = _refuse_before_mail(client, message)
            if refusal is not None:
                results = {rcpt: refusal for rcpt in recipients}
            else:
                results = _refuse_utf8_recipients(client, message, recipients)
                offered = [rcpt for rcpt in recipients if rcpt not in results]
                if offered:
                    results.update(await self._envelope_and_data(session, hop, message, offered,
                                                                 commit))
            keep = True
            return results
        except aiosmtplib.SMTPResponseException as e:
            if session.reused and e.code == 421:
                raise _StaleSession() from e
            keep = e.code != 421
            return _refused(e, hop, message, recipients)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
            if session.reused:
                raise _StaleSession() from e
            raise TryNextHop(unreachable(hop, failure_reason(e))) from e
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            raise TryNextHop(unreachable(hop, failure_reason(e))) from e
        finally:
            if keep:
                session.transactions += 1
                self.cache.put(session)
            else:
                session.client.close()

    async def _envelope_and_data(self, session: Session, hop: NextHop, message: Message,
                                 recipients: Sequence[str], commit: Commit) -> dict[str, Reply]:
        """MAIL, RCPT and DATA (pipelined when the next hop offers it), then the content
        if any recipient was accepted: a reply per recipient."""
        client = session.client
        utf8 = needs_smtputf8(message) or not all(rcpt.isascii() for rcpt in recipients)
        commands = envelope_commands(client, message, recipients, utf8)
        ready: SMTPResponse | None = None  # the reply to DATA, once it was sent
        if client.supports_extension("pipelining"):
            results, ready = await self._pipelined_envelope(session, message, recipients,
                                                            commands)
        else:
            results = await _envelope(client, message, recipients, commands)
        accepted = [rcpt for rcpt, reply in results.items() if reply is ACCEPTED]
        if not accepted:
            return results
        timeout = self.settings.command_timeout
        try:
            if ready is None:
                await send_data(client, message.content, commit, timeout)
            else:
                await send_content(client, ready, message.content, commit, timeout)
        except aiosmtplib.SMTPResponseException as e:
            results.update({rcpt: downstream_reply(e, rcpt, message) for rcpt in accepted})
            return results
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            # The outcome is unknown: deferring may deliver twice, but never loses mail.
            client.close()
            results.update({rcpt: unreachable(hop, f"lost during DATA ({failure_reason(e)})")
                            for rcpt in accepted})
            return results
        if not client.supports_extension("dsn"):
            results.update({rcpt: RELAYED_WITHOUT_DSN for rcpt in accepted
                            if message.dsn_of(rcpt).notifies("SUCCESS")})
        return results

    async def _pipelined_envelope(self, session: Session, message: Message,
                                  recipients: Sequence[str], commands: Sequence[bytes]
                                  ) -> tuple[dict[str, Reply], SMTPResponse]:
        """RSET (on a cached session), MAIL, every RCPT and DATA in one write, then their
        replies in order: a reply per recipient, and the reply to DATA.

        A refused MAIL raises SMTPSenderRefused once the other replies were
        read, as aiosmtplib's ``mail()`` does.  A next hop that answers 354
        although nothing is to be sent is left by closing the session: without
        the final dot nothing is delivered.
        """
        client = session.client
        timeout = self.settings.command_timeout
        reset = [b"RSET"] if session.unchecked else []
        with _pipelined(client, [*reset, *commands, b"DATA"]) as reader:
            if session.unchecked:
                await self._check_reset(session, reader)
            mail = await reader.read(timeout)
            if mail.code != 250:
                await reader.discard(len(recipients) + 1, timeout)
                raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, message.sender)
            rcpt_replies = [await reader.read(timeout) for _ in recipients]
            ready = await reader.read(timeout)
        results = {rcpt: _rcpt_reply(reply, rcpt, message)
                   for rcpt, reply in zip(recipients, rcpt_replies, strict=True)}
        if ready.code == 354 and not any(reply is ACCEPTED for reply in results.values()):
            client.close()
        return results, ready

    async def _check_reset(self, session: Session, reader: _ReplyReader) -> None:
        """The reply to the RSET pipelined on a cached session; _StaleSession unless it is 250.

        A session the next hop closed while it was idle (its timeout, a
        restart) shows here, before any content was sent: the transaction can
        go again on another session.
        """
        try:
            reply = await reader.read(self.cache.rset_timeout)
        except aiosmtplib.SMTPException as e:
            raise _StaleSession() from e
        if reply.code != 250:
            raise _StaleSession()
        self.cache.checked(session)


async def _envelope(client: aiosmtplib.SMTP, message: Message, recipients: Sequence[str],
                    commands: Sequence[bytes]) -> dict[str, Reply]:
    """MAIL, then each RCPT, a round trip each: for a next hop without PIPELINING.

    A refused MAIL raises SMTPSenderRefused, as aiosmtplib's ``mail()`` does.
    """
    mail, *rcpts = commands
    response = await client.execute_command(mail)
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, message.sender)
    results: dict[str, Reply] = {}
    for rcpt, command in zip(recipients, rcpts, strict=True):
        results[rcpt] = _rcpt_reply(await client.execute_command(command), rcpt, message)
    return results


def _rcpt_reply(response: SMTPResponse, rcpt: str, message: Message) -> Reply:
    """ACCEPTED for 250 or 251 (what aiosmtplib's ``rcpt()`` takes), else the refusal."""
    if response.code in (250, 251):
        return ACCEPTED
    refusal = aiosmtplib.SMTPRecipientRefused(response.code, response.message, rcpt)
    return downstream_reply(refusal, rcpt, message)


_CONTROL_CHARACTERS = re.compile(rb"[\x00-\x1f\x7f]")


def envelope_commands(client: aiosmtplib.SMTP, message: Message, recipients: Sequence[str],
                      utf8: bool) -> list[bytes]:
    """MAIL FROM, then a RCPT TO per recipient, with their parameters (no CRLF).

    Written here, not by aiosmtplib's ``mail()`` and ``rcpt()``, which parse
    every address again: ours passed :func:`writable`, so ``<address>`` is
    exactly what aiosmtplib would write.  Addresses are UTF-8 under SMTPUTF8,
    else ASCII; parameters are ASCII.
    """
    encoding = "utf-8" if utf8 else "ascii"
    commands = [_command(b"MAIL FROM:", message.sender, mail_options(client, message, utf8),
                         encoding)]
    commands += [_command(b"RCPT TO:", rcpt, rcpt_options(client, message, rcpt), encoding)
                 for rcpt in recipients]
    return commands


def _command(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    """One command line; ValueError for a control character, as aiosmtplib raises it: a
    pipelined CR or LF would smuggle in a command of its own."""
    line = b" ".join([verb + b"<" + address.encode(encoding) + b">",
                      *(option.encode("ascii") for option in options)])
    if _CONTROL_CHARACTERS.search(line):
        raise ValueError("command contains a control character")
    return line


_MAX_REPLY = 32768  # bytes of one reply, continuation lines included (aiosmtplib's bound)


class _ReplyReader(asyncio.Protocol):
    """The replies to pipelined commands, in order, however the next hop groups them.

    aiosmtplib's protocol expects one reply per command it wrote: it parses
    one reply per arrival of data and drops what arrives while no command
    waits, so the replies a pipelining server sends together (RFC 2920 asks
    it to) would be lost.  :func:`_pipelined` puts this reader on the
    transport while those replies come; aiosmtplib's protocol gets it back
    for everything else.  It counts what it read, so that a session left
    with replies unread (a failure, a cancellation) is never reused.
    """

    def __init__(self, owner: SMTPProtocol, expected: int) -> None:
        self.owner = owner  # aiosmtplib's protocol: flow control goes on to it
        self.expected = expected  # replies owed: one per command written
        self.answered = 0
        self.unusable = False  # a 421 was read, or a 354 left waiting for content
        self.ended = False  # EOF or connection lost
        self.lost = False  # connection_lost was called here: aiosmtplib's protocol missed it
        self.error: Exception | None = None  # and its argument
        self._buffer = bytearray()
        self._arrived = asyncio.Event()

    @property
    def in_step(self) -> bool:
        """Every reply read and nothing else pending: the session can go on."""
        return self.answered == self.expected and not self._buffer and not self.unusable

    async def read(self, timeout: float) -> SMTPResponse:
        """The next reply; raises what aiosmtplib raises: SMTPServerDisconnected,
        SMTPReadTimeoutError, SMTPResponseException (code -1) for a malformed reply."""
        try:
            async with asyncio.timeout(timeout):
                while (reply := self._parse()) is None:
                    if self.ended:
                        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError as e:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from e
        self.answered += 1
        if reply.code == 421:  # the next hop is closing the session (aiosmtplib closes it too)
            self.unusable = True
        return reply

    async def discard(self, count: int, timeout: float) -> None:
        """Read ``count`` replies that no longer matter, only to keep the session in step.

        One that fails ends the reading (the session is then closed); a 354
        leaves the next hop waiting for content, so the session is not reused.
        """
        for _ in range(count):
            try:
                reply = await self.read(timeout)
            except aiosmtplib.SMTPException:
                return
            self.unusable = self.unusable or reply.code == 354

    def hand_back(self) -> None:
        """Tell aiosmtplib's protocol of a connection lost while this reader had it."""
        if self.lost:
            self.owner.connection_lost(self.error)

    def _parse(self) -> SMTPResponse | None:
        """The reply at the front of the buffer, its lines' texts joined by newlines (as
        aiosmtplib words it); None while it has not all arrived."""
        texts: list[bytes] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start:end + 1])
            start = end + 1
            if not line[:3].isdigit():
                raise aiosmtplib.SMTPResponseException(
                    -1, "Malformed SMTP response line: " + line.decode("utf-8", "ignore").strip())
            texts.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:start]
                return SMTPResponse(int(line[:3]), b"\n".join(texts).decode("utf-8",
                                                                          "surrogateescape"))
        if len(self._buffer) > _MAX_REPLY:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        return None

    # --- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        self._arrived.set()

    def eof_received(self) -> bool:
        self.ended = True
        self._arrived.set()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = self.lost = True
        self.error = exc
        self._arrived.set()

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


@contextmanager
def _pipelined(client: aiosmtplib.SMTP, commands: Sequence[bytes]) -> Iterator[_ReplyReader]:
    """Write ``commands`` in one go; their replies are read from the reader yielded.

    aiosmtplib's protocol is given the transport back at the end, and the
    session is closed unless every reply was read and the next hop is not
    closing it (see :attr:`_ReplyReader.in_step`).
    """
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    reader = _ReplyReader(protocol, len(commands))
    transport.set_protocol(reader)
    try:
        protocol.write(b"".join(command + b"\r\n" for command in commands))
        yield reader
    finally:
        transport.set_protocol(protocol)
        reader.hand_back()
        if not reader.in_step:
            client.close()


def _refused(error: aiosmtplib.SMTPResponseException, hop: NextHop, message: Message,
             recipients: Sequence[str]) -> dict[str, Reply]:
    """A 5xx to the session or the sender fails everyone; a 4xx raises TryNextHop."""
    if error.code >= 500:
        return {rcpt: downstream_reply(error, rcpt, message) for rcpt in recipients}
    said = conceal_destinations(error.message, message.aliases)
    raise TryNextHop(Reply(error.code, "4.4.2", f"{hop.host}[{hop.address}] said: {said}")) from error


_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")


def data_payload(content: bytes | bytearray) -> bytes:
    """The DATA stream for ``content``: CRLF lines, leading dots doubled, the final dot.

    Content from our own engine already has CRLF line ends: then this is a
    couple of C-speed passes, not a regular expression over every line.
    """
    data = bytes(content)
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


async def send_data(client: aiosmtplib.SMTP, content: bytes | bytearray, commit: Commit,
                    timeout: float) -> None:
    """DATA, the content and the final dot: :func:`send_content` after a DATA of its own."""
    await send_content(client, await client.execute_command(b"DATA"), content, commit, timeout)


async def send_content(client: aiosmtplib.SMTP, ready: SMTPResponse, content: bytes | bytearray,
                       commit: Commit, timeout: float) -> None:
    """The content and the final dot once DATA was answered ``ready``, whether it was sent
    alone or pipelined; ``commit.past_dot`` is set once the dot is written.

    Raises SMTPDataError for any answer but 354 / 250, and aiosmtplib's
    disconnect and timeout errors (the session is then closed).
    """
    if ready.code != 354:
        raise aiosmtplib.SMTPDataError(ready.code, ready.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    protocol.write(data_payload(content))
    commit.past_dot = True
    try:
        response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code != 250:
        if response.code == 421:
            client.close()
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    commit.answer = f"{response.code} {response.message}"


def needs_smtputf8(message: Message) -> bool:
    """The whole transaction needs SMTPUTF8: the client declared it, or the sender is UTF-8."""
    return message.smtputf8 or not message.sender.isascii()


def has_8bit_content(message: Message) -> bool:
    """Any byte above 0x7F, in the body or (undeclared UTF-8) the header."""
    return not message.content.isascii()


def _refuse_before_mail(client: aiosmtplib.SMTP, message: Message) -> Reply | None:
    if needs_smtputf8(message) and not client.supports_extension("smtputf8"):
        return SMTPUTF8_UNSUPPORTED
    if has_8bit_content(message) and not client.supports_extension("8bitmime"):
        return EIGHT_BIT_UNSUPPORTED
    limit = client.esmtp_extensions.get("size", "")  # the next hop's text: "²" is a digit too
    if limit.isascii() and limit.isdigit() and int(limit) and len(message.content) > int(limit):
        return Reply(552, "5.3.4", f"message is larger than the destination accepts ({limit} bytes)")
    return None


def _refuse_utf8_recipients(client: aiosmtplib.SMTP, message: Message,
                            recipients: Sequence[str]) -> dict[str, Reply]:
    """UTF-8 destinations a hop without SMTPUTF8 cannot be given: never raw, undeclared UTF-8.

    Only those fail; ASCII destinations of the same domain still get the message.
    """
    if client.supports_extension("smtputf8"):
        return {}
    return {rcpt: SMTPUTF8_UNSUPPORTED.about(message.alias_of(rcpt))
            for rcpt in recipients if not rcpt.isascii()}


def mail_options(client: aiosmtplib.SMTP, message: Message, utf8: bool) -> list[str]:
    """MAIL FROM's parameters: what the message needs and the next hop offers."""
    options = ["SMTPUTF8"] if utf8 else []
    if client.supports_extension("8bitmime"):
        if message.body == "8BITMIME" or has_8bit_content(message):
            options.append("BODY=8BITMIME")
        elif message.body == "7BIT":
            options.append("BODY=7BIT")
    if client.supports_extension("size"):
        options.append(f"SIZE={len(message.content)}")
    if client.supports_extension("dsn"):
        if message.dsn_ret in ("FULL", "HDRS"):
            options.append(f"RET={message.dsn_ret}")
        envid = message.dsn_envid
        if 0 < len(envid) <= MAX_ENVID and is_xtext(envid):
            options.append(f"ENVID={envid}")
    return options


def rcpt_options(client: aiosmtplib.SMTP, message: Message, destination: str) -> list[str]:
    """RCPT TO's DSN parameters: those of the RCPT that gave ``destination``, if the hop takes them.

    Values are checked again (they may come from a spool file) so that
    nothing but xtext is ever written into the command.
    """
    if not client.supports_extension("dsn"):
        return []
    dsn = message.dsn_of(destination)
    options: list[str] = []
    if dsn.notify and _valid_notify(dsn.notify):
        options.append(f"NOTIFY={dsn.notify}")
    if orcpt_parts(dsn.orcpt) is not None:
        options.append(f"ORCPT={dsn.orcpt}")
    return options


def _valid_notify(notify: str) -> bool:
    words = notify.split(",")
    return notify == "NEVER" or (len(set(words)) == len(words)
                                 and set(words) <= {"SUCCESS", "FAILURE", "DELAY"})
