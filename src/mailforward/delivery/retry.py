"""When and how to try spooled messages again (Postfix-like backoff, lifetime and qmgr).

:class:`RetryPolicy` is pure arithmetic.  :class:`RetryScheduler` drives the
spool the way Postfix's qmgr drives its delivery agents:

* **Per-destination queues.**  A due message's pending recipients are split
  by destination (their domain; with ``relay_host`` all of them go to the
  relay), and each part waits in its destination's queue.  At most
  ``destination_concurrency`` attempts run per destination and
  ``total_concurrency`` in all; destinations with work are served round
  robin.  A stalled destination only ever holds its own slots: a healthy
  message behind it in the spool goes out meanwhile.
* **A deadline per attempt** (``attempt_timeout``): an attempt that has not
  finished by then is stopped and its recipients deferred, so a destination
  that accepts connections and then stalls costs a slot for that long, not
  for every command timeout of a session.  (The delivery callback applies
  its own, gentler deadline first: it never cuts a transaction past its
  final dot; this one is the backstop.)
* **The spool's in-memory index** says what is due: no file is read to
  decide, only the message being attempted.

Every outcome is recorded durably *before* the next step, in this order, so
a crash at any point never sends twice to a destination that accepted (it
may at worst bounce twice or retry a deferred recipient early):

1. delivered recipients are marked delivered, as soon as their
   destination's attempt ends (if the disk refuses, the spool remembers it
   in memory: :func:`.spool.record_delivery`);
2. once every destination of the message was tried: permanently failed
   recipients are bounced (callback), then marked failed;
3. if nothing is pending the file is removed; if the message outlived
   ``max_lifetime`` the rest is bounced ("delivery time expired") and the
   file removed; otherwise it is rescheduled with exponential backoff.

Like Postfix, an expired message still gets its due attempt first, so mail
that became deliverable at the last moment is delivered, not bounced.

The attempt callback logs each recipient's outcome (one Postfix-style line
per recipient: :mod:`.report`); the scheduler logs only what it decides
itself: a deferral at its deadline or after a crash of the callback,
``status=expired`` and ``removed``.

A message is not attempted while an attempt of the same process is still
waiting for a next hop's answer to its final dot (:meth:`.spool.Spool.in_flight`),
nor before its ``busy_until`` (the same, from another process).  Only one
scheduler may run per spool directory at a time; a second one could attempt
the same message concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace

from ..reply import Reply
from .base import domain_of, internal_failure
from .dsn import EXPIRED, should_bounce, wants_dsn
from .report import Report, log_expired, log_removed
from .spool import (
    Spool,
    SpoolCorrupt,
    SpooledMessage,
    SpoolEntry,
    SpoolError,
    SpoolNotFound,
    record_delivery,
)

log = logging.getLogger(__name__)

NO_RESULT = "no result from the delivery attempt"
ATTEMPT_DEADLINE = Reply(451, "4.4.7", "delivery attempt took too long (attempt_timeout)")


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


def merged(results: Iterable[AttemptResult]) -> AttemptResult:
    """The results of several attempts of one message (disjoint recipients) as one."""
    delivered: set[str] = set()
    deferred: dict[str, str] = {}
    failed: dict[str, Reply] = {}
    for result in results:
        delivered |= result.delivered
        deferred.update(result.deferred)
        failed.update(result.failed)
    return AttemptResult(frozenset(delivered), deferred, failed)


@dataclass(eq=False)
class _Round:
    """One message's pass: its destinations' attempts, then what is recorded."""

    entry: SpoolEntry
    now: float
    done: asyncio.Future[None]
    outstanding: int = 0  # destination attempts not finished yet
    results: list[AttemptResult] = field(default_factory=list)
    attempted: set[str] = field(default_factory=set)
    # Deferrals the scheduler made itself (deadline, crash): not logged by the attempt.
    unreported: dict[str, Reply] = field(default_factory=dict)


@dataclass(eq=False)
class _Item:
    """A message's recipients at one destination, waiting for a slot there."""

    round: _Round
    destination: str
    recipients: tuple[str, ...]


