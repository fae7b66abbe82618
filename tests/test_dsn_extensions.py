"""RFC 3461 (DSN) and RFC 6152 (8BITMIME) on the delivery side, against real SMTP sinks.

The sinks are aiosmtpd servers on loopback, bound to port 0 in the test's
own event loop.  aiosmtpd itself knows no DSN: :class:`RecordingSMTP` records
MAIL and RCPT exactly as they arrived, then hands aiosmtpd the command
without the DSN parameters; what a sink advertises is edited in its EHLO
hook.  Domains are routed to the sinks by :class:`SinkRouter`:

* ``dsn.test``   offers DSN and 8BITMIME;
* ``nodsn.test`` offers 8BITMIME but not DSN;
* ``7bit.test``  offers neither.

At every sink a ``reject*`` local part is refused with 550, a ``later*`` one
deferred with 451.  Forwarding targets are private: each destination here is
the target of an alias the sender used, and the tests check that the DSNs
we write name the alias (or the client's ORCPT), never the target.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Mapping
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from mailforward.delivery.base import Message, RecipientDsn
from mailforward.delivery.client import EIGHT_BIT_UNSUPPORTED, ClientSettings
from mailforward.delivery.passthrough import PassThroughDelivery, Router
from mailforward.delivery.retry import RetryPolicy, RetryScheduler
from mailforward.delivery.routing import MxRouter, NextHop
from mailforward.delivery.spool import Spool

SENDER = "sender@ext.test"
SRS_SENDER = "SRS0=abcd=XY=ext.test=sender@fwd.test"
BODY_MARKER = b"body-marker-5d1e"
CONTENT = (b"From: sender@ext.test\r\nTo: friend@alias.test\r\nSubject: hello\r\n\r\n"
           + BODY_MARKER + b"\r\n")
EIGHT_BIT = (b"From: sender@ext.test\r\nSubject: caf\xc3\xa9\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             b"Gr\xc3\xbc\xc3\x9fe\r\n")
ENVID = "Env-Id.7f+2B1"  # xtext of "Env-Id.7f+1": case and encoding must survive
ORCPT = "rfc822;friend+2Btag@alias.test"  # xtext of friend+tag@alias.test


class Sink:
    """An aiosmtpd handler that records what arrived and advertises what it is told."""

    def __init__(self, offer_dsn: bool, offer_8bitmime: bool) -> None:
        self.offer_dsn = offer_dsn
        self.offer_8bitmime = offer_8bitmime
        self.mail: list[str] = []  # MAIL arguments as sent: "FROM:<a> SIZE=1 ..."
        self.rcpt: list[str] = []  # RCPT arguments as sent
        self.envelopes: list[Any] = []
        self.port = 0

    def mail_parameters(self) -> list[str]:
        return self.mail[-1].split()[1:]

    def rcpt_parameters(self) -> list[list[str]]:
        return [arg.split()[1:] for arg in self.rcpt]

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [r for r in responses if self.offer_8bitmime or r != "250-8BITMIME"]
        if self.offer_dsn:
            lines.insert(-1, "250-DSN")
        return lines

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        local = address.partition("@")[0]
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        if local.startswith("later"):
            return "451 4.2.0 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: sunk"


class RecordingSMTP(SMTP):
    """Records MAIL and RCPT as sent, then lets aiosmtpd (which refuses them) see no DSN."""

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.event_handler.mail.append(arg or "")
        await super().smtp_MAIL(_without(arg, {"RET", "ENVID"}))

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.event_handler.rcpt.append(arg or "")
        await super().smtp_RCPT(_without(arg, {"NOTIFY", "ORCPT"}))


def _without(arg: str | None, names: set[str]) -> str | None:
    if arg is None:
        return None
    return " ".join(w for w in arg.split(" ") if w.partition("=")[0].upper() not in names)


class SinkRouter(Router):
    """Each test domain to its sink on 127.0.0.1."""

    def __init__(self, sinks: Mapping[str, Sink]) -> None:
        super().__init__(MxRouter())
        self.sinks = sinks

    async def next_hops(self, domain: str) -> list[NextHop]:
        return [NextHop(f"mx.{domain}", "127.0.0.1", self.sinks[domain].port)]


@pytest.fixture
async def sinks() -> AsyncIterator[dict[str, Sink]]:
    loop = asyncio.get_running_loop()
    made = {"dsn.test": Sink(offer_dsn=True, offer_8bitmime=True),
            "nodsn.test": Sink(offer_dsn=False, offer_8bitmime=True),
            "7bit.test": Sink(offer_dsn=False, offer_8bitmime=False)}
    servers = []
    for sink in made.values():
        server = await loop.create_server(lambda s=sink: RecordingSMTP(s), "127.0.0.1", 0)
        sink.port = server.sockets[0].getsockname()[1]
        servers.append(server)
    yield made
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
def delivery(sinks: dict[str, Sink], tmp_path: Path) -> PassThroughDelivery:
    return PassThroughDelivery(SinkRouter(sinks), Spool(tmp_path / "spool"),
                               ClientSettings("mx.mailforward.test", 2, 5), RetryPolicy(),
                               "mx.mailforward.test", passthrough_timeout=5)


def message(*targets: str, content: bytes = CONTENT, body: str = "", ret: str = "",
            envid: str = "", dsn: Mapping[str, RecipientDsn] | None = None) -> Message:
    """``targets`` are private: the sender wrote alias1@alias.test, alias2@alias.test, ..."""
    aliases = {target: f"alias{n}@alias.test" for n, target in enumerate(targets, 1)}
    return Message("DSNX000001", SRS_SENDER, targets, content, "192.0.2.9",
                   original_sender=SENDER, aliases=aliases, body=body, dsn_ret=ret,
                   dsn_envid=envid, dsn=dict(dsn or {}))


def our_dsns(delivery: PassThroughDelivery) -> list[bytes]:
    """The DSNs we spooled (from the null sender), in no particular order."""
    return [delivery.spool.get(e.queue_id).content for e in delivery.spool.list() if not e.sender]


def the_dsn(delivery: PassThroughDelivery) -> bytes:
    (dsn,) = our_dsns(delivery)
    return dsn


def parts(dsn: bytes) -> list[EmailMessage]:
    payload = email.message_from_bytes(dsn, policy=email.policy.compat32).get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(dsn: bytes) -> list[EmailMessage]:
    """The per-message block, then one block per recipient."""
    blocks = parts(dsn)[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def scheduler(delivery: PassThroughDelivery) -> RetryScheduler:
    return RetryScheduler(delivery.spool, RetryPolicy(), delivery.attempt_spooled,
                          delivery.bounce, clock=lambda: 0.0)


async def retry_spooled(delivery: PassThroughDelivery, msg: Message) -> None:
    """Spool ``msg`` as a pass-through attempt would have, then let the scheduler retry it."""
    delivery.spool.put(msg, msg.recipients, 0.0, 0.0)
    await scheduler(delivery).run_once(0.0)


# --- DSN parameters passed to the next hop


async def test_ret_and_envid_reach_a_next_hop_that_offers_dsn(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    assert (await delivery.deliver(message("t@dsn.test", ret="HDRS", envid=ENVID))).code == 250
    params = sinks["dsn.test"].mail_parameters()
    assert "RET=HDRS" in params and f"ENVID={ENVID}" in params


async def test_notify_and_orcpt_reach_a_next_hop_that_offers_dsn(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    dsn = {"t@dsn.test": RecipientDsn("SUCCESS,FAILURE", ORCPT)}
    assert (await delivery.deliver(message("t@dsn.test", dsn=dsn))).code == 250
    assert sinks["dsn.test"].rcpt_parameters() == [["NOTIFY=SUCCESS,FAILURE", f"ORCPT={ORCPT}"]]


async def test_each_destination_gets_the_dsn_parameters_of_its_own_rcpt(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    dsn = {"a@dsn.test": RecipientDsn("NEVER", ""), "b@dsn.test": RecipientDsn("", ORCPT)}
    await delivery.deliver(message("a@dsn.test", "b@dsn.test", "c@dsn.test", dsn=dsn))
    assert sinks["dsn.test"].rcpt_parameters() == [["NOTIFY=NEVER"], [f"ORCPT={ORCPT}"], []]


async def test_dsn_parameters_are_dropped_for_a_next_hop_without_dsn(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    dsn = {"t@nodsn.test": RecipientDsn("FAILURE", ORCPT)}
    msg = message("t@nodsn.test", ret="FULL", envid=ENVID, dsn=dsn)
    assert (await delivery.deliver(msg)).code == 250
    sink = sinks["nodsn.test"]
    assert not any(p.startswith(("RET=", "ENVID=")) for p in sink.mail_parameters())
    assert sink.rcpt_parameters() == [[]]


async def test_spooled_message_keeps_its_dsn_parameters_for_the_retry(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    dsn = {"t@dsn.test": RecipientDsn("FAILURE", ORCPT)}
    await retry_spooled(delivery, message("t@dsn.test", ret="HDRS", envid=ENVID, dsn=dsn))
    sink = sinks["dsn.test"]
    assert len(sink.envelopes) == 1
    assert {"RET=HDRS", f"ENVID={ENVID}"} <= set(sink.mail_parameters())
    assert sink.rcpt_parameters() == [["NOTIFY=FAILURE", f"ORCPT={ORCPT}"]]


# --- NOTIFY in our own DSNs


async def test_failed_recipient_without_notify_gets_a_dsn(delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test"))
    assert len(our_dsns(delivery)) == 1


async def test_notify_never_suppresses_our_failure_dsn(delivery: PassThroughDelivery) -> None:
    dsn = {"reject@dsn.test": RecipientDsn("NEVER", "")}
    assert (await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", dsn=dsn))).code == 250
    assert our_dsns(delivery) == []


async def test_notify_success_alone_suppresses_the_failure_dsn(
        delivery: PassThroughDelivery) -> None:
    dsn = {"reject@dsn.test": RecipientDsn("SUCCESS", "")}
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", dsn=dsn))
    assert our_dsns(delivery) == []


async def test_failure_dsn_names_only_the_recipients_that_asked_for_one(
        delivery: PassThroughDelivery) -> None:
    dsn = {"reject1@dsn.test": RecipientDsn("NEVER", ""),
           "reject2@dsn.test": RecipientDsn("FAILURE", "")}
    await delivery.deliver(message("ok@dsn.test", "reject1@dsn.test", "reject2@dsn.test", dsn=dsn))
    blocks = status_blocks(the_dsn(delivery))[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; alias3@alias.test"]


async def test_notify_never_suppresses_the_bounce_of_a_retry(delivery: PassThroughDelivery) -> None:
    dsn = {"reject@dsn.test": RecipientDsn("NEVER", "")}
    await retry_spooled(delivery, message("reject@dsn.test", dsn=dsn))
    assert our_dsns(delivery) == []
    assert delivery.spool.list() == []  # failed, not retried for ever


async def test_notify_never_suppresses_the_expiry_bounce(delivery: PassThroughDelivery) -> None:
    msg = message("later@dsn.test", dsn={"later@dsn.test": RecipientDsn("NEVER", "")})
    delivery.spool.put(msg, msg.recipients, -RetryPolicy().max_lifetime, 0.0)
    await scheduler(delivery).run_once(0.0)
    assert delivery.spool.list() == []


# --- RET, ENVID and ORCPT in our own DSNs


async def test_ret_hdrs_returns_the_headers_only(delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", ret="HDRS"))
    dsn = the_dsn(delivery)
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert BODY_MARKER not in dsn


async def test_ret_full_returns_the_whole_message(delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", ret="FULL"))
    returned = parts(the_dsn(delivery))[2]
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.get_payload()
    assert original["Subject"] == "hello" and original.get_payload() == BODY_MARKER.decode() + "\r\n"


async def test_ret_full_of_a_large_message_returns_the_headers_only(
        delivery: PassThroughDelivery) -> None:
    large = CONTENT + (b"x" * 70 + b"\r\n") * 1000  # 72 kB, above Postfix's bounce_size_limit
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", content=large, ret="FULL"))
    assert parts(the_dsn(delivery))[2].get_content_type() == "text/rfc822-headers"


async def test_retry_bounce_with_ret_full_returns_the_whole_message(
        delivery: PassThroughDelivery) -> None:
    await retry_spooled(delivery, message("reject@dsn.test", ret="FULL"))
    assert parts(the_dsn(delivery))[2].get_content_type() == "message/rfc822"


async def test_returned_message_never_names_the_target(delivery: PassThroughDelivery) -> None:
    content = b"To: Reject@DSN.test\r\nSubject: s\r\n\r\nsent to reject@dsn.test\r\n"
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", content=content, ret="FULL"))
    dsn = the_dsn(delivery)
    assert b"reject@dsn.test" not in dsn.lower() and b"sent to alias2@alias.test" in dsn


async def test_envid_is_the_original_envelope_id_of_the_report(
        delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", envid=ENVID))
    assert status_blocks(the_dsn(delivery))[0]["Original-Envelope-Id"] == "Env-Id.7f+1"


async def test_orcpt_is_the_original_recipient_of_the_report(
        delivery: PassThroughDelivery) -> None:
    dsn = {"reject@dsn.test": RecipientDsn("", ORCPT)}
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test", dsn=dsn))
    block = status_blocks(the_dsn(delivery))[1]
    assert (block["Original-Recipient"], block["Final-Recipient"]) == (
        "rfc822; friend+tag@alias.test", "rfc822; alias2@alias.test")


async def test_without_orcpt_the_original_recipient_is_the_alias(
        delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("ok@dsn.test", "reject@dsn.test"))
    assert status_blocks(the_dsn(delivery))[1]["Original-Recipient"] == "rfc822; alias2@alias.test"


async def test_retry_bounce_keeps_envid_and_orcpt(delivery: PassThroughDelivery) -> None:
    dsn = {"reject@dsn.test": RecipientDsn("FAILURE", ORCPT)}
    await retry_spooled(delivery, message("reject@dsn.test", envid=ENVID, dsn=dsn))
    blocks = status_blocks(the_dsn(delivery))
    assert (blocks[0]["Original-Envelope-Id"], blocks[1]["Original-Recipient"]) == (
        "Env-Id.7f+1", "rfc822; friend+tag@alias.test")


# --- NOTIFY=SUCCESS at a next hop without DSN: a "relayed" DSN from us


async def test_notify_success_at_a_hop_without_dsn_gets_a_relayed_dsn(
        delivery: PassThroughDelivery) -> None:
    dsn = {"t@nodsn.test": RecipientDsn("SUCCESS", "")}
    assert (await delivery.deliver(message("t@nodsn.test", dsn=dsn))).code == 250
    block = status_blocks(the_dsn(delivery))[1]
    assert (block["Action"], block["Status"], block["Final-Recipient"]) == (
        "relayed", "2.0.0", "rfc822; alias1@alias.test")


async def test_relayed_dsn_returns_the_headers_only_whatever_ret_says(
        delivery: PassThroughDelivery) -> None:
    dsn = {"t@nodsn.test": RecipientDsn("SUCCESS", "")}
    await delivery.deliver(message("t@nodsn.test", ret="FULL", dsn=dsn))
    assert parts(the_dsn(delivery))[2].get_content_type() == "text/rfc822-headers"


async def test_notify_success_at_a_hop_with_dsn_is_left_to_that_hop(
        delivery: PassThroughDelivery) -> None:
    dsn = {"t@dsn.test": RecipientDsn("SUCCESS", "")}
    await delivery.deliver(message("t@dsn.test", dsn=dsn))
    assert our_dsns(delivery) == []


async def test_no_relayed_dsn_without_notify_success(delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("t@nodsn.test"))
    assert our_dsns(delivery) == []


async def test_retry_to_a_hop_without_dsn_sends_the_relayed_dsn(
        delivery: PassThroughDelivery) -> None:
    await retry_spooled(delivery, message("t@nodsn.test",
                                          dsn={"t@nodsn.test": RecipientDsn("SUCCESS", "")}))
    assert status_blocks(the_dsn(delivery))[1]["Action"] == "relayed"


# --- BODY and 8-bit content


async def test_declared_8bitmime_is_passed_to_a_hop_that_offers_it(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    await delivery.deliver(message("t@dsn.test", content=EIGHT_BIT, body="8BITMIME"))
    assert "BODY=8BITMIME" in sinks["dsn.test"].mail_parameters()


async def test_undeclared_8bit_content_is_sent_as_8bitmime(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    await delivery.deliver(message("t@dsn.test", content=EIGHT_BIT))
    assert "BODY=8BITMIME" in sinks["dsn.test"].mail_parameters()


async def test_8bit_content_arrives_unchanged(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    await delivery.deliver(message("t@dsn.test", content=EIGHT_BIT, body="8BITMIME"))
    assert sinks["dsn.test"].envelopes[-1].content == EIGHT_BIT


async def test_declared_7bit_is_passed_to_a_hop_that_offers_8bitmime(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    await delivery.deliver(message("t@dsn.test", body="7BIT"))
    assert "BODY=7BIT" in sinks["dsn.test"].mail_parameters()


async def test_7bit_message_is_sent_without_body_to_a_hop_without_8bitmime(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    assert (await delivery.deliver(message("t@7bit.test", body="8BITMIME"))).code == 250
    assert not any(p.startswith("BODY=") for p in sinks["7bit.test"].mail_parameters())


async def test_8bit_message_to_a_hop_without_8bitmime_fails_with_5_6_3_and_nothing_is_sent(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    reply = await delivery.deliver(message("t@7bit.test", content=EIGHT_BIT, body="8BITMIME"))
    assert reply == EIGHT_BIT_UNSUPPORTED
    assert (sinks["7bit.test"].mail, sinks["7bit.test"].envelopes) == ([], [])


async def test_undeclared_8bit_message_to_a_hop_without_8bitmime_fails_too(
        delivery: PassThroughDelivery, sinks: dict[str, Sink]) -> None:
    reply = await delivery.deliver(message("t@7bit.test", content=EIGHT_BIT))
    assert (reply.code, reply.status, sinks["7bit.test"].mail) == (554, "5.6.3", [])


async def test_8bit_failure_at_one_domain_is_reported_in_the_dsn(
        delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("t@dsn.test", "t@7bit.test", content=EIGHT_BIT))
    block = status_blocks(the_dsn(delivery))[1]
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; alias2@alias.test", "5.6.3")


async def test_dsn_returning_an_8bit_message_is_declared_8bitmime(
        delivery: PassThroughDelivery) -> None:
    await delivery.deliver(message("t@dsn.test", "t@7bit.test", content=EIGHT_BIT, ret="FULL"))
    (entry,) = [e for e in delivery.spool.list() if not e.sender]
    assert delivery.spool.get(entry.queue_id).body == "8BITMIME"
