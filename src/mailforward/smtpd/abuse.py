"""Abuse control for the SMTP handler: bans, rate limits and duplicate suppression.

The handler calls one method per phase; each returns ``None`` (go on) or
the refusal to send, which the handler logs and counts like any other
(``_refused``, by stage and the reply's reason name):

=============  =================================================================
phase          checks, in order
=============  =================================================================
connect        client banned (``554 5.7.1``, then the connection is closed)
MAIL           sender banned (``554 5.7.1``); client message rate
               (``450 4.7.1 Error: too much mail from IP``, Postfix's
               ``smtpd_client_message_rate_limit``); sender message rate
               (``450 4.7.1``)
RCPT           alias banned (``554 5.7.1``); client recipient rate (``450
               4.7.1 Error: too many recipients from IP``, Postfix's
               ``smtpd_client_recipient_rate_limit``); alias message rate
               (``452 4.7.1``: this recipient later, the others now)
end of DATA    duplicate suppression: asked at once (:meth:`AbuseChecks.ask_duplicates`),
               answered right before delivery (:meth:`AbuseChecks.deliver_once`)
=============  =================================================================

Rates are counted like Postfix's anvil counts them: at the command, before
the command's other checks (a MAIL or RCPT refused for another reason has
still used its place).  The windows of one command are admitted together
(``state.Store.admit``): when the sender's window is full the client's
event is not counted either.  Clients in ``mynetworks`` are exempt from
the rates; bans and duplicate suppression apply to every client.

Bans come from the lookup database (``tables/bans.py``), read whole every
``[limits] ban_cache_ttl`` seconds in the background and matched in memory,
so the checks never wait for the database.  Counters and the duplicate
cache are in the store (``state/``); when it cannot answer,
``[limits] redis_failure`` decides: ``fail_open`` lets the command through
(logged once per outage, counted always), ``fail_closed`` answers
``451 4.3.0``.  Never a 5xx, and never longer than ``redis_timeout``.

**Duplicates.**  A sender whose connection broke after our 250 (a timeout,
a restart, a crash) sends the message again.  Each destination the message
was delivered to (or safely spooled for) is remembered for
``[limits] duplicate_window`` seconds under a key made of the Message-ID,
a SHA-256 of the body and the destination.  A retry whose every
destination is remembered is answered ``250`` and not forwarded again; one
with new destinations (the alias changed meanwhile) is forwarded to those
only.  A message without a Message-ID is never suppressed: two messages
without one and with the same body may be different messages.  Only a
delivery the client is told succeeded (our 250) is remembered, never one
that failed or was deferred (nothing of it was delivered then).

The cache is asked as soon as the message is complete, before our own work on
it (trace field, From policy, verification, DKIM signing, ARC sealing), and its
answer awaited right before delivery: the round trip to Redis overlaps that
work.  (With workers and no Redis there is none to overlap: the cache is a
table in memory the workers share, ``state/duplicates.py``.)  The key does
not change meanwhile: it reads only the first Message-ID field and the body,
and that work only adds fields above the header (and removes forged
Authentication-Results fields).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import socket
import time
from collections.abc import Callable, Sequence

from ..addresses import Address, parse_mailbox, strip_source_route
from ..aliases import alias_keys
from ..config import LimitsSettings, Settings
from ..delivery.base import Delivery, Message
from ..errors import AddressError, TemporaryLookupError
from ..headerfields import field_values, header_block
from ..ops.logs import client_name
from ..ops.metrics import count_ban_match, count_duplicates, count_store_error
from ..state import Store, StoreUnavailable, Window, open_store
from ..state.duplicates import SharedDuplicateTable, TableBackedStore
from ..state.shared import SocketStore
from ..tables.bans import Ban, BanReader, BanSet
from . import replies
from .replies import Reply
from .session import ClientSession

log = logging.getLogger("mailforward.smtpd.abuse")

__all__ = ["AbuseChecks", "BanCache", "DuplicateQuestion", "abuse_from_settings",
           "duplicate_keys"]

BAN_LOAD_TIMEOUT = 10.0  # seconds for one reading of the ban table
HASH_IN_THREAD = 256 * 1024  # bodies larger than this are hashed off the event loop


class BanCache:
    """The bans in force, read again every ``ttl`` seconds; the last good list stays in use
    while the database cannot answer."""

    def __init__(self, reader: BanReader | None, ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.reader = reader
        self.ttl = ttl
        self.clock = clock
        self.current = BanSet()
        self.loaded = False  # read once at least
        self._failing = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def refresh(self) -> bool:
        if self.reader is None:
            return False
        try:
            async with asyncio.timeout(BAN_LOAD_TIMEOUT):
                bans = await self.reader.load(self.clock())
        except (TemporaryLookupError, TimeoutError) as error:
            why = str(error) or "timed out"
            if why != self._failing:  # once per outage, not once per ttl
                log.warning("bans: cannot read the ban table (%s); %s", why,
                            f"keeping the {len(self.current)} bans read before" if self.loaded
                            else "no bans in force until it can be read "
                                 "(run 'mailforward db init' if the table is missing)")
            self._failing = why
            return False
        if self._failing:
            log.info("bans: the ban table can be read again (%d bans)", len(bans))
            self._failing = ""
        self.current = BanSet(bans)
        self.loaded = True
        return True

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl)
            try:
                await self.refresh()
            except Exception as error:  # a bug must not stop the refreshing
                log.error("bans: refresh failed", exc_info=error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.reader is not None:
            await self.reader.close()


class AbuseChecks:
    def __init__(self, limits: LimitsSettings, store: Store, bans: BanCache | None = None, *,
                 delimiter: str = "", clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.store = store
        self.bans = bans if bans is not None else BanCache(None, limits.ban_cache_ttl, clock)
        self.delimiter = delimiter
        self.clock = clock
        self._store_down = False

    async def start(self) -> None:
        await self.bans.start()

    async def close(self) -> None:
        await self.bans.close()
        await self.store.close()

    # ------------------------------------------------------------ connect

    def connected(self, session: ClientSession) -> Reply | None:
        """A banned client is refused before the greeting."""
        ban = self.bans.current.client(session.client_ip, self.clock())
        if ban is None:
            return None
        self._log_ban(ban, session, client_name(session.client_ip))
        return replies.banned_client(session.client_ip)

    # ------------------------------------------------------------ MAIL

    async def mail(self, session: ClientSession, path: str) -> Reply | None:
        sender = _mailbox(path)
        if sender is not None:
            ban = self.bans.current.address("sender", [sender.key], sender.domain, self.clock())
            if ban is not None:
                self._log_ban(ban, session, f"<{sender.key}>")
                return replies.BANNED_SENDER.about(sender.as_written)
        if session.in_mynetworks:
            return None
        limits = self.limits
        windows: list[tuple[Window, Reply]] = []
        if limits.client_message_rate_limit:
            windows.append((Window(f"rate:client-mail:{session.client_ip}",
                                   limits.client_message_rate_limit, limits.time_unit),
                            replies.client_message_rate(session.client_ip)))
        if limits.sender_message_rate_limit and sender is not None:  # not the null sender
            windows.append((Window(f"rate:sender:{sender.key}", limits.sender_message_rate_limit,
                                   limits.time_unit),
                            replies.SENDER_MESSAGE_RATE.about(sender.as_written)))
        return await self._admit(windows)

    # ------------------------------------------------------------ RCPT

    async def rcpt(self, session: ClientSession, path: str) -> Reply | None:
        recipient = _mailbox(path)
        keys = alias_keys(recipient, self.delimiter)[:-1] if recipient is not None else []
        if recipient is not None:
            ban = self.bans.current.address("alias", keys, recipient.domain, self.clock())
            if ban is not None:
                self._log_ban(ban, session, f"<{recipient.key}>")
                return replies.BANNED_ALIAS.about(recipient.as_written)
        if session.in_mynetworks:
            return None
        limits = self.limits
        windows: list[tuple[Window, Reply]] = []
        if limits.client_recipient_rate_limit:
            windows.append((Window(f"rate:client-rcpt:{session.client_ip}",
                                   limits.client_recipient_rate_limit, limits.time_unit),
                            replies.client_recipient_rate(session.client_ip)))
        if limits.alias_message_rate_limit and recipient is not None:
            windows.append((Window(f"rate:alias:{keys[-1]}", limits.alias_message_rate_limit,
                                   limits.time_unit),
                            replies.ALIAS_MESSAGE_RATE.about(recipient.as_written)))
        return await self._admit(windows)

    async def _admit(self, windows: Sequence[tuple[Window, Reply]]) -> Reply | None:
        if not windows:
            return None
        try:
            full = await self.store.admit([window for window, _ in windows])
        except StoreUnavailable as error:
            return self._unavailable("rate", error)
        self._store_answered()
        if full is None:
            return None
        return windows[full][1]

    # ------------------------------------------------------------ end of DATA

    def ask_duplicates(self, content: bytes | bytearray,
                       destinations: Sequence[str]) -> DuplicateQuestion | None:
        """Start asking which of ``destinations`` this message already reached; None when
        it is not checked (no Message-ID, or ``duplicate_window`` 0).

        Asked as soon as the message is complete, answered by :meth:`deliver_once`:
        the store's round trip overlaps our work on the message (trace field, From
        policy, verification, signing, sealing) instead of following it.  ``content``
        may be the message as received: the fields we add go above its header and
        change neither its Message-ID nor its body, so the keys are those of the
        message as delivered (:func:`duplicate_keys`).
        """
        if not self.limits.duplicate_window:
            return None
        head = header_block(content)
        message_id = _message_id(head)
        if not message_id:
            return None
        if len(content) - len(head) <= HASH_IN_THREAD:
            keys = _keys(message_id, _sha256(content, len(head)), destinations)
            return DuplicateQuestion(keys, self.store.ask_seen(list(keys.values())))
        body = bytes(content[len(head):])  # copied now: the handler changes ``content``
        keys = {}  # the task fills them in before it asks
        return DuplicateQuestion(keys, asyncio.get_running_loop().create_task(
            self._hash_then_ask(message_id, body, tuple(destinations), keys)))

    async def _hash_then_ask(self, message_id: str, body: bytes, destinations: Sequence[str],
                             keys: dict[str, str]) -> set[str]:
        """A big body's question: hashed off the event loop first."""
        body_hash = await asyncio.to_thread(_sha256, body, 0)
        keys.update(_keys(message_id, body_hash, destinations))
        return await self.store.seen(list(keys.values()))

    async def deliver_once(self, message: Message, delivery: Delivery,
                           question: DuplicateQuestion | None) -> Reply:
        """``delivery.deliver(message)``, except to the destinations ``question`` (this
        message's, from :meth:`ask_duplicates`) says it already reached."""
        if question is None:
            return await delivery.deliver(message)
        try:
            done = await question.delivered()
        except StoreUnavailable as error:
            refusal = self._unavailable("duplicates", error)
            return refusal if refusal is not None else await delivery.deliver(message)
        self._store_answered()
        if len(done) == len(question.keys):
            count_duplicates("message")
            log.info("%s: duplicate of a message already delivered to its %d destination(s): "
                     "accepted, not forwarded again", message.queue_id, len(done))
            return replies.queued(message.queue_id)
        if done:
            count_duplicates("destination", len(done))
            log.info("%s: already delivered to %d of %d destinations: forwarding to the others",
                     message.queue_id, len(done), len(question.keys))
            message = dataclasses.replace(
                message, recipients=tuple(r for r in message.recipients if r not in done))
        reply = await delivery.deliver(message)
        if reply.is_success:  # delivered or safely spooled: a retry must not send it again
            await self._remember([question.keys[dest] for dest in message.recipients])
        return reply

    async def _remember(self, keys: list[str]) -> None:
        try:
            await self.store.remember(keys, self.limits.duplicate_window)
        except StoreUnavailable as error:
            self._unavailable("duplicates", error)  # the message went: the 250 stands

    # ------------------------------------------------------------ store failures

    def _unavailable(self, check: str, error: StoreUnavailable) -> Reply | None:
        count_store_error(check)
        closed = self.limits.redis_failure == "fail_closed"
        if not self._store_down:
            self._store_down = True
            log.warning("limits store unavailable (%s): %s until it answers again", error,
                        "answering 451 4.3.0" if closed else
                        "accepting without rate limits or duplicate suppression")
        return replies.LIMITS_UNAVAILABLE if closed else None

    def _store_answered(self) -> None:
        if self._store_down:
            self._store_down = False
            log.info("limits store answering again")

    def _log_ban(self, ban: Ban, session: ClientSession, subject: str) -> None:
        count_ban_match(ban.kind)
        log.info("%s: %s banned as %s ban %s%s", client_name(session.client_ip), subject,
                 ban.kind, ban.value, f" ({ban.reason})" if ban.reason else "")


