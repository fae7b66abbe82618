"""Pass-through acknowledgement: the sender's DATA is answered after the destinations answered us.

The contract, for one inbound transaction:

* every destination accepted            -> 250;
* every destination refused permanently -> the downstream's 5xx, nothing stored, no bounce;
* every destination deferred             -> 451, nothing stored (the sender retries);
* anything mixed                         -> the deferred remainder is spooled (fsync'd),
  permanently failed destinations get a DSN (never for the null sender), then 250;
* destinations slower than ``passthrough_timeout`` count as deferred: spool, then 250.

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
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ..smtpd import replies
from ..smtpd.replies import Reply
from .base import Message, internal_failure, new_queue_id
from .client import RELAYED_WITHOUT_DSN, ClientSettings, send_to_domain
from .dsn import Original, build_dsn, failures_from_reasons, should_bounce, wants_dsn
from .retry import AttemptResult, RetryPolicy
from .routing import MxRouter, NextHop, RoutingError
from .spool import Spool, SpooledMessage, SpoolError

log = logging.getLogger(__name__)

# Still in flight when the sender's answer was due: never refused back to the
# sender (it may yet be delivered), always spooled.
TIMED_OUT = Reply(451, "4.4.7", "destination did not answer in time")
SPOOL_FAILED = Reply(451, "4.3.0", "Error: queue file write error")

# Called with the recipients one domain accepted, as soon as it accepted them.
OnDelivered = Callable[[list[str]], Awaitable[object]]


def group_by_domain(recipients: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for rcpt in recipients:
        groups[rcpt.rpartition("@")[2].lower()].append(rcpt)
    return dict(groups)


class Router:
    """Next hops for a domain: through ``relay_host`` when set, else by MX."""

    def __init__(self, resolver: MxRouter, relay_host: str = "") -> None:
        self.resolver = resolver
        self.relay_host = relay_host

    async def next_hops(self, domain: str) -> list[NextHop]:
        if self.relay_host:
            return await self.resolver.relay_hops(self.relay_host)
        return await self.resolver.next_hops(domain)


class PassThroughDelivery:
    def __init__(self, router: Router, spool: Spool, client: ClientSettings, retry: RetryPolicy,
                 hostname: str, passthrough_timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.router = router
        self.spool = spool
        self.client = client
        self.retry_policy = retry
        self.hostname = hostname
        self.passthrough_timeout = passthrough_timeout
        self.clock = clock

    async def deliver(self, message: Message) -> Reply:
        outcomes = await self.attempt(message, message.recipients, self.passthrough_timeout)
        return await self.acknowledge(message, outcomes)

    # ------------------------------------------------------------ attempts

    async def attempt(self, message: Message, recipients: Sequence[str], timeout: float | None,
                      on_delivered: OnDelivered | None = None) -> dict[str, Reply]:
        """Offer the message to every destination domain at once; a Reply per recipient.

        :data:`TIMED_OUT` means exactly that the deadline expired first; a
        domain whose attempt raised gets the exception's own (temporary)
        failure, so the spool and the operator see the true reason.
        """
        groups = group_by_domain(recipients)
        tasks = {domain: asyncio.create_task(self._attempt_domain(domain, message, rcpts,
                                                                  on_delivered))
                 for domain, rcpts in groups.items()}
        done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        for task in pending:
            task.cancel()
        outcomes: dict[str, Reply] = {}
        for domain, task in tasks.items():
            outcomes.update(_domain_outcome(message, groups[domain], task, task in done))
        return outcomes

    async def _attempt_domain(self, domain: str, message: Message, recipients: list[str],
                              on_delivered: OnDelivered | None) -> dict[str, Reply]:
        try:
            hops = await self.router.next_hops(domain)
        except RoutingError as e:
            return {rcpt: e.reply for rcpt in recipients}
        outcomes = await send_to_domain(hops, message, recipients, self.client)
        accepted = [rcpt for rcpt, reply in outcomes.items() if reply.is_success]
        if accepted and on_delivered is not None:
            await _record_delivered(message, accepted, on_delivered)
        return outcomes

    # ------------------------------------------------------------ the contract

    async def acknowledge(self, message: Message, outcomes: Mapping[str, Reply]) -> Reply:
        deferred = [r for r, reply in outcomes.items() if reply.is_temporary]
        failed = {r: reply for r, reply in outcomes.items() if reply.is_permanent}
        delivered = [r for r, reply in outcomes.items() if reply.is_success]
        log.info("%s: delivered=%d deferred=%d failed=%d", message.queue_id, len(delivered),
                 len(deferred), len(failed))
        if not deferred and not failed:
            await self._report_relayed(message, outcomes)
            return replies.queued(message.queue_id)
        if not delivered and not deferred:
            return next(iter(failed.values()))
        timed_out = any(reply is TIMED_OUT for reply in outcomes.values())
        if not delivered and not failed and not timed_out:
            first = outcomes[deferred[0]]
            return Reply(451, first.status or "4.4.1", first.text)
        try:  # fsync in a thread: the event loop keeps serving other clients
            if deferred:
                now = self.clock()
                await asyncio.to_thread(self.spool.put, message, deferred, now,
                                        self.retry_policy.next_attempt(now, 0, now))
            if failed:
                await asyncio.to_thread(self.send_dsn, message, failed)
        except SpoolError as e:
            log.error("%s: cannot spool: %s", message.queue_id, e)
            return SPOOL_FAILED
        await self._report_relayed(message, outcomes)
        return replies.queued(message.queue_id)

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
            return asyncio.to_thread(self.spool.mark_delivered, spooled.queue_id, accepted)

        outcomes = await self.attempt(spooled.message(), spooled.pending, timeout=None,
                                      on_delivered=record)
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
                      body="" if content.isascii() else "8BITMIME")
        self.spool.put(dsn, dsn.recipients, now, now)


def _domain_outcome(message: Message, recipients: Sequence[str], task: asyncio.Task[dict[str, Reply]],
                    finished: bool) -> dict[str, Reply]:
    """One domain's replies: its result, its exception's failure, or TIMED_OUT if unfinished."""
    if not finished or task.cancelled():
        return {rcpt: TIMED_OUT for rcpt in recipients}
    error = task.exception()
    if error is not None:
        return {rcpt: internal_failure(message.queue_id, error) for rcpt in recipients}
    return task.result()


async def _record_delivered(message: Message, accepted: list[str],
                            on_delivered: OnDelivered) -> None:
    """Tell ``on_delivered``; if that fails, the acceptance still counts.

    The destination has the message whatever our bookkeeping did: reporting
    it as deferred would send it again.  The scheduler records the returned
    acceptance once more after the attempt.
    """
    try:
        await on_delivered(accepted)
    except Exception as error:  # noqa: BLE001  (logged, and the scheduler records it again)
        log.error("%s: cannot record delivery to %s yet: %s", message.queue_id,
                  ",".join(accepted), error)
