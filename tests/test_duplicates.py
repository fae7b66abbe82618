"""Duplicate suppression: a retried message (same Message-ID, body and recipient) that
already reached the sink is answered 250 and not forwarded again; anything else is.
Real pass-through delivery to a real sink, with the in-process store and with Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mailforward.config import DatabaseSettings, DeliverySettings, LimitsSettings, Settings
from mailforward.delivery import build_delivery
from mailforward.delivery.base import Message, RecordingDelivery
from mailforward.smtpd.abuse import AbuseChecks, duplicate_keys
from mailforward.state import Store
from mailforward.state.memory import MemoryStore

from smtp_harness import Clock, ServerThread, Sink
from test_limits import attach_abuse, detach_abuse, message, send_data, session, store  # noqa: F401

SENDER = "sender@ext.test"


def suppressed(scope: str) -> float:
    return REGISTRY.get_sample_value("mailforward_duplicates_suppressed_total",
                                     {"scope": scope}) or 0.0


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as running:
        yield running


@pytest.fixture
def forwarding(seeded_database: DatabaseSettings, sink: Sink, tmp_path: Path,
               store: Store) -> Iterator[ServerThread]:  # noqa: F811
    """A server forwarding through the real pass-through delivery to ``sink``."""
    settings = Settings(delivery=DeliverySettings(relay_host=f"[127.0.0.1]:{sink.port}",
                                                  spool_directory=str(tmp_path / "spool")))
    delivery, _ = build_delivery(settings)
    running = ServerThread(seeded_database, delivery, client_connection_rate_limit=100_000)
    attach_abuse(running, LimitsSettings(), store)
    yield running
    detach_abuse(running)
    close = getattr(delivery, "close", None)
    if close is not None:
        running.loops.run(close(1.0))
    running.close()


def send(server: ServerThread, recipients: list[str], content: str) -> str:
    with session(server) as c:
        assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        for recipient in recipients:
            assert c.command(f"RCPT TO:<{recipient}>").startswith("250")
        return send_data(c, content)


def unique_id() -> str:
    return f"<{uuid.uuid4().hex}@ext.test>"


# ---------------------------------------------------------------- suppressed


def test_a_retried_message_that_reached_the_sink_is_not_forwarded_again(
        forwarding: ServerThread, sink: Sink) -> None:
    content = message(unique_id())
    assert send(forwarding, ["alice@example.org"], content).startswith("250 2.0.0 Ok: queued as ")
    assert sink.count("alice.dest@sink.test") == 1
    before = suppressed("message")
    reply = send(forwarding, ["alice@example.org"], content)  # the sender never saw our 250
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert sink.count("alice.dest@sink.test") == 1
    assert suppressed("message") == before + 1


def test_a_retry_is_forwarded_to_new_destinations_only(forwarding: ServerThread,
                                                       sink: Sink) -> None:
    content = message(unique_id())
    assert send(forwarding, ["alice@example.org"], content).startswith("250")
    before = suppressed("destination")
    assert send(forwarding, ["alice@example.org", "multi@example.org"], content).startswith("250")
    assert [sink.count(r) for r in ("alice.dest@sink.test", "a@sink.test", "b@sink2.test")] == [
        1, 1, 1]
    assert suppressed("destination") == before + 1


# ---------------------------------------------------------------- forwarded


def test_a_different_body_is_forwarded(forwarding: ServerThread, sink: Sink) -> None:
    message_id = unique_id()
    assert send(forwarding, ["alice@example.org"], message(message_id, "first")).startswith("250")
    assert send(forwarding, ["alice@example.org"], message(message_id, "second")).startswith("250")
    assert sink.count("alice.dest@sink.test") == 2


def test_the_same_message_to_another_recipient_is_forwarded(forwarding: ServerThread,
                                                             sink: Sink) -> None:
    content = message(unique_id())
    assert send(forwarding, ["alice@example.org"], content).startswith("250")
    assert send(forwarding, ["bob@forward.test"], content).startswith("250")
    assert sink.count("alice.dest@sink.test") == 1 and sink.count("bob@sink.test") == 1


def test_a_message_without_message_id_is_never_suppressed(forwarding: ServerThread,
                                                          sink: Sink) -> None:
    content = message(None)
    assert send(forwarding, ["alice@example.org"], content).startswith("250")
    assert send(forwarding, ["alice@example.org"], content).startswith("250")
    assert sink.count("alice.dest@sink.test") == 2


def test_a_deferred_delivery_is_not_remembered(forwarding: ServerThread, sink: Sink) -> None:
    content = message(unique_id())
    sink.defer = {"alice.dest@sink.test"}
    assert send(forwarding, ["alice@example.org"], content).startswith("451")  # nothing went
    sink.defer = set()
    assert send(forwarding, ["alice@example.org"], content).startswith("250")  # so it goes now
    assert sink.count("alice.dest@sink.test") == 1
    assert send(forwarding, ["alice@example.org"], content).startswith("250")
    assert sink.count("alice.dest@sink.test") == 1


def test_duplicate_window_zero_turns_suppression_off(seeded_database: DatabaseSettings,
                                                     sink: Sink, tmp_path: Path) -> None:
    settings = Settings(delivery=DeliverySettings(relay_host=f"[127.0.0.1]:{sink.port}",
                                                  spool_directory=str(tmp_path / "spool")))
    running = ServerThread(seeded_database, build_delivery(settings)[0])
    try:
        attach_abuse(running, LimitsSettings(duplicate_window=0))
        content = message(unique_id())
        assert send(running, ["alice@example.org"], content).startswith("250")
        assert send(running, ["alice@example.org"], content).startswith("250")
    finally:
        detach_abuse(running)
        running.close()
    assert sink.count("alice.dest@sink.test") == 2


def test_remembered_for_the_duplicate_window_only() -> None:
    clock = Clock()
    checks = AbuseChecks(LimitsSettings(duplicate_window=3600), MemoryStore(clock))
    delivery = RecordingDelivery()
    sent = Message("Q1", SENDER, ("a@dest.test",), message(unique_id()).encode())

    async def deliver() -> None:
        question = checks.ask_duplicates(sent.content, sent.recipients)
        await checks.deliver_once(sent, delivery, question)

    async def run() -> None:
        await deliver()
        clock.advance(3599)
        await deliver()
        clock.advance(2)
        await deliver()

    asyncio.run(run())
    assert len(delivery.messages) == 2


# ---------------------------------------------------------------- the key


async def test_the_key_is_message_id_body_and_recipient() -> None:
    base = b"Received: from x\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n"
    one = await duplicate_keys(Message("Q1", SENDER, ("r@d.test", "s@d.test"), base))
    # Our own trace field differs on a retry (queue id, time), and so may the sender
    # (SRS): neither is part of the key.
    retried = await duplicate_keys(Message("Q2", "other@x.test", ("R@D.test",),
                                           b"Received: from y\r\n" + base))
    assert retried["R@D.test"] == one["r@d.test"] != one["s@d.test"]
    other_body = await duplicate_keys(Message("Q", SENDER, ("r@d.test",),
                                              base.replace(b"body", b"bodY")))
    other_id = await duplicate_keys(Message("Q", SENDER, ("r@d.test",),
                                            base.replace(b"<a@b>", b"<a@c>")))
    assert len({one["r@d.test"], other_body["r@d.test"], other_id["r@d.test"]}) == 3
    big = b"Message-ID: <big@b>\r\n\r\n" + b"x" * 1_000_000  # hashed off the event loop
    small = b"Message-ID: <big@b>\r\n\r\n" + b"x" * 10
    assert (await duplicate_keys(Message("Q", SENDER, ("r@d.test",), bytearray(big)))
            != await duplicate_keys(Message("Q", SENDER, ("r@d.test",), small)))
    assert await duplicate_keys(Message("Q", SENDER, ("r@d.test",), b"Subject: x\r\n\r\nb")) == {}
