"""The forwarding target stays private: replies and DSNs name the alias the sender used.

A real sink behind the loopback DNS server answers like Postfix does, echoing
the recipient it refused.  What the sender may see -- the reply passed back
in the same session, the DSN spooled for it, the bounce after a retry --
must name the alias, never the target.
"""

from __future__ import annotations

import email
import time
from collections.abc import Iterator
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailforward.delivery.base import Message
from mailforward.delivery.client import ClientSettings
from mailforward.delivery.passthrough import PassThroughDelivery, Router
from mailforward.delivery.retry import RetryPolicy, RetryScheduler
from mailforward.delivery.routing import MxRouter
from mailforward.delivery.spool import Spool
from mailforward.smtpd.replies import Reply

from smtp_harness import USER_UNKNOWN as UNKNOWN
from smtp_harness import Sink
from test_dsn import status_blocks as dsn_status_blocks

CONTENT = b"From: sender@ext.test\r\nTo: friend@alias.test\r\nSubject: hi\r\n\r\nbody\r\n"
ZONE = """
dest.test.     300 IN MX 10 mx.dest.test.
mx.dest.test.  300 IN A 127.0.0.2
"""
SRS_SENDER = "SRS0=abcd=XY=ext.test=sender@fwd.test"
SENDER = "sender@ext.test"


@pytest.fixture(scope="module")
def world(nameserver: str) -> Iterator[dict[str, Any]]:
    """The sink refuses ``nosuch*`` naming the address in brackets (Postfix's ``UNKNOWN``
    text), ``shout*`` naming it upper-cased and bare, ``reject*`` without naming it;
    it defers ``defer*`` naming it."""
    with Sink("127.0.0.2") as sink:
        yield {"port": sink.port, "sink": sink, "nameserver": nameserver}


@pytest.fixture
def delivery(world: dict[str, Any], tmp_path: Path) -> PassThroughDelivery:
    world["sink"].reset()
    router = Router(MxRouter([world["nameserver"]], port=world["port"], timeout=2))
    return PassThroughDelivery(router, Spool(tmp_path / "spool"),
                               ClientSettings("mx.mailforward.test", 2, 5), RetryPolicy(),
                               "mx.mailforward.test", passthrough_timeout=5)


def forwarded(*targets: str) -> Message:
    """``friend@alias.test`` and ``pal@alias.test`` forward to ``targets`` (in that order)."""
    aliases = dict(zip(targets, ["friend@alias.test", "pal@alias.test"], strict=False))
    return Message("PRIV000001", SRS_SENDER, targets, CONTENT, "192.0.2.9",
                   original_sender=SENDER, aliases=aliases)


def the_dsn(delivery: PassThroughDelivery) -> bytes:
    (entry,) = [e for e in delivery.spool.list() if not e.sender]
    content: bytes = delivery.spool.get(entry.queue_id).content
    return content


def status_blocks(dsn: bytes) -> list[EmailMessage]:
    """The per-recipient blocks of the DSN's message/delivery-status part."""
    return dsn_status_blocks(dsn)[1:]


# --- replies passed back in the session


async def test_downstream_refusal_names_the_alias_not_the_target(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(forwarded("nosuch@dest.test"))
    assert reply == Reply(550, "5.1.1", f"<friend@alias.test>: {UNKNOWN}")


async def test_downstream_refusal_without_an_address_is_prefixed_with_the_alias(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(forwarded("reject@dest.test"))
    assert reply == Reply(550, "5.1.1", "<friend@alias.test>: No such user here")


async def test_target_is_hidden_whatever_its_case_and_brackets(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(forwarded("shout@dest.test"))
    assert reply == Reply(550, "5.1.1",
                          "<friend@alias.test>: mailbox friend@alias.test does not exist")


async def test_downstream_deferral_passed_back_names_the_alias(
        delivery: PassThroughDelivery) -> None:
    reply = await delivery.deliver(forwarded("defer@dest.test"))
    assert reply == Reply(451, "4.2.0", "<friend@alias.test>: mailbox busy")


# --- DSNs


async def test_dsn_reports_the_alias_as_final_and_original_recipient(
        delivery: PassThroughDelivery) -> None:
    await delivery.deliver(forwarded("ok@dest.test", "nosuch@dest.test"))
    [block] = status_blocks(the_dsn(delivery))
    assert (block["Final-Recipient"], block["Original-Recipient"]) == (
        "rfc822; pal@alias.test", "rfc822; pal@alias.test")


async def test_dsn_diagnostic_code_names_the_alias(delivery: PassThroughDelivery) -> None:
    await delivery.deliver(forwarded("ok@dest.test", "nosuch@dest.test"))
    [block] = status_blocks(the_dsn(delivery))
    assert " ".join(block["Diagnostic-Code"].split()) == (
        f"smtp; 550 5.1.1 <pal@alias.test>: {UNKNOWN}")


async def test_dsn_is_addressed_to_the_original_sender_not_the_srs_address(
        delivery: PassThroughDelivery) -> None:
    await delivery.deliver(forwarded("ok@dest.test", "nosuch@dest.test"))
    assert email.message_from_bytes(the_dsn(delivery))["To"] == SENDER


async def test_target_appears_nowhere_in_the_dsn(delivery: PassThroughDelivery) -> None:
    await delivery.deliver(forwarded("ok@dest.test", "nosuch@dest.test"))
    assert b"nosuch@dest.test" not in the_dsn(delivery).lower()


async def test_bounce_after_a_retry_still_names_only_the_alias(
        delivery: PassThroughDelivery, world: dict[str, Any]) -> None:
    world["sink"].defer = {"later@dest.test"}
    assert (await delivery.deliver(forwarded("ok@dest.test", "later@dest.test"))).code == 250
    world["sink"].defer, world["sink"].refuse = set(), {"later@dest.test"}  # the retry bounces it
    scheduler = RetryScheduler(delivery.spool, delivery.retry_policy, delivery.attempt_spooled,
                               delivery.bounce)
    await scheduler.run_once(now=time.time() + 3600)
    dsn = the_dsn(delivery)
    assert b"later@dest.test" not in dsn.lower()
    assert [b["Final-Recipient"] for b in status_blocks(dsn)] == ["rfc822; pal@alias.test"]


def test_our_own_words_naming_the_targets_next_hop_reach_the_sender_as_a_neutral_text() -> None:
    from mailforward.delivery.base import OUR_OWN_FAILURE, for_the_sender
    text = for_the_sender("451 4.4.1 connect to mx.secret-target.test[192.0.2.9]:25: "
                          "Connection refused", "friend@alias.test")
    assert text == f"451 4.4.1 <friend@alias.test>: {OUR_OWN_FAILURE}"
    assert for_the_sender("451 4.4.3 <secret-target.test>: Host or domain name not found",
                          "friend@alias.test") == f"451 4.4.3 <friend@alias.test>: {OUR_OWN_FAILURE}"


def test_the_downstreams_own_words_about_the_alias_pass_unchanged() -> None:
    from mailforward.delivery.base import for_the_sender
    reply = "451 4.2.0 <friend@alias.test>: Mailbox busy, try later"
    assert for_the_sender(reply, "friend@alias.test") == reply
