"""One delivery attempt of one message: routes, a transaction per next hop, a deadline.

* **Routing.**  Every destination domain is looked up at once; with
  ``relay_host`` there is a single lookup for all of them.
* **Grouping by next hop** (Postfix delivers per nexthop): recipients whose
  first next hop is the same address and port share one transaction,
  whatever their domain -- with ``relay_host``, a message to two domains is
  one transaction at the relay.  Results stay per recipient.
* **Fallback.**  A hop that cannot be reached, or that answers 4xx before any
  recipient, is skipped: each domain of its group goes on to its *own* next
  hop (never to another domain's MX), grouped again with the domains that
  go there too.  A domain whose hops are exhausted gets the last hop's reply.
* **Deadline.**  When ``timeout`` expires, work that has not written its
  final dot (DNS, connect, envelope, content) is cancelled and its
  recipients get :data:`TIMED_OUT` (deferred).  A transaction past its final
  dot is *never* cancelled: the next hop may already have the message, and
  cancelling would make the retry send it again.  Its answer is awaited,
  bounded by the command timeout -- or, when the caller passes ``late``, its
  recipients are reported as :data:`TIMED_OUT` now and the still-running
  transactions are handed over as a :class:`Late`, whose outcomes the caller
  records when they come (pass-through: the sender gets its answer on time).

Recipients a hop accepted are reported to ``on_delivered`` as soon as that
transaction ends, not after the slowest one.  Each recipient's outcome is
logged (:class:`.report.Report`: one Postfix-style line per recipient) as
soon as it is known: when its transaction ends, when routing or the deadline
decides it, or -- handed over as :class:`Late` -- when its answer comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..reply import Reply
from .base import Message, domain_of, internal_failure
from .client import Commit, SmtpClient, TryNextHop, refuse_unwritable
from .report import Report
from .routing import NextHop, Router

log = logging.getLogger(__name__)

# Still in flight when the answer was due: never refused back to the sender
# (it may yet be delivered), always spooled.
TIMED_OUT = Reply(451, "4.4.7", "destination did not answer in time")
NO_NEXT_HOP = Reply(451, "4.4.3", "no next hop for this destination")

# Called with the recipients one transaction delivered, as soon as it ended.
OnDelivered = Callable[[list[str]], Awaitable[object]]


def group_by_domain(recipients: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for rcpt in recipients:
        groups[domain_of(rcpt)].append(rcpt)
    return dict(groups)


# (remaining next hops, recipients) of one domain
_Member = tuple[Sequence[NextHop], list[str]]


@dataclass
class _Job:
    """One transaction: ``hop`` for the recipients of ``members``."""

    hop: NextHop
    members: list[_Member]
    commit: Commit = field(default_factory=Commit)

    @property
    def recipients(self) -> list[str]:
        return [rcpt for _, rcpts in self.members for rcpt in rcpts]


@dataclass
class Late:
    """Transactions past their final dot when the deadline came, still running."""

    message: Message
    jobs: list[tuple[asyncio.Task[dict[str, Reply]], _Job]]
    report: Report
    reported: bool = False  # the outcomes are in the log

    @property
    def recipients(self) -> list[str]:
        return [rcpt for _, job in self.jobs for rcpt in job.recipients]

    async def outcomes(self) -> dict[str, Reply]:
        """A reply per recipient once every transaction has its answer (each logged)."""
        await asyncio.wait([task for task, _ in self.jobs])
        results: dict[str, Reply] = {}
        for task, job in self.jobs:
            outcome = _finished(self.message, task, job.recipients)
            _report(self.report, job, outcome)
            results.update(outcome)
        self.reported = True
        return results

    def cancel(self) -> None:
        for task, _ in self.jobs:
            task.cancel()

    def abandoned(self) -> None:
        """Log the recipients as deferred: their answer will not be waited for (shutdown)."""
        if self.reported:
            return
        self.reported = True
        for _, job in self.jobs:
            self.report.outcomes({rcpt: TIMED_OUT for rcpt in job.recipients}, job.commit.relay)


def _finished(message: Message, task: asyncio.Task[dict[str, Reply]],
              recipients: list[str]) -> dict[str, Reply]:
    """A finished transaction's replies (an unexpected exception is a temporary failure)."""
    if task.cancelled():
        return {rcpt: TIMED_OUT for rcpt in recipients}
    error = task.exception()
    if isinstance(error, TryNextHop):  # cannot happen past the dot; the hop's reply all the same
        return {rcpt: error.reply for rcpt in recipients}
    if error is not None:
        return {rcpt: internal_failure(message.queue_id, error) for rcpt in recipients}
    return task.result()


def _report(report: Report, job: _Job, outcome: dict[str, Reply]) -> None:
    """Log a transaction's outcome: the hop it reached, and its answer to the final dot."""
    report.outcomes(outcome, job.commit.relay, job.commit.answer)


