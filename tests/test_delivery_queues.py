"""Retries Postfix's qmgr way, the final dot, and a spool the disk will not update.

* per-destination queues, each with a concurrency limit, and a deadline per
  attempt: a stalled destination does not hold up a healthy one;
* a transaction past its final dot is never cancelled: a destination slower
  than ``passthrough_timeout`` gets the message once, and the late answer is
  recorded so that the retry has nothing left to send;
* a delivery the spool cannot record is kept in memory: never sent twice;
* the spool's in-memory index says what is due without reading the files.

The destinations are aiosmtpd sinks on loopback, bound to port 0 in the
test's own event loop.  A sink can hold its answer to RCPT or DATA until
the test releases it (an ``asyncio.Event``): nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope

from mailforward.delivery.base import Message
from mailforward.delivery.client import ClientSettings
from mailforward.delivery.passthrough import TIMED_OUT, PassThroughDelivery, Router
from mailforward.delivery.retry import RetryPolicy, RetryScheduler
from mailforward.delivery.routing import MxRouter, NextHop
from mailforward.delivery.spool import Spool, SpoolError

CONTENT = b"From: sender@ext.test\r\nSubject: queues\r\n\r\nbody\r\n"
DAY = 86400.0


class Sink:
    """An aiosmtpd handler: keeps envelopes, and can hold RCPT or DATA until released."""

    def __init__(self) -> None:
        self.connections = 0
        self.envelopes: list[Envelope] = []
        self.arrived = asyncio.Event()
        self.hold_rcpt = False
        self.hold_data = False
        self.holding = asyncio.Event()  # a command is being held
        self.release = asyncio.Event()
        self.active = 0  # transactions between MAIL and the DATA answer
        self.most_active = 0
        self.port = 0

    def received(self, rcpt: str) -> int:
        return sum(e.rcpt_tos.count(rcpt) for e in self.envelopes)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if self.hold_rcpt:
            self.holding.set()
            await self.release.wait()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        if self.hold_data:
            self.holding.set()
            await self.release.wait()
        self.active -= 1
        self.envelopes.append(envelope)
        self.arrived.set()
        return "250 2.0.0 Ok: sunk"


async def start(sink: Sink) -> asyncio.Server:
    def accept() -> SMTP:
        sink.connections += 1
        return SMTP(sink, hostname="sink.test")
    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    sink.port = server.sockets[0].getsockname()[1]
    return server


class SinkRouter(Router):
    def __init__(self, sinks: Mapping[str, Sink]) -> None:
        super().__init__(MxRouter())
        self.sinks = sinks

    async def next_hops(self, domain: str) -> list[NextHop]:
        return [NextHop(f"mx.{domain}", "127.0.0.1", self.sinks[domain].port)]


@pytest.fixture
async def sinks() -> AsyncIterator[dict[str, Sink]]:
    made = {"ok.test": Sink(), "stall.test": Sink()}
    servers = [await start(sink) for sink in made.values()]
    yield made
    for sink in made.values():
        sink.release.set()  # let held handlers finish
    for server in servers:
        server.close()
        await server.wait_closed()


def deliverer(sinks: Mapping[str, Sink], tmp_path: Path, *, passthrough_timeout: float = 10,
              attempt_timeout: float | None = None, command_timeout: float = 30,
              spool: Spool | None = None) -> PassThroughDelivery:
    return PassThroughDelivery(SinkRouter(sinks), spool or Spool(tmp_path / "spool"),
                               ClientSettings("mx.mailforward.test", 5, command_timeout),
                               RetryPolicy(), "mx.mailforward.test",
                               passthrough_timeout=passthrough_timeout,
                               attempt_timeout=attempt_timeout)


def scheduler(delivery: PassThroughDelivery, **kwargs: Any) -> RetryScheduler:
    return RetryScheduler(delivery.spool, delivery.retry_policy, delivery.attempt_spooled,
                          delivery.bounce, **kwargs)


def message(queue_id: str, *recipients: str) -> Message:
    return Message(queue_id, "sender@ext.test", recipients, CONTENT,
                   original_sender="sender@ext.test")


def spool_for_retry(spool: Spool, msg: Message, due: float) -> None:
    spool.put(msg, msg.recipients, due - 300, due)


# --- per-destination queues, deadline


async def test_stalled_destination_does_not_delay_a_healthy_destinations_retry(
        sinks: dict[str, Sink], tmp_path: Path) -> None:
    delivery = deliverer(sinks, tmp_path, attempt_timeout=1, command_timeout=60)
    now = time.time()
    spool_for_retry(delivery.spool, message("STALL1", "x@stall.test"), now - 10)  # first in line
    spool_for_retry(delivery.spool, message("HEALTHY1", "y@ok.test"), now)
    sinks["stall.test"].hold_rcpt = True
    started = time.monotonic()
    run = asyncio.create_task(scheduler(delivery).run_once(now))
    await asyncio.wait_for(sinks["ok.test"].arrived.wait(), 10)
    assert not run.done()  # the stalled destination is still being tried meanwhile
    assert await asyncio.wait_for(run, 20) == 2
    assert time.monotonic() - started < 30  # the attempt deadline, not the command timeout
    assert sinks["ok.test"].received("y@ok.test") == 1
    (left,) = delivery.spool.list()
    assert (left.queue_id, left.pending) == ("STALL1", ("x@stall.test",))
    assert left.errors["x@stall.test"] == str(TIMED_OUT)


async def test_scheduler_backstop_stops_an_attempt_that_ignores_its_deadline(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool_for_retry(spool, message("HANG1", "x@stall.test"), 0.0)

    async def hang(msg: Any) -> Any:
        await asyncio.Event().wait()

    async def no_bounce(msg: Any, failures: Any) -> None:
        raise AssertionError("nothing to bounce")

    await RetryScheduler(spool, RetryPolicy(), hang, no_bounce, attempt_timeout=0.2).run_once(0.0)
    (left,) = spool.list()
    assert left.pending == ("x@stall.test",) and left.attempts == 2


async def test_destination_concurrency_limit_is_honoured(
        sinks: dict[str, Sink], tmp_path: Path) -> None:
    delivery = deliverer(sinks, tmp_path)
    for n in range(4):
        spool_for_retry(delivery.spool, message(f"MSG{n}", f"r{n}@ok.test"), 0.0)
    await scheduler(delivery, destination_concurrency=1).run_once(0.0)
    assert len(sinks["ok.test"].envelopes) == 4
    assert sinks["ok.test"].most_active == 1


async def test_destinations_are_attempted_concurrently_up_to_the_limits(
        sinks: dict[str, Sink], tmp_path: Path) -> None:
    delivery = deliverer(sinks, tmp_path)
    for n in range(4):
        spool_for_retry(delivery.spool, message(f"MSG{n}", f"r{n}@ok.test"), 0.0)
    sinks["ok.test"].hold_data = True
    run = asyncio.create_task(scheduler(delivery, destination_concurrency=3).run_once(0.0))
    await asyncio.wait_for(sinks["ok.test"].holding.wait(), 10)
    sinks["ok.test"].release.set()
    await asyncio.wait_for(run, 20)
    assert len(sinks["ok.test"].envelopes) == 4
    assert 1 < sinks["ok.test"].most_active <= 3


# --- the final dot


async def test_slow_destination_past_passthrough_timeout_receives_the_message_once(
        sinks: dict[str, Sink], tmp_path: Path) -> None:
    sink = sinks["ok.test"]
    sink.hold_data = True  # the final dot is sent, the answer is late
    delivery = deliverer(sinks, tmp_path, passthrough_timeout=0.3)
    reply = await delivery.deliver(message("SLOW1", "a@ok.test"))
    assert reply.code == 250  # spooled: the sender is answered on time
    (entry,) = delivery.spool.list()
    assert entry.pending == ("a@ok.test",) and entry.busy_until > time.time()
    assert delivery.spool.in_flight("SLOW1")
    retry = scheduler(delivery)
    assert await retry.run_once(time.time() + DAY) == 0  # still waiting for its answer: not retried
    sink.release.set()
    await delivery.close(timeout=10)  # the late answer is recorded
    assert delivery.spool.list() == []  # nothing left to send
    assert await retry.run_once(time.time() + DAY) == 0
    assert sink.received("a@ok.test") == 1 and sink.connections == 1


async def test_late_answer_leaves_only_the_really_deferred_recipients_pending(
        sinks: dict[str, Sink], tmp_path: Path) -> None:
    sinks["ok.test"].hold_data = True
    sinks["stall.test"].hold_rcpt = True  # before the dot: cancelled at the deadline
    delivery = deliverer(sinks, tmp_path, passthrough_timeout=0.3)
    assert (await delivery.deliver(message("SLOW2", "a@ok.test", "b@stall.test"))).code == 250
    sinks["ok.test"].release.set()
    await delivery.close(timeout=10)
    (entry,) = delivery.spool.list()
    assert (entry.pending, entry.delivered, entry.busy_until) == (("b@stall.test",),
                                                                  ("a@ok.test",), 0.0)
    assert sinks["ok.test"].received("a@ok.test") == 1


# --- a spool that cannot record a delivery


def disk_full(*args: object, **kwargs: object) -> Any:
    raise SpoolError("cannot write spool file: [Errno 28] No space left on device") from OSError(
        errno.ENOSPC, "No space left on device")


async def test_unrecordable_delivery_after_a_successful_retry_is_not_sent_again(
        sinks: dict[str, Sink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    delivery = deliverer(sinks, tmp_path)
    spool = delivery.spool
    spool_for_retry(spool, message("FULL1", "a@ok.test", "b@ok.test"), 0.0)
    monkeypatch.setattr(spool, "mark_delivered", disk_full)
    monkeypatch.setattr(spool, "remove", disk_full)  # the file cannot go either
    retry = scheduler(delivery)
    with caplog.at_level(logging.DEBUG, logger="mailforward"):
        for later in (0.0, 600.0, 3600.0, 7200.0):
            await retry.run_once(later)
    assert [e.rcpt_tos for e in sinks["ok.test"].envelopes] == [["a@ok.test", "b@ok.test"]]
    (entry,) = spool.list()  # still on disk, with nothing left to send
    assert (entry.pending, entry.delivered) == ((), ("a@ok.test", "b@ok.test"))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "FULL1" in r.getMessage()]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()


async def test_disk_refusing_every_write_still_sends_each_recipient_once(
        sinks: dict[str, Sink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    delivery = deliverer(sinks, tmp_path)
    spool = delivery.spool
    spool_for_retry(spool, message("FULL2", "a@ok.test", "b@stall.test"), 0.0)  # 2 destinations
    monkeypatch.setattr(Spool, "_write", disk_full)  # no mark, no reschedule, no removal
    monkeypatch.setattr(spool, "remove", disk_full)
    retry = scheduler(delivery)
    for later in (0.0, 7200.0, 14400.0):
        await retry.run_once(later)
    assert sinks["ok.test"].received("a@ok.test") == 1
    assert sinks["stall.test"].received("b@stall.test") == 1
    assert [(e.pending, e.delivered) for e in spool.list()] == [((), ("a@ok.test",
                                                                     "b@stall.test"))]


async def test_retry_time_that_cannot_be_written_is_kept_in_memory(
        sinks: dict[str, Sink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    delivery = deliverer(sinks, tmp_path)
    spool = delivery.spool
    spool_for_retry(spool, message("FULL3", "a@stall.test"), 0.0)
    sinks["stall.test"].hold_rcpt = True
    delivery.attempt_timeout = 0.2  # deferred: the retry time must be recorded
    monkeypatch.setattr(Spool, "_write", disk_full)
    retry = scheduler(delivery)
    assert await retry.run_once(0.0) == 1
    assert await retry.run_once(10.0) == 0  # not retried on every pass
    assert spool.list()[0].next_attempt >= 300.0


# --- the in-memory index


async def test_index_returns_due_messages_without_reading_message_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.list() == []  # start-up: the headers are loaded once
    for n in range(3):  # then kept up to date by the spool's own writes
        spool_for_retry(spool, message(f"IDX{n}", "a@ok.test"), float(n))
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert [e.queue_id for e in spool.due(1.0)] == ["IDX0", "IDX1"]
    assert [e.queue_id for e in spool.due(2.0)] == ["IDX0", "IDX1", "IDX2"]
    assert opened == []


async def test_index_reads_only_what_another_process_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    for n in range(3):
        spool_for_retry(ours, message(f"IDX{n}", "a@ok.test"), 0.0)
    assert len(ours.list()) == 3
    spool_for_retry(theirs, message("NEW1", "a@ok.test"), 0.0)  # a worker, the CLI...
    theirs.remove("IDX0")
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert sorted(e.queue_id for e in ours.due(0.0)) == ["IDX1", "IDX2", "NEW1"]
    assert opened == ["NEW1"]
