"""Why did it fail? The delivery log lines, asserted field by field over real deliveries.

One Postfix smtp(8) line per recipient per attempt (``QID: to=<dest>,
orig_to=<alias>, relay=host[ip]:port, delay=N, dsn=X.Y.Z, status=... (reply)``),
the queue manager's lines for spooled messages, the bounce daemon's line that
ties a DSN to the message it reports on, and the downstream's reply in the
spool from the first attempt on (``queue show``).  Destinations are routed by
MX through a loopback DNS server to a ``smtp_harness.Sink`` on 127.0.0.2
(``reject*`` 550, ``defer*`` 451, ``slow*`` answers DATA late); 127.0.0.4
refuses connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from mailforward.cli import main
from mailforward.delivery.base import Message, new_queue_id
from mailforward.delivery.client import ClientSettings
from mailforward.delivery.passthrough import PassThroughDelivery, Router
from mailforward.delivery.retry import AttemptResult, RetryPolicy, RetryScheduler
from mailforward.delivery.routing import MxRouter
from mailforward.delivery.spool import Spool, SpooledMessage
from mailforward.ops.logs import format_delay, program_of

from smtp_harness import SLOW_DATA_SECONDS, Clock, CommonPort, Sink

ZONE = """
ok.test.        300 IN MX 10 mx.ok.test.
mx.ok.test.     300 IN A 127.0.0.2
dead.test.      300 IN MX 10 mx.dead.test.
mx.dead.test.   300 IN A 127.0.0.4
"""

CONTENT = b"From: sender@ext.test\r\nSubject: logs\r\n\r\nbody-marker-7c41\r\n"
SRS_SENDER = "SRS0=abcd=XY=ext.test=sender@fwd.test"

# QID: to=<x>[, orig_to=<y>], relay=R, delay=D, dsn=S, status=W (reply)
LINE = re.compile(r"(?P<qid>[0-9A-F]+): to=<(?P<to>[^>]*)>(?:, orig_to=<(?P<orig_to>[^>]*)>)?, "
                  r"relay=(?P<relay>\S+), delay=(?P<delay>[0-9.]+), dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), "
                  r"status=(?P<status>sent|deferred|bounced) \((?P<reply>.*)\)")


@pytest.fixture(scope="module")
def world(nameserver: str) -> Iterator[dict[str, Any]]:
    sink = Sink("127.0.0.2")
    with CommonPort([sink], refusing=["127.0.0.4"]) as port:
        yield {"port": port, "sink": sink, "nameserver": nameserver}


def make_delivery(world: dict[str, Any], directory: Path, clock: Clock | None = None,
                  passthrough_timeout: float = 5.0) -> PassThroughDelivery:
    world["sink"].reset()
    router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2))
    return PassThroughDelivery(router, Spool(directory), ClientSettings("mx.mailforward.test", 2, 10),
                               RetryPolicy(), "mx.mailforward.test", passthrough_timeout,
                               clock=clock or time.time)


@pytest.fixture
def delivery(world: dict[str, Any], tmp_path: Path) -> PassThroughDelivery:
    return make_delivery(world, tmp_path / "spool")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mailforward.delivery")
    return caplog


def message(*destinations: str, sender: str = SRS_SENDER) -> Message:
    """Each destination ``x@ok.test`` is the forwarding target of the alias ``x@fwd.test``."""
    aliases = {d: d.rpartition("@")[0] + "@fwd.test" for d in destinations}
    return Message(new_queue_id(), sender, destinations, CONTENT, "192.0.2.9",
                   original_sender="sender@ext.test" if sender else "", aliases=aliases)


def recipient_lines(caplog: pytest.LogCaptureFixture, queue_id: str,
                    recipient: str) -> list[dict[str, str]]:
    """The fields of every delivery line about ``recipient`` of ``queue_id``, in order."""
    found = []
    for record in caplog.records:
        match = LINE.fullmatch(record.getMessage())
        if match and match["qid"] == queue_id and match["to"] == recipient:
            found.append({**match.groupdict(), "program": program_of(record.name)})
    return found


def only_line(caplog: pytest.LogCaptureFixture, queue_id: str, recipient: str) -> dict[str, str]:
    lines = recipient_lines(caplog, queue_id, recipient)
    assert len(lines) == 1, lines
    return lines[0]


def messages_of(caplog: pytest.LogCaptureFixture, program: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if program_of(r.name) == program]


def recipients_counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("mailforward_recipients_total", {"outcome": outcome}) or 0.0


# ---------------------------------------------------------------- one line per recipient


async def test_delivered_recipient_is_logged_as_sent_with_the_next_hops_own_reply(
        delivery: PassThroughDelivery, world: dict[str, Any],
        logs: pytest.LogCaptureFixture) -> None:
    msg = message("a@ok.test")
    assert (await delivery.deliver(msg)).code == 250
    line = only_line(logs, msg.queue_id, "a@ok.test")
    assert line["program"] == "mailforward/smtp"
    assert line["orig_to"] == "a@fwd.test"
    assert line["relay"] == f"mx.ok.test[127.0.0.2]:{world['port']}"
    assert 0 <= float(line["delay"]) < 5
    assert (line["dsn"], line["status"]) == ("2.0.0", "sent")
    assert line["reply"] == "250 2.0.0 Ok: sunk"  # the sink's answer to the final dot


async def test_deferred_recipient_is_logged_with_the_downstreams_reply(
        delivery: PassThroughDelivery, world: dict[str, Any],
        logs: pytest.LogCaptureFixture) -> None:
    msg = message("a@ok.test", "defer@ok.test")
    assert (await delivery.deliver(msg)).code == 250
    line = only_line(logs, msg.queue_id, "defer@ok.test")
    assert line["orig_to"] == "defer@fwd.test"
    assert line["relay"] == f"mx.ok.test[127.0.0.2]:{world['port']}"
    assert (line["dsn"], line["status"]) == ("4.2.0", "deferred")
    assert line["reply"] == "451 4.2.0 <defer@fwd.test>: mailbox busy"


async def test_unreachable_destination_is_deferred_with_relay_none_and_our_reason(
        delivery: PassThroughDelivery, world: dict[str, Any],
        logs: pytest.LogCaptureFixture) -> None:
    msg = message("x@dead.test")
    assert (await delivery.deliver(msg)).code == 451
    line = only_line(logs, msg.queue_id, "x@dead.test")
    assert (line["relay"], line["dsn"], line["status"]) == ("none", "4.4.1", "deferred")
    assert line["reply"] == (
        f"451 4.4.1 connect to mx.dead.test[127.0.0.4]:{world['port']}: Connection refused")


async def test_refused_recipient_is_logged_as_bounced_with_the_downstreams_reply(
        delivery: PassThroughDelivery, world: dict[str, Any],
        logs: pytest.LogCaptureFixture) -> None:
    msg = message("a@ok.test", "reject@ok.test")
    assert (await delivery.deliver(msg)).code == 250
    line = only_line(logs, msg.queue_id, "reject@ok.test")
    assert line["orig_to"] == "reject@fwd.test"
    assert line["relay"] == f"mx.ok.test[127.0.0.2]:{world['port']}"
    assert (line["dsn"], line["status"]) == ("5.1.1", "bounced")
    assert line["reply"].startswith("550 5.1.1 <reject@fwd.test>: ")


async def test_each_outcome_counts_its_recipients(delivery: PassThroughDelivery) -> None:
    before = {o: recipients_counted(o) for o in ("delivered", "deferred", "bounced")}
    await delivery.deliver(message("a@ok.test", "b@ok.test", "defer@ok.test", "reject@ok.test"))
    after = {o: recipients_counted(o) for o in ("delivered", "deferred", "bounced")}
    assert {o: after[o] - before[o] for o in after} == {"delivered": 2, "deferred": 1,
                                                        "bounced": 1}


async def test_answer_after_the_passthrough_deadline_is_logged_once_when_it_comes(
        world: dict[str, Any], tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    delivery = make_delivery(world, tmp_path / "spool", passthrough_timeout=0.5)
    msg = message("slow@ok.test")
    assert (await delivery.deliver(msg)).code == 250  # spooled, the answer still to come
    assert recipient_lines(logs, msg.queue_id, "slow@ok.test") == []
    await delivery.close(timeout=SLOW_DATA_SECONDS + 5)
    line = only_line(logs, msg.queue_id, "slow@ok.test")
    assert (line["status"], line["reply"]) == ("sent", "250 2.0.0 Ok: sunk")
    assert float(line["delay"]) >= SLOW_DATA_SECONDS - 0.5
    assert f"{msg.queue_id}: removed" in messages_of(logs, "mailforward/qmgr")


# ---------------------------------------------------------------- spooled messages


async def test_spooled_message_gets_the_queue_managers_lines(
        delivery: PassThroughDelivery, world: dict[str, Any],
        logs: pytest.LogCaptureFixture) -> None:
    world["sink"].defer = {"later@ok.test"}
    msg = message("a@ok.test", "later@ok.test")
    assert (await delivery.deliver(msg)).code == 250
    world["sink"].defer = set()
    scheduler = RetryScheduler(delivery.spool, delivery.retry_policy, delivery.attempt_spooled,
                               delivery.bounce)
    await scheduler.run_once(now=time.time() + 3600)
    assert messages_of(logs, "mailforward/qmgr") == [
        f"{msg.queue_id}: from=<{SRS_SENDER}>, size={len(CONTENT)}, nrcpt=1 (queue active)",
        f"{msg.queue_id}: removed"]
    assert [line["status"] for line in recipient_lines(logs, msg.queue_id, "later@ok.test")] == [
        "deferred", "sent"]


async def test_retry_delay_counts_from_the_arrival_not_from_the_retry(
        world: dict[str, Any], tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    clock = Clock(1_000_000.0)
    delivery = make_delivery(world, tmp_path / "spool", clock=clock)
    world["sink"].defer = {"later@ok.test"}
    msg = message("a@ok.test", "later@ok.test")
    await delivery.deliver(msg)
    world["sink"].defer = set()
    clock.advance(754.3)
    scheduler = RetryScheduler(delivery.spool, delivery.retry_policy, delivery.attempt_spooled,
                               delivery.bounce, clock=clock)
    await scheduler.run_once(now=clock())
    first, retry = recipient_lines(logs, msg.queue_id, "later@ok.test")
    assert (first["delay"], retry["delay"], retry["status"]) == ("0", "754", "sent")


async def test_attempt_stopped_at_the_schedulers_deadline_is_logged_as_deferred(
        tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool")
    msg = message("stuck@ok.test")
    spool.put(msg, msg.recipients, time.time(), 0)

    async def hang(_: SpooledMessage) -> AttemptResult:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def no_bounce(*_: Any) -> None:
        raise AssertionError("nothing to bounce")

    scheduler = RetryScheduler(spool, RetryPolicy(), hang, no_bounce, attempt_timeout=0.1)
    await scheduler.run_once(now=time.time())
    line = only_line(logs, msg.queue_id, "stuck@ok.test")
    assert (line["relay"], line["dsn"], line["status"]) == ("none", "4.4.7", "deferred")
    assert line["reply"] == "451 4.4.7 delivery attempt took too long (attempt_timeout)"


async def test_expired_message_is_logged_as_returned_to_sender(
        tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool")
    msg = message("defer@ok.test")
    now = time.time()
    spool.put(msg, msg.recipients, now - 6 * 86400, 0, errors={"defer@ok.test": "451 4.2.0 busy"})
    bounced: list[dict[str, str]] = []

    async def still_deferred(m: SpooledMessage) -> AttemptResult:
        return AttemptResult(deferred={r: "451 4.2.0 busy" for r in m.pending})

    async def bounce(_: SpooledMessage, failures: Any) -> None:
        bounced.append(dict(failures))

    before = recipients_counted("bounced")
    await RetryScheduler(spool, RetryPolicy(), still_deferred, bounce).run_once(now=now)
    assert bounced and spool.list() == []
    assert messages_of(logs, "mailforward/qmgr") == [
        f"{msg.queue_id}: from=<{SRS_SENDER}>, status=expired, returned to sender",
        f"{msg.queue_id}: removed"]
    assert recipients_counted("bounced") - before == 1


# ---------------------------------------------------------------- why: the spool and the DSN


def queue_cli(directory: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["queue", *args],
                              env={"MAILFORWARD_DELIVERY__SPOOL_DIRECTORY": str(directory)})


async def test_queue_show_has_the_downstream_reply_right_after_the_passthrough_attempt(
        delivery: PassThroughDelivery) -> None:
    msg = message("a@ok.test", "defer@ok.test")
    assert (await delivery.deliver(msg)).code == 250
    (entry,) = delivery.spool.list()
    assert (entry.attempts, dict(entry.errors)) == (
        1, {"defer@ok.test": "451 4.2.0 <defer@fwd.test>: mailbox busy"})
    shown = queue_cli(delivery.spool.directory, "show", msg.queue_id)
    assert shown.exit_code == 0, shown.output
    assert "pending:   <defer@ok.test> (451 4.2.0 <defer@fwd.test>: mailbox busy)" in shown.output


async def test_bounce_names_the_original_queue_id_in_the_log_the_spool_and_the_dsn(
        delivery: PassThroughDelivery, logs: pytest.LogCaptureFixture) -> None:
    msg = message("a@ok.test", "reject@ok.test")
    assert (await delivery.deliver(msg)).code == 250
    (dsn,) = delivery.spool.list()
    assert messages_of(logs, "mailforward/bounce") == [
        f"{msg.queue_id}: sender non-delivery notification: {dsn.queue_id}"]
    assert dsn.original_queue_id == msg.queue_id and dsn.queue_id != msg.queue_id
    content = delivery.spool.get(dsn.queue_id).content
    assert f"X-Mailforward-Queue-ID: {msg.queue_id}\r\n".encode() in content
    shown = queue_cli(delivery.spool.directory, "show", dsn.queue_id)
    assert f"reports on: {msg.queue_id}" in shown.output
    shown_json = json.loads(queue_cli(delivery.spool.directory, "show", "--json",
                                      dsn.queue_id).output)
    assert shown_json["original_queue_id"] == msg.queue_id


# ---------------------------------------------------------------- the delay field


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0, "0"), (0.004, "0"), (0.41, "0.41"), (1.25, "1.2"), (12.9, "12"), (123.7, "123"),
    (432000.5, "432000")])
def test_delay_is_written_as_postfix_writes_it_never_with_an_exponent(
        seconds: float, shown: str) -> None:
    assert format_delay(seconds) == shown