class DuplicateQuestion:
    """One message's question to the duplicate cache (:meth:`AbuseChecks.ask_duplicates`),
    put before our work on the message and answered after it.

    Whoever asks either awaits :meth:`delivered` or calls :meth:`drop`: an
    answer nobody wants must leave no pending task and no unretrieved exception.
    """

    def __init__(self, keys: dict[str, str], seen: asyncio.Future[set[str]]) -> None:
        self.keys = keys  # destination -> its key in the duplicate cache
        self._seen = seen  # the store's answer: which of the keys it remembers

    async def delivered(self) -> set[str]:
        """The destinations the message already reached; raises StoreUnavailable."""
        seen = await self._seen
        return {dest for dest, key in self.keys.items() if key in seen}

    def drop(self) -> None:
        """The answer is not wanted (the message was refused, or failed, before delivery)."""
        if not self._seen.done():
            self._seen.cancel()
        elif not self._seen.cancelled():
            self._seen.exception()  # retrieved: asyncio does not log it as never retrieved


async def duplicate_keys(message: Message) -> dict[str, str]:
    """destination -> its duplicate-cache key; empty without a Message-ID.

    The keys :meth:`AbuseChecks.ask_duplicates` asks for, made of the message as it is.
    """
    content = message.content
    head = header_block(content)
    message_id = _message_id(head)
    if not message_id:
        return {}
    if len(content) - len(head) > HASH_IN_THREAD:
        body_hash = await asyncio.to_thread(_sha256, bytes(content[len(head):]), 0)
    else:
        body_hash = _sha256(content, len(head))
    return _keys(message_id, body_hash, message.recipients)


