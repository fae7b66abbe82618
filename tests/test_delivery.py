"""The pass-through acknowledgement contract, against a real DNS server and real SMTP sinks.

Destinations are routed by MX through a DNS server on loopback to sinks on
127.0.0.x (``smtp_harness.Sink``), all on one port.  A sink's answer depends
on the recipient's local part: ``reject*`` -> 550, ``defer*`` -> 451,
``slow*`` -> DATA answered after 3 s, ``drop*`` -> the connection is dropped
instead of answering DATA.  The sink on 127.0.0.3 does not offer SMTPUTF8;
the one on 127.0.0.5 offers STARTTLS.  127.0.0.4 refuses connections.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailforward.delivery.base import Message, new_queue_id
from mailforward.delivery.client import (
    ACCEPTED,
    UNWRITABLE_RECIPIENT,
    UNWRITABLE_SENDER,
    ClientSettings,
)
from mailforward.delivery.passthrough import TIMED_OUT, PassThroughDelivery, Router
from mailforward.delivery.retry import RetryPolicy, RetryScheduler
from mailforward.delivery.routing import MxRouter
from mailforward.delivery.spool import Spool, SpoolError
from mailforward.smtpd.replies import Reply

from certs import write_self_signed
from smtp_harness import CommonPort, Sink

CONTENT = b"From: sender@ext.test\r\nSubject: hello\r\n\r\nbody-marker-91f2\r\n"

ZONE = """
ok.test.        300 IN MX 10 mx.ok.test.
mx.ok.test.     300 IN A 127.0.0.2
other.test.     300 IN MX 10 mx.other.test.
mx.other.test.  300 IN A 127.0.0.2
plain8.test.    300 IN MX 10 mx.plain8.test.
mx.plain8.test. 300 IN A 127.0.0.3
backup.test.    300 IN MX 10 dead.backup.test.
backup.test.    300 IN MX 20 mx.ok.test.
dead.backup.test. 300 IN A 127.0.0.4
implicit.test.  300 IN A 127.0.0.2
nullmx.test.    300 IN MX 0 .
tls.test.       300 IN MX 10 mx.tls.test.
mx.tls.test.    300 IN A 127.0.0.5
"""
SERVFAIL = ["servfail.test."]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, nameserver: str) -> Iterator[dict[str, Any]]:
    sink, plain = Sink("127.0.0.2"), Sink("127.0.0.3", smtputf8=False)
    tls = Sink("127.0.0.5", tls=write_self_signed(tmp_path_factory.mktemp("tls"), "mx.tls.test"))
    with CommonPort([sink, plain, tls], refusing=["127.0.0.4"]) as port:
        yield {"port": port, "sink": sink, "plain": plain, "tls": tls, "nameserver": nameserver}


@pytest.fixture
def delivery(world: dict[str, Any], tmp_path: Path) -> PassThroughDelivery:
    for sink in (world["sink"], world["plain"], world["tls"]):
        sink.reset()
    router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2))
    return PassThroughDelivery(router, Spool(tmp_path / "spool"), ClientSettings("mx.mailforward.test", 2, 5),
                               RetryPolicy(), "mx.mailforward.test", passthrough_timeout=1.5)


def message(*recipients: str, sender: str = "SRS0=abcd=XY=ext.test=sender@fwd.test",
            smtputf8: bool = False) -> Message:
    return Message("ABCDEF0123", sender, recipients, CONTENT, "192.0.2.9", smtputf8,
                   original_sender="sender@ext.test" if sender else "")


def spooled(delivery: PassThroughDelivery) -> list[Any]:
    return delivery.spool.list()


async def test_all_destinations_accepted_is_250(delivery: PassThroughDelivery,
                                                world: dict[str, Any]) -> None:
    reply = await delivery.deliver(message("a@ok.test", "b@other.test"))
    assert reply.code == 250 and reply.status == "2.0.0"
    assert sorted(r for a in world["sink"].arrivals for r in a.rcpt_tos) == ["a@ok.test", "b@other.test"]
    assert spooled(delivery) == []


async def test_one_transaction_per_domain(delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    await delivery.deliver(message("a@ok.test", "b@ok.test"))
    assert [a.rcpt_tos for a in world["sink"].arrivals] == [["a@ok.test", "b@ok.test"]]


async def test_envelope_sender_is_passed_on(delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    await delivery.deliver(message("a@ok.test"))
    assert world["sink"].arrivals[0].mail_from == "SRS0=abcd=XY=ext.test=sender@fwd.test"


async def test_all_rejected_passes_the_downstream_5xx_back(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("reject1@ok.test", "reject2@other.test"))
    assert (reply.code, reply.status) == (550, "5.1.1")
    assert reply.text.startswith("<reject") and "No such user here" in reply.text
    assert spooled(delivery) == []  # nothing stored, no DSN


async def test_all_deferred_is_451_and_nothing_is_stored(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("defer1@ok.test", "defer2@other.test"))
    assert reply.code == 451 and reply.status.startswith("4.")
    assert spooled(delivery) == []


async def test_mixed_accepted_and_deferred_spools_the_remainder(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("a@ok.test", "defer@other.test"))
    assert reply.code == 250
    (entry,) = spooled(delivery)
    assert list(entry.pending) == ["defer@other.test"]


async def test_mixed_accepted_and_rejected_sends_a_dsn_to_the_original_sender(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("a@ok.test", "reject@other.test"))
    assert reply.code == 250
    (dsn,) = spooled(delivery)
    assert dsn.sender == "" and list(dsn.pending) == ["sender@ext.test"]
    content = delivery.spool.get(dsn.queue_id).content
    assert b"reject@other.test" in content and b"body-marker-91f2" not in content


async def test_no_dsn_for_the_null_sender(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("a@ok.test", "reject@other.test", sender=""))
    assert reply.code == 250
    assert spooled(delivery) == []


async def test_slow_destination_is_spooled_after_the_passthrough_timeout(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("slow@ok.test"))
    assert reply.code == 250
    assert [list(e.pending) for e in spooled(delivery)] == [["slow@ok.test"]]


async def test_unwritable_spool_is_451_never_250(world: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2))
    spool = Spool(tmp_path / "spool")
    delivery = PassThroughDelivery(router, spool, ClientSettings("mx.test", 2, 5), RetryPolicy(),
                                   "mx.test", passthrough_timeout=1.5)
    spool.directory = blocker / "spool"  # type: ignore[misc]
    reply = await delivery.deliver(message("a@ok.test", "defer@other.test"))
    assert (reply.code, reply.status) == (451, "4.3.0")


async def test_null_mx_is_a_permanent_failure(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("x@nullmx.test"))
    assert (reply.code, reply.status) == (556, "5.1.10")


async def test_nxdomain_is_a_permanent_failure(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("x@nowhere.test"))
    assert reply.code == 550


async def test_servfail_is_a_temporary_failure(delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("x@servfail.test"))
    assert reply.code == 451


async def test_domain_without_mx_uses_its_address(delivery: PassThroughDelivery,
                                                  world: dict[str, Any]) -> None:
    assert (await delivery.deliver(message("x@implicit.test"))).code == 250
    assert world["sink"].arrivals[-1].rcpt_tos == ["x@implicit.test"]


async def test_unreachable_mx_falls_back_to_the_next(delivery: PassThroughDelivery,
                                                     world: dict[str, Any]) -> None:
    assert (await delivery.deliver(message("x@backup.test"))).code == 250
    assert world["sink"].arrivals[-1].rcpt_tos == ["x@backup.test"]


async def test_smtputf8_message_to_a_server_without_it_fails_clearly(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("x@plain8.test", smtputf8=True))
    assert (reply.code, reply.status) == (553, "5.6.7")


async def test_spooled_remainder_is_delivered_by_the_scheduler_once_the_destination_recovers(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    from mailforward.delivery.retry import RetryScheduler
    world["sink"].defer = {"later@other.test"}
    assert (await delivery.deliver(message("a@ok.test", "later@other.test"))).code == 250
    world["sink"].defer = set()
    scheduler = RetryScheduler(delivery.spool, delivery.retry_policy, delivery.attempt_spooled,
                               delivery.bounce)
    await scheduler.run_once(now=time.time() + 3600)
    assert spooled(delivery) == []
    delivered = [a.rcpt_tos for a in world["sink"].arrivals]
    assert delivered.count(["a@ok.test"]) == 1 and delivered.count(["later@other.test"]) == 1


async def test_permanent_failure_on_retry_bounces_to_the_original_sender(
        delivery: PassThroughDelivery) -> None:
    assert (await delivery.deliver(message("a@ok.test", "later@nullmx.test", "defer@ok.test"))).code == 250
    entries = spooled(delivery)
    assert [list(e.pending) for e in entries if e.sender] == [["defer@ok.test"]]
    dsn = [e for e in entries if not e.sender]
    assert [list(e.pending) for e in dsn] == [["sender@ext.test"]]  # later@nullmx.test failed at once


async def test_connection_dropped_before_the_data_reply_is_a_deferral(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(message("drop@ok.test"))
    assert reply.code == 451 and reply.status.startswith("4.4.")
    assert spooled(delivery) == []  # the sender still holds it and retries


async def test_connection_dropped_at_one_next_hop_spools_only_its_recipients(
        delivery: PassThroughDelivery) -> None:
    # plain8.test has its own next hop; other.test shares ok.test's, and so its transaction
    assert (await delivery.deliver(message("a@ok.test", "drop@plain8.test"))).code == 250
    assert [list(e.pending) for e in spooled(delivery)] == [["drop@plain8.test"]]


async def test_starttls_is_used_when_the_destination_offers_it(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    assert (await delivery.deliver(message("x@tls.test"))).code == 250
    assert world["tls"].arrivals[-1].tls is True


async def test_destination_without_starttls_gets_the_message_in_plain_text(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    assert (await delivery.deliver(message("x@ok.test"))).code == 250
    assert [a.tls for a in world["sink"].arrivals] == [False]


# ---------------------------------------------------------------- what cannot be sent, what raises


@pytest.mark.parametrize("sender", ["a b@ext.test", "a\x1bb@ext.test", "a@b@ext.test",
                                    "a\u00a0b@ext.test"])
async def test_sender_that_cannot_be_written_fails_permanently_with_553_5_1_7(
        delivery: PassThroughDelivery, sender: str) -> None:
    reply = await delivery.deliver(message("a@ok.test", sender=sender))
    assert reply == UNWRITABLE_SENDER
    assert spooled(delivery) == []  # refused back to the sender, never parked in the spool


async def test_recipient_that_cannot_be_written_fails_permanently_with_553_5_1_3(
        delivery: PassThroughDelivery) -> None:
    outcomes = await delivery.attempt(message("c d@ok.test"), ["c d@ok.test"], timeout=5)
    assert outcomes == {"c d@ok.test": UNWRITABLE_RECIPIENT.about("c d@ok.test")}


async def test_other_recipients_of_the_domain_are_delivered_despite_one_unwritable(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    outcomes = await delivery.attempt(message("a@ok.test", "c d@ok.test"),
                                      ["a@ok.test", "c d@ok.test"], timeout=5)
    assert outcomes["a@ok.test"] == ACCEPTED
    assert world["sink"].arrivals[-1].rcpt_tos == ["a@ok.test"]


@pytest.fixture
def misconfigured(world: dict[str, Any], tmp_path: Path) -> PassThroughDelivery:
    """Every attempt raises: the relay host is not valid relayhost syntax (ConfigError)."""
    router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2),
                    relay_host="[unclosed")
    return PassThroughDelivery(router, Spool(tmp_path / "spool"), ClientSettings("mx.test", 2, 5),
                               RetryPolicy(), "mx.test", passthrough_timeout=1.5)


INTERNAL_CONFIG_ERROR = Reply(451, "4.3.0", "internal error (ConfigError)")


async def test_unexpected_error_is_451_4_3_0_naming_only_the_exception_type(
        misconfigured: PassThroughDelivery) -> None:
    reply = await misconfigured.deliver(message("a@ok.test"))
    assert reply == INTERNAL_CONFIG_ERROR


async def test_unexpected_error_is_never_reported_as_a_timeout(
        misconfigured: PassThroughDelivery) -> None:
    outcomes = await misconfigured.attempt(message("a@ok.test"), ["a@ok.test"], timeout=5)
    assert TIMED_OUT not in outcomes.values()


async def test_spooled_message_whose_attempt_raised_records_the_true_reason(
        misconfigured: PassThroughDelivery) -> None:
    now = time.time()
    misconfigured.spool.put(message("a@ok.test"), ["a@ok.test"], now, now)
    scheduler = RetryScheduler(misconfigured.spool, misconfigured.retry_policy,
                               misconfigured.attempt_spooled, misconfigured.bounce)
    await scheduler.run_once(now)
    assert misconfigured.spool.get("ABCDEF0123").errors == {"a@ok.test": str(INTERNAL_CONFIG_ERROR)}


async def test_traceback_of_an_unexpected_error_is_logged_once_not_on_every_retry(
        misconfigured: PassThroughDelivery, caplog: pytest.LogCaptureFixture) -> None:
    queue_id = new_queue_id()
    now = time.time()
    msg = Message(queue_id, "sender@ext.test", ("a@ok.test",), CONTENT)
    misconfigured.spool.put(msg, msg.recipients, now, now)
    scheduler = RetryScheduler(misconfigured.spool, misconfigured.retry_policy,
                               misconfigured.attempt_spooled, misconfigured.bounce)
    for later in (0, 3600, 7200):
        await scheduler.run_once(now + later)
    tracebacks = [r for r in caplog.records if r.exc_info and queue_id in r.getMessage()]
    assert len(tracebacks) == 1 and tracebacks[0].levelname == "ERROR"


async def test_acceptance_counts_even_when_recording_it_fails(
        delivery: PassThroughDelivery) -> None:
    async def unrecordable(accepted: list[str]) -> None:
        raise SpoolError("cannot write spool file: disk full")

    outcomes = await delivery.attempt(message("a@ok.test"), ["a@ok.test"], timeout=None,
                                      on_delivered=unrecordable)
    assert outcomes == {"a@ok.test": ACCEPTED}  # deferring it would deliver it twice


def odd_size(ehlo: list[str]) -> list[str]:
    """Advertises ``SIZE ²``: a digit to str.isdigit(), not to int()."""
    return [("250-SIZE \u00b2" if line.startswith("250-SIZE") else line) for line in ehlo]


async def test_size_the_next_hop_writes_with_non_ascii_digits_is_ignored(
        world: dict[str, Any], tmp_path: Path) -> None:
    with Sink(data_size_limit=1000, ehlo=odd_size) as sink:
        router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2),
                        relay_host=f"[127.0.0.1]:{sink.port}")
        delivery = PassThroughDelivery(router, Spool(tmp_path / "spool"),
                                       ClientSettings("mx.test", 2, 5), RetryPolicy(), "mx.test",
                                       passthrough_timeout=5)
        assert (await delivery.deliver(message("a@ok.test"))).code == 250
        assert [a.rcpt_tos for a in sink.arrivals] == [["a@ok.test"]]  # not parked