class Offer:
    """Offer ``message`` to some of its recipients (see the module docstring).

    ``report`` logs each recipient's outcome (by default: the message
    arrived when the offer was made).
    """

    def __init__(self, router: Router, client: SmtpClient, message: Message,
                 on_delivered: OnDelivered | None = None, report: Report | None = None) -> None:
        self.router = router
        self.client = client
        self.message = message
        self.on_delivered = on_delivered
        self.report = report if report is not None else Report(message, time.time())
        self._tasks: dict[asyncio.Task[dict[str, Reply]], _Job] = {}

    async def run(self, recipients: Sequence[str], timeout: float | None,
                  late: Callable[[Late], object] | None = None) -> dict[str, Reply]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        results = refuse_unwritable(self.message, recipients)
        self.report.outcomes(results)
        offered = [rcpt for rcpt in recipients if rcpt not in results]
        if not offered:
            return results
        routed, members = await self._route(offered, loop, deadline)
        self.report.outcomes(routed)
        results.update(routed)
        if not members:
            return results
        self._launch(members)
        try:
            await self._until(deadline, results)
        except BaseException:  # cancelled ourselves: nothing may keep running unseen
            for task in self._tasks:
                task.cancel()
            raise
        return await self._past_deadline(results, late)

    async def _route(self, offered: list[str], loop: asyncio.AbstractEventLoop,
                     deadline: float | None) -> tuple[dict[str, Reply], list[_Member]]:
        """The next hops of ``offered``, by domain; a reply for those that have none."""
        domains = group_by_domain(offered)
        routing = asyncio.ensure_future(self.router.routes(list(domains)))
        try:
            done, _ = await asyncio.wait([routing], timeout=_left(loop, deadline))
        except BaseException:
            routing.cancel()
            raise
        if not done:
            routing.cancel()
            return {rcpt: TIMED_OUT for rcpt in offered}, []
        error = routing.exception()
        if error is not None:
            return {rcpt: internal_failure(self.message.queue_id, error) for rcpt in offered}, []
        results: dict[str, Reply] = {}
        members: list[_Member] = []
        for domain, route in routing.result().items():
            if isinstance(route, Reply):
                results.update({rcpt: route for rcpt in domains[domain]})
            elif not route:
                results.update({rcpt: NO_NEXT_HOP for rcpt in domains[domain]})
            else:
                members.append((route, domains[domain]))
        return results, members

    def _launch(self, members: Sequence[_Member]) -> None:
        """A transaction per first next hop (address, port) of ``members``."""
        groups: dict[tuple[str, int], list[_Member]] = {}
        for hops, rcpts in members:
            groups.setdefault((hops[0].address, hops[0].port), []).append((hops, rcpts))
        for group in groups.values():
            job = _Job(group[0][0][0], group)
            self._tasks[asyncio.create_task(self._transaction(job))] = job

    async def _transaction(self, job: _Job) -> dict[str, Reply]:
        outcomes = await self.client.transaction(job.hop, self.message, job.recipients, job.commit)
        accepted = [rcpt for rcpt, reply in outcomes.items() if reply.is_success]
        if accepted and self.on_delivered is not None:
            await _record_delivered(self.message, accepted, self.on_delivered)
        return outcomes

    async def _until(self, deadline: float | None, results: dict[str, Reply]) -> None:
        """Collect finished transactions (starting fallbacks) until all are done or the deadline."""
        loop = asyncio.get_running_loop()
        while self._tasks:
            left = _left(loop, deadline)
            if left is not None and left <= 0:
                return
            done, _ = await asyncio.wait(self._tasks, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return
            for task in done:
                job = self._tasks.pop(task)
                error = None if task.cancelled() else task.exception()
                if isinstance(error, TryNextHop):
                    self._next_hop(job, error.reply, results)
                else:
                    outcome = _finished(self.message, task, job.recipients)
                    _report(self.report, job, outcome)
                    results.update(outcome)

    def _next_hop(self, job: _Job, reply: Reply, results: dict[str, Reply]) -> None:
        log.info("%s: %s", self.message.queue_id, reply)
        onward: list[_Member] = []
        exhausted: dict[str, Reply] = {}
        for hops, rcpts in job.members:
            if len(hops) > 1:
                onward.append((hops[1:], rcpts))
            else:
                exhausted.update({rcpt: reply for rcpt in rcpts})
        _report(self.report, job, exhausted)
        results.update(exhausted)
        if onward:
            self._launch(onward)

    async def _past_deadline(self, results: dict[str, Reply],
                             late: Callable[[Late], object] | None) -> dict[str, Reply]:
        """Cancel what has not sent its final dot; await or hand over what has."""
        committed: list[tuple[asyncio.Task[dict[str, Reply]], _Job]] = []
        for task, job in self._tasks.items():
            if job.commit.past_dot:
                committed.append((task, job))
            else:
                task.cancel()
                timed_out = {rcpt: TIMED_OUT for rcpt in job.recipients}
                _report(self.report, job, timed_out)
                results.update(timed_out)
        self._tasks.clear()
        if not committed:
            return results
        still = Late(self.message, committed, self.report)
        if late is None:
            try:
                results.update(await still.outcomes())
            except BaseException:
                still.cancel()
                raise
        else:
            log.info("%s: %s past the final dot at the deadline: awaiting the answer",
                     self.message.queue_id, ",".join(still.recipients))
            results.update({rcpt: TIMED_OUT for rcpt in still.recipients})
            late(still)
        return results


def _left(loop: asyncio.AbstractEventLoop, deadline: float | None) -> float | None:
    return None if deadline is None else deadline - loop.time()


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