def _message_id(head: bytes) -> str:
    """The first Message-ID field of a header section; "" without one."""
    ids = field_values(head, b"message-id")
    return ids[0].strip() if ids else ""


def _sha256(content: bytes | bytearray, start: int) -> str:
    """SHA-256 of ``content`` from ``start`` (the body), without copying it."""
    with memoryview(content) as view:
        return hashlib.sha256(view[start:]).hexdigest()


def _keys(message_id: str, body_hash: str, destinations: Sequence[str]) -> dict[str, str]:
    """destination -> its key: Message-ID, body hash and destination (case-insensitive)."""
    keys = {}
    for destination in destinations:
        material = f"{message_id}\n{body_hash}\n{destination.lower()}".encode("utf-8",
                                                                            "surrogateescape")
        keys[destination] = "dup:" + hashlib.sha256(material).hexdigest()
    return keys


def _mailbox(path: str) -> Address | None:
    """The address of a MAIL or RCPT path; None for the null sender and anything unparsable
    (the handler's own checks refuse those)."""
    if not path:
        return None
    try:
        return parse_mailbox(strip_source_route(path))
    except AddressError:
        return None


async def abuse_from_settings(settings: Settings, store_socket: socket.socket | None = None,
                              duplicates: SharedDuplicateTable | None = None) -> AbuseChecks:
    """The checks ``[limits]`` asks for, bans read once already.  ``await close()`` at the end.

    ``store_socket``: in a worker process, its channel to the supervisor's store
    (``state/shared.py``), so that the node's workers count together; the
    supervisor makes none when ``[limits]`` names Redis (one is closed unused).
    ``duplicates``: beside it, the duplicate table the supervisor mapped for its
    workers (``state/duplicates.py``): the duplicate question is then answered
    from shared memory, with no round trip, and only rates go to the supervisor.
    """
    limits = settings.limits
    store = _store(limits, store_socket, duplicates)
    bans = BanCache(BanReader(settings.database), limits.ban_cache_ttl)
    checks = AbuseChecks(limits, store, bans, delimiter=settings.server.recipient_delimiter)
    await checks.start()
    counters = getattr(store, "description", "this process")
    log.info("limits: counters in %s, duplicate cache in %s; %d bans in force", counters,
             getattr(store, "duplicates_description", counters), len(bans.current))
    return checks


def _store(limits: LimitsSettings, store_socket: socket.socket | None,
           duplicates: SharedDuplicateTable | None) -> Store:
    """Redis when ``[limits]`` names it; else a worker's channel to its supervisor (with the
    shared duplicate table when there is one); else this process."""
    if store_socket is None or limits.shared:
        if store_socket is not None:
            store_socket.close()
        return open_store(limits)
    counters = SocketStore(store_socket)
    return counters if duplicates is None else TableBackedStore(duplicates, counters)
