"""Outbound connection reuse (Postfix's scache), grouping by next hop, one TLS context.

The destinations are aiosmtpd sinks on loopback, bound to port 0 in the
test's own event loop; each counts the TCP connections it accepted (its
protocol factory is called once per connection) and keeps every envelope
it accepted (one per transaction).  Nothing here sleeps: idle expiry is
awaited through the sink seeing the connection close.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope

from mailforward.delivery.base import Message
from mailforward.delivery.client import ClientSettings
from mailforward.delivery.connections import ConnectionCache
from mailforward.delivery.passthrough import PassThroughDelivery, Router
from mailforward.delivery.retry import RetryPolicy
from mailforward.delivery.routing import MxRouter, NextHop
from mailforward.delivery.spool import Spool

from certs import write_self_signed

CONTENT = b"From: sender@ext.test\r\nSubject: reuse\r\n\r\nbody\r\n"
EIGHT_BIT = b"From: sender@ext.test\r\nSubject: caf\xc3\xa9\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"


class Sink:
    """An aiosmtpd handler that counts connections and keeps envelopes."""

    def __init__(self, rset_fails: bool = False) -> None:
        self.rset_fails = rset_fails  # RSET answered 421, then the connection is closed
        self.connections = 0
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self.envelopes: list[Envelope] = []
        self.tls: list[bool] = []  # per transaction: did it arrive over TLS
        self.protocols: list[SinkSMTP] = []
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        self.tls.append(session.ssl is not None)
        return "250 2.0.0 Ok: sunk"


class SinkSMTP(SMTP):
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self.sink = sink

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.sink.disconnects += 1
        self.sink.disconnected.set()

    async def smtp_RSET(self, arg: str) -> None:
        if self.sink.rset_fails:
            await self.push("421 4.4.2 sink.test Error: timeout exceeded")
            assert self.transport is not None
            self.transport.close()
            return
        await super().smtp_RSET(arg)


async def start(sink: Sink, tls: ssl.SSLContext | None = None) -> asyncio.Server:
    def accept() -> SinkSMTP:
        sink.connections += 1
        protocol = SinkSMTP(sink, hostname="sink.test", tls_context=tls, enable_SMTPUTF8=True)
        sink.protocols.append(protocol)
        return protocol
    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    sink.port = server.sockets[0].getsockname()[1]
    return server


class SinkRouter(Router):
    """Each test domain to a sink on 127.0.0.1 (several domains may share one)."""

    def __init__(self, sinks: Mapping[str, Sink]) -> None:
        super().__init__(MxRouter())
        self.sinks = sinks

    async def next_hops(self, domain: str) -> list[NextHop]:
        return [NextHop(f"mx.{domain}", "127.0.0.1", self.sinks[domain].port)]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    made = Sink()
    server = await start(made)
    yield made
    server.close()
    await server.wait_closed()


def deliverer(router: Router, tmp_path: Path, cache: ConnectionCache | None,
              client: ClientSettings | None = None) -> PassThroughDelivery:
    return PassThroughDelivery(router, Spool(tmp_path / "spool"),
                               client or ClientSettings("mx.mailforward.test", 5, 10),
                               RetryPolicy(), "mx.mailforward.test", passthrough_timeout=10,
                               connections=cache)


def message(queue_id: str, *recipients: str, content: bytes = CONTENT) -> Message:
    return Message(queue_id, "sender@ext.test", recipients or ("a@one.test",), content)


async def test_two_messages_to_the_same_hop_in_a_row_use_one_connection(
        sink: Sink, tmp_path: Path) -> None:
    cache = ConnectionCache(idle_time=30)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    assert (await delivery.deliver(message("AAA1"))).code == 250
    assert (await delivery.deliver(message("AAA2"))).code == 250
    assert (sink.connections, len(sink.envelopes), cache.reused) == (1, 2, 1)
    await delivery.close()


async def test_cached_connection_is_dropped_after_the_idle_limit(
        sink: Sink, tmp_path: Path) -> None:
    cache = ConnectionCache(idle_time=0.2)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    assert (await delivery.deliver(message("AAA1"))).code == 250
    await asyncio.wait_for(sink.disconnected.wait(), 10)  # closed by the idle timer, not by us
    assert cache.idle == 0
    assert (await delivery.deliver(message("AAA2"))).code == 250
    assert (sink.connections, len(sink.envelopes)) == (2, 2)
    await delivery.close()


async def test_cached_connection_the_hop_closed_is_not_used(sink: Sink, tmp_path: Path) -> None:
    cache = ConnectionCache(idle_time=30)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    assert (await delivery.deliver(message("AAA1"))).code == 250
    transport = sink.protocols[0].transport
    assert transport is not None
    transport.close()  # the hop's own idle timeout
    await asyncio.wait_for(sink.disconnected.wait(), 10)
    assert (await delivery.deliver(message("AAA2"))).code == 250
    assert (sink.connections, len(sink.envelopes)) == (2, 2)
    await delivery.close()


async def test_cached_session_whose_rset_fails_is_replaced_by_a_new_connection(
        tmp_path: Path) -> None:
    sink = Sink(rset_fails=True)
    server = await start(sink)
    cache = ConnectionCache(idle_time=30)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    try:
        assert (await delivery.deliver(message("AAA1"))).code == 250
        assert (await delivery.deliver(message("AAA2"))).code == 250
        assert (sink.connections, len(sink.envelopes), cache.reused) == (2, 2, 0)
    finally:
        await delivery.close()
        server.close()
        await server.wait_closed()


async def test_idle_sessions_per_hop_are_bounded(sink: Sink, tmp_path: Path) -> None:
    cache = ConnectionCache(idle_time=30, hop_limit=1)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    replies = await asyncio.gather(delivery.deliver(message("AAA1")),
                                   delivery.deliver(message("AAA2")))
    assert [r.code for r in replies] == [250, 250]
    assert sink.connections == 2  # two transactions at once need two sessions
    await asyncio.wait_for(sink.disconnected.wait(), 10)  # one of them is not kept
    assert (cache.idle, sink.disconnects) == (1, 1)
    await delivery.close()


async def test_close_quits_the_idle_sessions(sink: Sink, tmp_path: Path) -> None:
    cache = ConnectionCache(idle_time=30)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    assert (await delivery.deliver(message("AAA1"))).code == 250
    await delivery.close()
    await asyncio.wait_for(sink.disconnected.wait(), 10)
    assert cache.idle == 0


async def test_without_a_cache_every_message_has_its_own_connection(
        sink: Sink, tmp_path: Path) -> None:
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, None)
    for queue_id in ("AAA1", "AAA2"):
        assert (await delivery.deliver(message(queue_id))).code == 250
    assert sink.connections == 2


async def test_a_reused_session_gets_each_transactions_own_parameters(
        sink: Sink, tmp_path: Path) -> None:
    cache = ConnectionCache(idle_time=30)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path, cache)
    assert (await delivery.deliver(message("AAA1", content=EIGHT_BIT))).code == 250
    assert (await delivery.deliver(message("AAA2"))).code == 250
    assert sink.connections == 1
    assert "BODY=8BITMIME" in sink.envelopes[0].mail_options
    assert "BODY=8BITMIME" not in sink.envelopes[1].mail_options
    await delivery.close()


# --- grouping by next hop


async def test_with_relay_host_a_message_to_two_domains_is_one_transaction_at_the_relay(
        sink: Sink, tmp_path: Path) -> None:
    router = Router(MxRouter(), relay_host=f"[127.0.0.1]:{sink.port}")
    delivery = deliverer(router, tmp_path, None)
    assert (await delivery.deliver(message("AAA1", "a@one.test", "b@two.test"))).code == 250
    assert [e.rcpt_tos for e in sink.envelopes] == [["a@one.test", "b@two.test"]]
    assert sink.connections == 1


async def test_domains_whose_first_next_hop_is_the_same_share_a_transaction(
        sink: Sink, tmp_path: Path) -> None:
    delivery = deliverer(SinkRouter({"one.test": sink, "two.test": sink}), tmp_path, None)
    assert (await delivery.deliver(message("AAA1", "a@one.test", "b@two.test"))).code == 250
    assert [e.rcpt_tos for e in sink.envelopes] == [["a@one.test", "b@two.test"]]


async def test_domains_at_different_next_hops_get_a_transaction_each(
        sink: Sink, tmp_path: Path) -> None:
    other = Sink()
    server = await start(other)
    try:
        delivery = deliverer(SinkRouter({"one.test": sink, "two.test": other}), tmp_path, None)
        assert (await delivery.deliver(message("AAA1", "a@one.test", "b@two.test"))).code == 250
        assert ([e.rcpt_tos for e in sink.envelopes], [e.rcpt_tos for e in other.envelopes]) == (
            [["a@one.test"]], [["b@two.test"]])
    finally:
        server.close()
        await server.wait_closed()


# --- TLS


async def test_one_tls_context_serves_every_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*write_self_signed(tmp_path, "sink.test"))
    sink = Sink()
    server = await start(sink, tls=server_context)
    client = ClientSettings("mx.mailforward.test", 5, 10)  # the one context is made here

    def no_new_context(*args: object, **kwargs: object) -> ssl.SSLContext:
        raise AssertionError("a TLS context was created for a connection")

    monkeypatch.setattr(ssl, "create_default_context", no_new_context)
    used: list[object] = []
    starttls = aiosmtplib.SMTP.starttls

    async def recording_starttls(self: aiosmtplib.SMTP, **kwargs: Any) -> Any:
        response = await starttls(self, **kwargs)
        used.append(self.get_transport_info("sslcontext"))
        return response

    monkeypatch.setattr(aiosmtplib.SMTP, "starttls", recording_starttls)
    delivery = deliverer(SinkRouter({"one.test": sink}), tmp_path / "d", None, client)
    try:
        for queue_id in ("AAA1", "AAA2", "AAA3"):
            assert (await delivery.deliver(message(queue_id))).code == 250
    finally:
        server.close()
        await server.wait_closed()
    assert sink.connections == 3 and sink.tls == [True, True, True]
    assert len(used) == 3 and all(context is client.tls_context for context in used)
