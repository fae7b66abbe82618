"""UTF-8 end to end: envelopes that need SMTPUTF8 are sent with it, or fail permanently.

Real sinks (``smtp_harness.Sink``) routed by MX through the loopback DNS server:
``dest.test`` and ``sender.test`` reach a sink that offers SMTPUTF8,
``plain.test`` one that does not.  Nothing here may end as an exception,
a "timed out" deferral or raw UTF-8 that the next hop never agreed to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailforward.delivery.base import Message
from mailforward.delivery.client import ACCEPTED, SMTPUTF8_UNSUPPORTED, ClientSettings
from mailforward.delivery.passthrough import PassThroughDelivery, Router
from mailforward.delivery.retry import RetryPolicy, RetryScheduler
from mailforward.delivery.routing import MxRouter
from mailforward.delivery.spool import Spool

from smtp_harness import CommonPort, Sink

CONTENT = b"From: sender@sender.test\r\nSubject: utf8\r\n\r\nbody\r\n"
SRS_SENDER = "SRS0=abcd=XY=sender.test=s\u00e9nder@fwd.test"
UTF8_TARGET = "\u00fcn\u00ef@dest.test"  # ünï@dest.test, an alias's private target
UTF8_ALIAS = "j\u00f6s\u00e9@example.org"  # jösé@example.org, what the sender wrote

ZONE = """
dest.test.        300 IN MX 10 mx.dest.test.
mx.dest.test.     300 IN A 127.0.0.2
sender.test.      300 IN MX 10 mx.dest.test.
plain.test.       300 IN MX 10 mx.plain.test.
mx.plain.test.    300 IN A 127.0.0.3
"""


@pytest.fixture(scope="module")
def world(nameserver: str) -> Iterator[dict[str, Any]]:
    """Sinks that accept everything except ``nosuch*`` (refused naming the address)."""
    utf8, plain = Sink("127.0.0.2"), Sink("127.0.0.3", smtputf8=False)
    with CommonPort([utf8, plain]) as port:
        yield {"port": port, "utf8": utf8, "plain": plain, "nameserver": nameserver}


@pytest.fixture
def delivery(world: dict[str, Any], tmp_path: Path) -> PassThroughDelivery:
    world["utf8"].reset()
    world["plain"].reset()
    router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2))
    return PassThroughDelivery(router, Spool(tmp_path / "spool"),
                               ClientSettings("mx.mailforward.test", 2, 5), RetryPolicy(),
                               "mx.mailforward.test", passthrough_timeout=5)


def message(*recipients: str, sender: str = "SRS0=abcd=XY=sender.test=s@fwd.test",
            original_sender: str = "s@sender.test") -> Message:
    """As the inbound side hands it over: no SMTPUTF8 declared, UTF-8 only in the envelope."""
    return Message("UTF8000001", sender, recipients, CONTENT, "192.0.2.9", smtputf8=False,
                   original_sender=original_sender, aliases={UTF8_TARGET: UTF8_ALIAS})


async def test_utf8_destination_reaches_a_smtputf8_sink_with_the_exact_address(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    assert (await delivery.deliver(message(UTF8_TARGET))).code == 250
    assert world["utf8"].arrivals[-1].rcpt_tos == [UTF8_TARGET]


async def test_utf8_destination_is_offered_with_the_smtputf8_parameter(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    await delivery.deliver(message(UTF8_TARGET))
    assert world["utf8"].arrivals[-1].smtp_utf8 is True


async def test_utf8_sender_reaches_a_smtputf8_sink_with_the_exact_address(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    assert (await delivery.deliver(message("a@dest.test", sender=SRS_SENDER))).code == 250
    assert world["utf8"].arrivals[-1].mail_from == SRS_SENDER


async def test_ascii_envelope_is_sent_without_smtputf8(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    await delivery.deliver(message("a@dest.test"))
    assert world["utf8"].arrivals[-1].smtp_utf8 is False


async def test_utf8_destination_at_a_hop_without_smtputf8_fails_with_553_5_6_7(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    target = "\u00fcn\u00ef@plain.test"
    msg = Message("UTF8000002", "s@fwd.test", (target,), CONTENT, aliases={target: UTF8_ALIAS})
    reply = await delivery.deliver(msg)
    assert reply == SMTPUTF8_UNSUPPORTED.about(UTF8_ALIAS)
    assert world["plain"].arrivals == [] and delivery.spool.list() == []


async def test_ascii_destination_at_that_hop_is_still_delivered(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    recipients = ["\u00fcn\u00ef@plain.test", "ascii@plain.test"]
    outcomes = await delivery.attempt(message(*recipients), recipients, timeout=5)
    assert outcomes["ascii@plain.test"] == ACCEPTED
    assert world["plain"].arrivals[-1].rcpt_tos == ["ascii@plain.test"]


async def test_utf8_sender_at_a_hop_without_smtputf8_fails_with_553_5_6_7(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("a@plain.test", sender=SRS_SENDER))
    assert reply == SMTPUTF8_UNSUPPORTED


async def test_dsn_to_a_utf8_sender_is_delivered_with_smtputf8(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    utf8_sender = "s\u00e9nder@sender.test"
    msg = message("a@dest.test", "nosuch@dest.test", sender=SRS_SENDER,
                  original_sender=utf8_sender)
    assert (await delivery.deliver(msg)).code == 250  # a@ delivered, a DSN for nosuch@ spooled
    scheduler = RetryScheduler(delivery.spool, delivery.retry_policy, delivery.attempt_spooled,
                               delivery.bounce)
    await scheduler.run_once(now=time.time() + 1)
    dsn = world["utf8"].arrivals[-1]
    assert (dsn.mail_from, dsn.rcpt_tos, dsn.smtp_utf8) == ("<>", [utf8_sender], True)
    assert delivery.spool.list() == []
