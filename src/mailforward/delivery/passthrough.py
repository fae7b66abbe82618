"""Pass-through acknowledgement: the sender's DATA is answered after the destinations answered us.

The contract, for one inbound transaction:

* every destination accepted            -> 250;
* every destination refused permanently -> the downstream's 5xx, nothing stored, no bounce;
* every destination deferred             -> 451, nothing stored (the sender retries);
* anything mixed                         -> the deferred remainder is spooled (fsync'd),
  permanently failed destinations get a DSN (never for the null sender), then 250;
* destinations slower than ``passthrough_timeout`` count as deferred: spool, then 250.

A transaction already past its final dot at ``passthrough_timeout`` is not
cancelled (the next hop may have the message: cancelling and retrying would
deliver it twice).  Its recipients are spooled like the other late ones,
with ``busy_until`` (no retry before its answer can have come, in any
process) and marked in flight for this process's scheduler; the transaction
runs on, and its answer is recorded when it comes: delivered recipients
marked delivered, refused ones bounced and marked failed, the message then
due as scheduled for whatever is left (:meth:`PassThroughDelivery.close`
gives such answers time to arrive on shutdown).

Our own DSNs follow the sender's RFC 3461 wishes (:func:`.dsn.wants_dsn`):
none for a destination whose RCPT said ``NOTIFY=NEVER`` or a NOTIFY without
FAILURE, and a "relayed" success report for one that asked
``NOTIFY=SUCCESS`` but went to a next hop without DSN
(:data:`.client.RELAYED_WITHOUT_DSN`; RFC 3461 6.2.1).  Losing a success
report (spool error) is only logged: the message itself was delivered.

So a 250 always means delivered or durably on disk, and a downstream spam
verdict goes back to the real sender in the same session instead of becoming
backscatter.  If the spool cannot be written the answer is 451, never 250.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ..reply import Reply, queued
from .base import Message, for_the_sender, new_queue_id
from .client import RELAYED_WITHOUT_DSN, ClientSettings, SmtpClient
from .connections import ConnectionCache
from .dsn import Original, build_dsn, failures_from_reasons, should_bounce, wants_dsn
from .report import Report, log_notification, log_queued, log_removed
from .retry import AttemptResult, RetryPolicy
from .routing import Router
from .spool import Spool, SpooledMessage, SpoolError, SpoolNotFound, record_delivery
from .transactions import TIMED_OUT, Late, Offer, OnDelivered, group_by_domain

__all__ = ["TIMED_OUT", "PassThroughDelivery", "Router", "group_by_domain"]

log = logging.getLogger(__name__)

SPOOL_FAILED = Reply(451, "4.3.0", "Error: queue file write error")
# How long after the command timeout a late transaction's answer may still be recorded.
LATE_MARGIN = 60.0


class PassThroughDelivery:
    """Pass-through delivery, its spool's hooks for the retry scheduler, and the sessions it keeps.

    ``connections``: the outbound session cache (none by default: every
    transaction on a new connection, closed after it; :func:`..build_delivery`
    gives it one).  ``attempt_timeout``: the deadline of a retry attempt
    (None: none), which never cuts a transaction past its final dot.
    """

    def __init__(self, router: Router, spool: Spool, client: ClientSettings, retry: RetryPolicy,
                 hostname: str, passthrough_timeout: float,
                 clock: Callable[[], float] = time.time, *,
                 connections: ConnectionCache | None = None,
                 attempt_timeout: float | None = None) -> None:
        self.router = router
        self.spool = spool
        self.client = client
        self.smtp = SmtpClient(client, connections)
        self.retry_policy = retry
        self.hostname = hostname
        self.passthrough_timeout = passthrough_timeout
        self.attempt_timeout = attempt_timeout
        self.clock = clock
        self._late: set[asyncio.Task[None]] = set()

    async def deliver(self, message: Message) -> Reply:
        arrived = self.clock()
        late: list[Late] = []
        outcomes = await self.attempt(message, message.recipients, self.passthrough_timeout,
                                      late=late.append, arrived=arrived)
        if not late:
            reply, _ = await self._acknowledge(message, outcomes, arrived=arrived)
            return reply
        self.spool.mark_in_flight(message.queue_id)
        try:
            busy_until = self.clock() + self.client.command_timeout + LATE_MARGIN
            reply, spooled = await self._acknowledge(message, outcomes, busy_until, arrived)
        except BaseException:
            for work in late:
                work.cancel()
            self.spool.clear_in_flight(message.queue_id)
            raise
        task = asyncio.create_task(self._record_late(message, late, spooled))
        self._late.add(task)
        task.add_done_callback(self._late.discard)
        return reply

    async def close(self, timeout: float | None = None) -> None:
        """On shutdown: late answers get ``timeout`` seconds (default: the command timeout),
        then the cached sessions are closed.

        A late transaction still unanswered then is cancelled: its message
        stays spooled for its recipients, and is retried after ``busy_until``.
        """
        if self._late:
            wait = self.client.command_timeout if timeout is None else timeout
            if wait > 0:
                await asyncio.wait(set(self._late), timeout=wait)
            for task in self._late:
                task.cancel()
            await asyncio.gather(*self._late, return_exceptions=True)
        await self.smtp.close()

    # ------------------------------------------------------------ attempts

    async def attempt(self, message: Message, recipients: Sequence[str], timeout: float | None,
                      on_delivered: OnDelivered | None = None,
                      late: Callable[[Late], object] | None = None,
                      arrived: float | None = None) -> dict[str, Reply]:
        """Offer the message to ``recipients``, a transaction per next hop; a Reply per recipient.

        :data:`TIMED_OUT` means exactly that the deadline expired first; a
        transaction that raised gets the exception's own (temporary)
        failure, so the spool and the operator see the true reason.  See
        :mod:`.transactions` for grouping, fallback, the deadline and ``late``.
        Each recipient's outcome is logged, its ``delay`` counted from
        ``arrived`` (default: now).
        """
        report = Report(message, self.clock() if arrived is None else arrived, self.clock)
        return await Offer(self.router, self.smtp, message, on_delivered, report).run(
            recipients, timeout, late)

    async def _record_late(self, message: Message, late: list[Late], spooled: bool) -> None:
        """Record the answers of transactions that were past their final dot at the deadline."""
        queue_id = message.queue_id
        try:
            outcomes: dict[str, Reply] = {}
            for work in late:
                outcomes.update(await work.outcomes())
            delivered = [r for r, reply in outcomes.items() if reply.is_success]
            if not spooled:
                if delivered:
                    log.warning("%s: delivered to %s after the sender was told to retry: it may "
                                "arrive twice", queue_id, ",".join(delivered))
                return
            await self._record_outcomes(message, outcomes)
        except asyncio.CancelledError:
            for work in late:
                work.cancel()
                work.abandoned()
            log.warning("%s: stopped waiting for the answer to the final dot; spooled, retried "
                        "later", queue_id)
            raise
        except Exception:
            log.exception("%s: cannot record the late answer", queue_id)
        finally:
            self.spool.clear_in_flight(queue_id)

    async def _record_outcomes(self, message: Message, outcomes: Mapping[str, Reply]) -> None:
        queue_id = message.queue_id
        delivered = [r for r, reply in outcomes.items() if reply.is_success]
        failed = {r: reply for r, reply in outcomes.items() if reply.is_permanent}
        deferred = {r: str(reply) for r, reply in outcomes.items() if reply.is_temporary}
        if delivered:
            await asyncio.to_thread(record_delivery, self.spool, queue_id, delivered)
        if failed:
            try:
                await asyncio.to_thread(self.send_dsn, message, failed)
                await asyncio.to_thread(self.spool.mark_failed, queue_id,
                                        {r: str(reply) for r, reply in failed.items()})
            except SpoolError as e:  # still pending: the retry meets the refusal again
                self.spool.report_error(queue_id, e, "cannot record the refusal")
        await self._report_relayed(message, outcomes)
        try:
            if await asyncio.to_thread(self.spool.settle, queue_id, deferred) is None:
                log_removed(queue_id)
        except SpoolNotFound:
            log.info("%s: no longer in the spool (deleted meanwhile)", queue_id)
        except SpoolError as e:
            self.spool.report_error(queue_id, e, "cannot record the late answer")

    # ------------------------------------------------------------ the contract

    async def acknowledge(self, message: Message, outcomes: Mapping[str, Reply]) -> Reply:
        reply, _ = await self._acknowledge(message, outcomes)
        return reply

    async def _acknowledge(self, message: Message, outcomes: Mapping[str, Reply],
                           busy_until: float = 0.0,
                           arrived: float | None = None) -> tuple[Reply, bool]:
        """The reply to the sender, and whether the message was spooled.

        The deferred remainder is spooled with each recipient's reply as its
        last error (``queue show`` says why at once, not after the first
        retry), and with ``arrived`` as its arrival time (default: now).
        """
        deferred = [r for r, reply in outcomes.items() if reply.is_temporary]
        failed = {r: reply for r, reply in outcomes.items() if reply.is_permanent}
        delivered = [r for r, reply in outcomes.items() if reply.is_success]
        if not deferred and not failed:
            await self._report_relayed(message, outcomes)
            return queued(message.queue_id), False
        if not delivered and not deferred:
            return next(iter(failed.values())), False
        timed_out = any(reply is TIMED_OUT for reply in outcomes.values())
        if not delivered and not failed and not timed_out:
            first = outcomes[deferred[0]]
            text = for_the_sender(first.text, message.alias_of(deferred[0]))
            return Reply(451, first.status or "4.4.1", text), False
        spooled = False
        try:  # fsync in a thread: the event loop keeps serving other clients
            if deferred:
                now = self.clock()
                next_attempt = max(self.retry_policy.next_attempt(now, 0, now), busy_until)
                await asyncio.to_thread(
                    self.spool.put, message, deferred, now if arrived is None else arrived,
                    next_attempt, busy_until=busy_until,
                    errors={r: str(outcomes[r]) for r in deferred})
                spooled = True
                log_queued(message.queue_id, message.sender, len(message.content),
                           len(deferred))
            if failed:
                await asyncio.to_thread(self.send_dsn, message, failed)
        except SpoolError as e:
            log.error("%s: cannot spool: %s", message.queue_id, e)
            return SPOOL_FAILED, spooled
        await self._report_relayed(message, outcomes)
        return queued(message.queue_id), spooled

    async def _report_relayed(self, original: Original, outcomes: Mapping[str, Reply]) -> None:
        """A "relayed" DSN for destinations whose NOTIFY=SUCCESS the next hop could not take.

        Only logged if it cannot be spooled: the message was delivered, and
        a failure here must not make the sender send it again.
        """
        relayed = [(rcpt, reply.status, reply.text) for rcpt, reply in outcomes.items()
                   if reply == RELAYED_WITHOUT_DSN]  # our own words: not an "smtp;" diagnostic
        if not relayed or not should_bounce(original.bounce_to):
            return
        try:
            await asyncio.to_thread(self._spool_dsn, original, relayed, relayed=True)
        except SpoolError as e:
            log.error("%s: cannot spool the relayed DSN: %s", original.queue_id, e)

    # ------------------------------------------------------------ the retry scheduler's hooks

    async def attempt_spooled(self, spooled: SpooledMessage) -> AttemptResult:
        """One more attempt for a spooled message's pending destinations.

        Each domain's acceptance is written to the spool the moment it arrives,
        not after the slowest domain: a crash while another domain is still in
        flight must not make a restart send the message again where it was
        already delivered.
        """
        def record(accepted: list[str]) -> Awaitable[object]:
            return asyncio.to_thread(record_delivery, self.spool, spooled.queue_id, accepted)

        outcomes = await self.attempt(spooled.message(), spooled.pending,
                                      timeout=self.attempt_timeout, on_delivered=record,
                                      arrived=spooled.created)
        await self._report_relayed(spooled, outcomes)
        return AttemptResult(
            delivered={r for r, reply in outcomes.items() if reply.is_success},
            deferred={r: str(reply) for r, reply in outcomes.items() if reply.is_temporary},
            failed={r: reply for r, reply in outcomes.items() if reply.is_permanent})

    async def bounce(self, spooled: SpooledMessage, failures: Mapping[str, str]) -> None:
        """A DSN for destinations that failed permanently or expired, spooled and due now."""
        await asyncio.to_thread(self._spool_dsn, spooled, failures_from_reasons(failures))

    def send_dsn(self, message: Message, failed: Mapping[str, Reply]) -> None:
        """Queue a DSN to the original sender (spooled, due now); never to the null sender."""
        if not should_bounce(message.bounce_to):
            return
        self._spool_dsn(message, [(rcpt, reply.status, str(reply)) for rcpt, reply in failed.items()])

    def _spool_dsn(self, original: Original, failures: Sequence[tuple[str, str, str]],
                   relayed: bool = False) -> None:
        """Build the DSN and spool it from ``<>`` to the sender as the client gave it.

        Only the destinations whose NOTIFY asks for this report are in it;
        none asking, no DSN.  A UTF-8 sender can only be reached with
        SMTPUTF8, and the DSN's ``To:`` then holds that UTF-8 address: the
        DSN message declares it; a returned 8-bit message makes it 8BITMIME.
        """
        event = "SUCCESS" if relayed else "FAILURE"
        wanted = [f for f in failures if wants_dsn(original, f[0], event)]
        if not wanted:
            log.info("%s: no DSN: NOTIFY does not ask for one", original.queue_id)
            return
        now = self.clock()
        content = build_dsn(reporting_mta=self.hostname, original=original, failures=wanted,
                            now=now, relayed=relayed)
        dsn = Message(queue_id=new_queue_id(), sender="", recipients=(original.bounce_to,),
                      content=content, smtputf8=not original.bounce_to.isascii(),
                      body="" if content.isascii() else "8BITMIME",
                      original_queue_id=original.queue_id)
        self.spool.put(dsn, dsn.recipients, now, now)
        log_notification(original.queue_id, dsn.queue_id, relayed=relayed)
        log_queued(dsn.queue_id, dsn.sender, len(content), len(dsn.recipients))