class RetryScheduler:
    """Attempts due spooled messages, per destination, and records every outcome durably.

    ``attempt`` delivers ``message.message()`` (the pending recipients of one
    destination); ``bounce`` sends a DSN for ``failures`` (recipient ->
    reason: ``str(Reply)`` such as ``"550 5.1.1 ..."`` or a text starting
    with :data:`EXPIRED`; see :func:`.dsn.failures_from_reasons`).
    ``bounce`` is not called for senders that :func:`.dsn.should_bounce`
    refuses (null sender, MAILER-DAEMON), nor for recipients whose RFC 3461
    NOTIFY asks for no failure report (``NEVER``, or a list without FAILURE:
    :func:`.dsn.wants_dsn`); those failures are only logged.  Spool I/O runs
    in a worker thread so fsync never stalls the event loop.

    ``destination_of`` maps a recipient to its queue (its domain by
    default; the relay for every recipient with ``relay_host``).
    """

    def __init__(self, spool: Spool, policy: RetryPolicy, attempt: Attempt, bounce: Bounce,
                 clock: Callable[[], float] = time.time, *,
                 destination_of: Callable[[str], str] = domain_of,
                 destination_concurrency: int = 20, total_concurrency: int = 100,
                 attempt_timeout: float | None = None) -> None:
        self.spool = spool
        self.policy = policy
        self.attempt = attempt
        self.bounce = bounce
        self.clock = clock
        self.destination_of = destination_of
        self.destination_concurrency = destination_concurrency
        self.total_concurrency = total_concurrency
        self.attempt_timeout = attempt_timeout
        self._wake = asyncio.Event()
        self._queues: dict[str, deque[_Item]] = {}  # destination -> waiting, in round-robin order
        self._running: defaultdict[str, int] = defaultdict(int)  # destination -> attempts running
        self._total = 0
        self._rounds: dict[str, _Round] = {}  # queue id -> its pass in progress
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False  # close(): nothing new starts
        self._cancelling = False  # close(), after its grace: nothing is recorded any more

    # --- passes

    async def run_once(self, now: float) -> int:
        """Start every message due at ``now`` and wait until they are done; how many started.

        Messages already being attempted (an earlier pass) are left to it.
        Each destination's attempt has its deadline, so this returns in
        bounded time however the destinations behave.
        """
        rounds = await self._dispatch(now)
        if rounds:
            await asyncio.wait([r.done for r in rounds])
        for r in rounds:
            error = None if r.done.cancelled() else r.done.exception()
            if error is not None:
                raise error
        return len(rounds)

    async def dispatch(self, now: float) -> int:
        """Start every message due at ``now``, without waiting for them; how many started."""
        return len(await self._dispatch(now))

    async def run_forever(self, interval: float) -> None:
        """A pass every ``interval`` seconds (or on :meth:`flush`) until cancelled.

        A pass does not wait for the previous one: a message that becomes due
        is started on time even while another waits for a slow destination.
        """
        passes: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._wake.clear()
                task = asyncio.create_task(self._pass(self.clock()))
                passes.add(task)
                task.add_done_callback(passes.discard)
                try:
                    await asyncio.wait_for(self._wake.wait(), interval)
                except TimeoutError:
                    pass
        finally:
            for task in passes:
                task.cancel()

    async def _pass(self, now: float) -> None:
        try:
            await self.run_once(now)
        except SpoolError as e:  # e.g. the directory became unreadable: keep trying
            log.error("spool scan failed: %s", e)

    def flush(self) -> int:
        """Make every message due now and wake :meth:`run_forever`; returns how many."""
        count = self.spool.flush(self.clock())
        self._wake.set()
        return count

    @property
    def busy(self) -> int:
        """Messages being attempted or waiting for a slot."""
        return len(self._rounds)

    async def close(self, timeout: float = 0.0) -> None:
        """Start nothing more; attempts in progress get ``timeout`` seconds, then are cancelled.

        What was not recorded stays in the spool as it was: due again at the
        next start.
        """
        self._closing = True
        waiting = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        for item in waiting:
            if not item.round.done.done():
                item.round.done.set_result(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and loop.time() < deadline:  # recording what finishes meanwhile
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        self._cancelling = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- queues

    async def _dispatch(self, now: float) -> list[_Round]:
        if self._closing:
            return []
        entries = await asyncio.to_thread(self.spool.due, now)
        loop = asyncio.get_running_loop()
        rounds: list[_Round] = []
        for entry in entries:
            queue_id = entry.queue_id
            if (queue_id in self._rounds or self.spool.in_flight(queue_id)
                    or entry.busy_until > now):
                continue
            r = _Round(entry, now, loop.create_future())
            self._rounds[queue_id] = r
            rounds.append(r)
            parts: dict[str, list[str]] = {}
            for rcpt in entry.pending:
                parts.setdefault(self.destination_of(rcpt), []).append(rcpt)
            r.outstanding = len(parts)
            if not parts:
                self._spawn(self._finish(r))
            for destination, rcpts in parts.items():
                self._queues.setdefault(destination, deque()).append(
                    _Item(r, destination, tuple(rcpts)))
        self._pump()
        return rounds

    def _pump(self) -> None:
        """Start waiting attempts while there are slots: round robin over destinations."""
        progressed = True
        while progressed and self._total < self.total_concurrency and not self._closing:
            progressed = False
            for destination in list(self._queues):
                if self._total >= self.total_concurrency:
                    return
                if self._running[destination] >= self.destination_concurrency:
                    continue
                queue = self._queues.pop(destination)
                item = queue.popleft()
                if queue:
                    self._queues[destination] = queue  # to the back of the round
                self._running[destination] += 1
                self._total += 1
                self._spawn(self._job(item))
                progressed = True

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _job(self, item: _Item) -> None:
        r = item.round
        try:
            r.results.append(await self._attempt_destination(r, item.recipients))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # SpoolError reading it, or the process dying: to run_once
            if isinstance(error, SpoolError):
                self.spool.report_error(r.entry.queue_id, error, "spool error, will retry")
            elif not r.done.done():
                r.done.set_exception(error)
        finally:
            self._running[item.destination] -= 1
            if not self._running[item.destination]:
                del self._running[item.destination]
            self._total -= 1
            r.outstanding -= 1
            if r.outstanding == 0:
                if r.done.done() or self._cancelling:
                    self._rounds.pop(r.entry.queue_id, None)
                    if not r.done.done():
                        r.done.set_result(None)
                else:
                    self._spawn(self._finish(r))
            self._pump()

    async def _attempt_destination(self, r: _Round, recipients: Sequence[str]) -> AttemptResult:
        """One destination's attempt on the message as it is on disk now; deliveries recorded."""
        queue_id = r.entry.queue_id
        try:
            message = await asyncio.to_thread(self.spool.get, queue_id)
        except (SpoolNotFound, SpoolCorrupt):
            return AttemptResult()  # gone meanwhile: _finish says so
        wanted = set(recipients)
        pending = tuple(rcpt for rcpt in message.pending if rcpt in wanted)
        if not pending:
            return AttemptResult()
        r.attempted.update(pending)
        result = await self._attempt(replace(message, pending=pending), r)
        delivered = [rcpt for rcpt in pending if rcpt in result.delivered]
        if delivered:
            await asyncio.to_thread(record_delivery, self.spool, queue_id, delivered)
        return result

    async def _attempt(self, message: SpooledMessage, r: _Round) -> AttemptResult:
        """The callback's result within the deadline; a crash in it defers everyone.

        The reason recorded names the exception, and its traceback is logged
        once, not on each of the many passes until the message expires.  The
        callback logs each recipient's outcome; the deferrals made here are
        logged once the round is recorded (:meth:`_record`), for the
        recipients the callback had not delivered meanwhile.
        """
        try:
            if self.attempt_timeout is None:
                return await self.attempt(message)
            return await asyncio.wait_for(self.attempt(message), self.attempt_timeout)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.warning("%s: attempt to %s stopped at its deadline", message.queue_id,
                        ",".join(message.pending))
            reply = ATTEMPT_DEADLINE
        except Exception as error:  # noqa: BLE001  (internal_failure logs it)
            reply = internal_failure(message.queue_id, error)
        r.unreported.update({rcpt: reply for rcpt in message.pending})
        return AttemptResult(deferred={rcpt: str(reply) for rcpt in message.pending})

    # --- one message, once its destinations were tried

    async def _finish(self, r: _Round) -> None:
        queue_id = r.entry.queue_id
        try:
            await self._settle(r)
        except (SpoolNotFound, SpoolCorrupt) as e:
            log.warning("%s: skipped: %s", queue_id, e)
        except SpoolError as e:
            self.spool.report_error(queue_id, e, "spool error, will retry")
        except asyncio.CancelledError:
            r.done.cancel()
            raise
        except BaseException as error:  # the process dying (tests): to run_once's caller
            if not r.done.done():
                r.done.set_exception(error)
        finally:
            self._rounds.pop(queue_id, None)
            if not r.done.done():
                r.done.set_result(None)

    async def _settle(self, r: _Round) -> None:
        queue_id, now = r.entry.queue_id, r.now
        message = await asyncio.to_thread(self.spool.get, queue_id)
        result = merged(r.results)
        if r.attempted:
            message = await self._record(message, result, r.unreported)
            deferred = {rcpt: _deferral(result, rcpt) for rcpt in message.pending
                        if rcpt in r.attempted}
        else:
            deferred = {}
        if not message.pending:
            await asyncio.to_thread(self.spool.remove, queue_id)
            log_removed(queue_id)
        elif self.policy.expired(message.created, now) and await self._expire(message, deferred):
            log_removed(queue_id)
        else:
            attempts = message.attempts + 1
            next_at = self.policy.next_attempt(message.created, attempts, now)
            try:
                await asyncio.to_thread(self.spool.reschedule, queue_id, next_at, attempts,
                                        deferred)
            except SpoolNotFound:
                raise
            except SpoolError as e:  # not before next_at all the same: no retry every pass
                self.spool.postpone(queue_id, next_at)
                self.spool.report_error(queue_id, e, "cannot reschedule")

    async def _record(self, message: SpooledMessage, result: AttemptResult,
                      unreported: Mapping[str, Reply]) -> SpooledMessage:
        """Mark delivered (if not yet), then bounce and mark failed; returns the updated message.

        The scheduler's own deferrals (``unreported``) are logged for the
        recipients still pending.
        """
        delivered = [r for r in message.pending if r in result.delivered]
        if delivered:
            await asyncio.to_thread(record_delivery, self.spool, message.queue_id, delivered)
            message = await asyncio.to_thread(self.spool.get, message.queue_id)
        failures = {r: str(result.failed[r]) for r in message.pending if r in result.failed}
        if failures and await self._bounce(message, failures):
            message = await asyncio.to_thread(self.spool.mark_failed, message.queue_id,
                                              failures)
        Report(message, message.created, self.clock).outcomes(
            {rcpt: unreported[rcpt] for rcpt in message.pending if rcpt in unreported})
        return message

    async def _expire(self, message: SpooledMessage, last_errors: Mapping[str, str]) -> bool:
        """Bounce what is still pending and drop the message; False if the bounce failed."""
        failures = {r: _expired_reason(last_errors.get(r) or message.errors.get(r))
                    for r in message.pending}
        if not await self._bounce(message, failures):
            return False
        returned = should_bounce(message.bounce_to) and any(
            wants_dsn(message, r, "FAILURE") for r in failures)
        log_expired(message.queue_id, message.sender, len(failures), returned=returned)
        await asyncio.to_thread(self.spool.remove, message.queue_id)
        return True

    async def _bounce(self, message: SpooledMessage, failures: Mapping[str, str]) -> bool:
        """Send a DSN (when the sender may get one); False if that failed, to retry later.

        The failures themselves were logged by the attempt (``status=bounced``)
        or are logged by :meth:`_expire` (``status=expired``).
        """
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
