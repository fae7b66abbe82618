"""When and how to try spooled messages again (Postfix-like backoff and lifetime).

:class:`RetryPolicy` is pure arithmetic.  :class:`RetryScheduler` drives the
spool: it attempts due messages through a callback and records each outcome
durably *before* the next step, in this order, so a crash at any point
never sends twice to a destination that accepted (it may at worst bounce
twice or retry a deferred recipient early):

1. delivered recipients are marked delivered;
2. permanently failed ones are bounced (callback), then marked failed;
3. if nothing is pending the file is removed; if the message outlived
   ``max_lifetime`` the rest is bounced ("delivery time expired") and the
   file removed; otherwise it is rescheduled with exponential backoff.

Like Postfix, an expired message still gets its due attempt first, so mail
that became deliverable at the last moment is delivered, not bounced.

Only one scheduler may run per spool directory at a time; a second one
could attempt the same message concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field

from ..smtpd.replies import Reply
from .base import internal_failure
from .dsn import EXPIRED, should_bounce, wants_dsn
from .spool import Spool, SpoolCorrupt, SpooledMessage, SpoolError, SpoolNotFound

log = logging.getLogger(__name__)

NO_RESULT = "no result from the delivery attempt"


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff doubles from ``first_retry`` up to ``max_backoff``; mail expires after
    ``max_lifetime`` seconds (Postfix's minimal/maximal_backoff_time, maximal_queue_lifetime).
    """

    first_retry: float = 300
    max_backoff: float = 3600
    max_lifetime: float = 5 * 86400

    def next_attempt(self, created: float, attempts: int, now: float) -> float:
        """When to try again after ``attempts`` failed attempts (300, 600, 1200, ... 3600).

        Never later than the expiry time, so an undeliverable message is
        bounced on time instead of up to ``max_backoff`` late.  Once expired
        (its bounce could not be sent) the plain backoff applies again.
        """
        exponent = min(max(attempts, 1) - 1, 62)  # 2**62 seconds is past any cap
        delay = min(self.first_retry * 2.0**exponent, self.max_backoff)
        expiry = created + self.max_lifetime
        return min(now + delay, expiry) if expiry > now else now + delay

    def expired(self, created: float, now: float) -> bool:
        """True from ``created + max_lifetime`` on (the lifetime is half-open)."""
        return now - created >= self.max_lifetime


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt did, per recipient.

    A recipient named in several fields counts as delivered first, then
    failed: once a destination accepted, nothing may send it again.  A pending
    recipient named nowhere is deferred (:data:`NO_RESULT`).
    """

    delivered: Set[str] = frozenset()
    deferred: Mapping[str, str] = field(default_factory=dict)  # recipient -> reason
    failed: Mapping[str, Reply] = field(default_factory=dict)  # recipient -> permanent reply

    @classmethod
    def from_reply(cls, recipients: Iterable[str], reply: Reply) -> AttemptResult:
        """One reply for all recipients, as :class:`~.base.Delivery` gives it."""
        rcpts = list(recipients)
        if reply.is_success:
            return cls(delivered=frozenset(rcpts))
        if reply.is_permanent:
            return cls(failed={r: reply for r in rcpts})
        return cls(deferred={r: str(reply) for r in rcpts})


Attempt = Callable[[SpooledMessage], Awaitable[AttemptResult]]
Bounce = Callable[[SpooledMessage, Mapping[str, str]], Awaitable[None]]


class RetryScheduler:
    """Attempts due spooled messages and records every outcome durably.

    ``attempt`` delivers ``message.message()`` (the pending recipients);
    ``bounce`` sends a DSN for ``failures`` (recipient -> reason: ``str(Reply)``
    such as ``"550 5.1.1 ..."`` or a text starting with :data:`EXPIRED`; see
    :func:`.dsn.failures_from_reasons`).  ``bounce`` is not called for senders
    that :func:`.dsn.should_bounce` refuses (null sender, MAILER-DAEMON), nor
    for recipients whose RFC 3461 NOTIFY asks for no failure report
    (``NEVER``, or a list without FAILURE: :func:`.dsn.wants_dsn`); those
    failures are only logged.  Spool I/O runs in a worker thread so fsync
    never stalls the event loop.
    """

    def __init__(self, spool: Spool, policy: RetryPolicy, attempt: Attempt, bounce: Bounce,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.policy = policy
        self.attempt = attempt
        self.bounce = bounce
        self.clock = clock
        self._wake = asyncio.Event()

    async def run_once(self, now: float) -> int:
        """Process every message due at ``now``; returns how many were processed."""
        entries = await asyncio.to_thread(self.spool.due, now)
        for entry in entries:
            try:
                await self._process(entry.queue_id, now)
            except (SpoolNotFound, SpoolCorrupt) as e:
                log.warning("%s: skipped: %s", entry.queue_id, e)
            except SpoolError as e:
                log.error("%s: spool error, will retry: %s", entry.queue_id, e)
        return len(entries)

    async def run_forever(self, interval: float) -> None:
        """Run :meth:`run_once` every ``interval`` seconds (or on :meth:`flush`) until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.run_once(self.clock())
            except SpoolError as e:  # e.g. the directory became unreadable: keep trying
                log.error("spool scan failed: %s", e)
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass

    def flush(self) -> int:
        """Make every message due now and wake :meth:`run_forever`; returns how many."""
        count = self.spool.flush(self.clock())
        self._wake.set()
        return count

    # --- one message

    async def _process(self, queue_id: str, now: float) -> None:
        message = await asyncio.to_thread(self.spool.get, queue_id)
        if message.pending:
            result = await self._attempt(message)
            message = await self._record(message, result)
            deferred = {r: _deferral(result, r) for r in message.pending}
        else:
            deferred = {}
        if not message.pending:
            await asyncio.to_thread(self.spool.remove, queue_id)
            log.info("%s: removed", queue_id)
        elif self.policy.expired(message.created, now) and await self._expire(message, deferred):
            log.info("%s: removed (expired)", queue_id)
        else:
            attempts = message.attempts + 1
            next_at = self.policy.next_attempt(message.created, attempts, now)
            await asyncio.to_thread(self.spool.reschedule, queue_id, next_at, attempts, deferred)

    async def _attempt(self, message: SpooledMessage) -> AttemptResult:
        """The callback's result; a crash in it defers everyone instead of losing track.

        The reason recorded names the exception, and its traceback is logged
        once, not on each of the many passes until the message expires.
        """
        try:
            return await self.attempt(message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001  (internal_failure logs it)
            reason = str(internal_failure(message.queue_id, error))
            return AttemptResult(deferred={r: reason for r in message.pending})

    async def _record(self, message: SpooledMessage, result: AttemptResult) -> SpooledMessage:
        """Mark delivered, then bounce and mark failed; returns the updated message."""
        delivered = [r for r in message.pending if r in result.delivered]
        for rcpt in delivered:
            log.info("%s: to=<%s>, status=sent", message.queue_id, rcpt)
        if delivered:
            message = await asyncio.to_thread(self.spool.mark_delivered, message.queue_id,
                                              delivered)
        failures = {r: str(result.failed[r]) for r in message.pending if r in result.failed}
        if failures and await self._bounce(message, failures):
            message = await asyncio.to_thread(self.spool.mark_failed, message.queue_id,
                                              failures)
        for rcpt in message.pending:
            log.info("%s: to=<%s>, status=deferred (%s)", message.queue_id, rcpt,
                     _deferral(result, rcpt))
        return message

    async def _expire(self, message: SpooledMessage, last_errors: Mapping[str, str]) -> bool:
        """Bounce what is still pending and drop the message; False if the bounce failed."""
        failures = {r: _expired_reason(last_errors.get(r) or message.errors.get(r))
                    for r in message.pending}
        if not await self._bounce(message, failures):
            return False
        await asyncio.to_thread(self.spool.remove, message.queue_id)
        return True

    async def _bounce(self, message: SpooledMessage, failures: Mapping[str, str]) -> bool:
        """Send a DSN (when the sender may get one); False if that failed, to retry later."""
        for rcpt, reason in failures.items():
            log.info("%s: to=<%s>, status=bounced (%s)", message.queue_id, rcpt, reason)
        if not should_bounce(message.bounce_to):
            log.info("%s: no bounce to sender <%s>", message.queue_id, message.bounce_to)
            return True
        wanted = {r: reason for r, reason in failures.items()
                  if wants_dsn(message, r, "FAILURE")}
        for rcpt in failures.keys() - wanted.keys():
            log.info("%s: to=<%s>, no bounce: NOTIFY=%s", message.queue_id, rcpt,
                     message.dsn_of(rcpt).notify)
        if not wanted:
            return True
        try:
            await self.bounce(message, wanted)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: cannot send the bounce, will retry", message.queue_id)
            return False
        return True


def _deferral(result: AttemptResult, recipient: str) -> str:
    """Why ``recipient`` is still pending after ``result``."""
    if recipient in result.deferred:
        return result.deferred[recipient]
    if recipient in result.failed:  # its bounce could not be sent
        return str(result.failed[recipient])
    return NO_RESULT


def _expired_reason(last_error: str | None) -> str:
    """:data:`EXPIRED`, with the last error when there is one: the sender wants to know why."""
    return f"{EXPIRED} (last error: {last_error})" if last_error else EXPIRED
