"""The outbound client pipelines its envelope (RFC 2920) to next hops that offer PIPELINING.

Two kinds of next hop, both on 127.0.0.1, port 0:

* :class:`ScriptedHop`, in the test's own event loop, records what it reads,
  read by read, and answers all the commands of one read in one write (as
  RFC 2920 asks a pipelining server to): how the commands travel, and that
  no content is ever sent when it must not be, are seen there;
* ``smtp_harness.Sink`` (aiosmtpd, one reply per command) told to offer
  PIPELINING: an independent server, for the per-recipient results, which
  must be those of the one-at-a-time exchange.

Nothing sleeps: the end of a session is awaited through the hop seeing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from mailforward.delivery.base import Message, RecipientDsn
from mailforward.delivery.client import (
    ACCEPTED,
    ClientSettings,
    Commit,
    SmtpClient,
    TryNextHop,
)
from mailforward.delivery.connections import ConnectionCache
from mailforward.delivery.routing import NextHop
from mailforward.reply import Reply

from certs import write_self_signed
from smtp_harness import USER_UNKNOWN, Sink

SENDER = "sender@ext.test"


def content(marker: str) -> bytes:
    return f"From: {SENDER}\r\nSubject: pipelined\r\n\r\n{marker}\r\n".encode()


CONTENT = content("body-marker-3c9a")


# --------------------------------------------------------------------------- the scripted hop


@dataclass
class HopSession:
    """One connection to a :class:`ScriptedHop` and what it read."""

    reads: list[list[bytes]] = field(default_factory=list)  # command lines of each read call
    received: bytearray = field(default_factory=bytearray)  # every byte read, in order
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    mail: bool = False
    rcpts: int = 0
    in_data: bool = False


class ScriptedHop:
    """A next hop that records every read and answers the commands of a read in one write.

    MAIL from a ``refused*`` sender gets 550, else 250; RCPT to a ``reject*``
    local part 550 (naming the address, as Postfix does), else 250 (503
    without MAIL); DATA 354 once a recipient was accepted, else
    ``empty_data`` (a 354 there is a broken server); RSET ``rset`` -- None
    closes the connection without a word, a 421 is followed by closing.
    ``extensions`` are offered in EHLO, PIPELINING first unless
    ``pipelining`` is False.
    """

    def __init__(self, *, pipelining: bool = True, extensions: Sequence[str] = ("8BITMIME",),
                 rset: str | None = "250 2.0.0 Ok",
                 empty_data: str = "554 5.5.1 Error: no valid recipients") -> None:
        self.extensions = ["PIPELINING", *extensions] if pipelining else list(extensions)
        self.rset, self.empty_data = rset, empty_data
        self.sessions: list[HopSession] = []
        self.messages: list[bytes] = []  # contents, as sent (dots still doubled)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ScriptedHop:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for session in self.sessions:  # each handler has seen its connection end
            await asyncio.wait_for(session.ended.wait(), 10)
        await self._server.wait_closed()

    @property
    def hop(self) -> NextHop:
        return NextHop("mx.one.test", "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = HopSession()
        self.sessions.append(session)
        self._writers.append(writer)
        writer.write(b"220 hop.test ESMTP\r\n")
        pending = b""
        try:
            while data := await reader.read(65536):
                session.received += data
                pending, replies, close = self._answer(session, pending + data)
                writer.write(replies)
                if close:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()
            session.ended.set()

    def _answer(self, session: HopSession, pending: bytes) -> tuple[bytes, bytes, bool]:
        """Answer what is whole in ``pending``: what is left, the replies, whether to close."""
        replies: list[str] = []
        lines: list[bytes] = []
        close = False
        while not close:
            if session.in_data:
                end = pending.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.messages.append(pending[:end + 2])
                pending, session.in_data = pending[end + 5:], False
                replies.append("250 2.0.0 Ok: queued")
                continue
            line, crlf, rest = pending.partition(b"\r\n")
            if not crlf:
                break
            pending = rest
            lines.append(line)
            reply = self._reply(session, line)
            if reply is not None:
                replies.append(reply)
            close = reply is None or reply.startswith(("421", "221"))
        if lines:
            session.reads.append(lines)
        return pending, "".join(r + "\r\n" for r in replies).encode(), close

    def _reply(self, session: HopSession, line: bytes) -> str | None:
        verb = line[:4].upper()
        address = line.partition(b"<")[2].partition(b">")[0].decode()
        if verb == b"EHLO":
            return "\r\n".join(f"250-{word}" for word in ["hop.test", *self.extensions[:-1]]) + (
                f"\r\n250 {self.extensions[-1]}")
        if verb == b"MAIL":
            if address.startswith("refused"):
                return f"550 5.7.1 <{address}>: Sender address rejected: Access denied"
            session.mail = True
            return "250 2.1.0 Ok"
        if verb == b"RCPT":
            if not session.mail:
                return "503 5.5.1 Error: need MAIL command"
            if address.startswith("reject"):
                return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
            session.rcpts += 1
            return "250 2.1.5 Ok"
        if verb == b"DATA":
            if not session.mail:
                return "503 5.5.1 Error: need MAIL command"
            if session.rcpts == 0 and not self.empty_data.startswith("354"):
                return self.empty_data
            session.in_data = True
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb == b"RSET":
            session.mail, session.rcpts = False, 0
            return self.rset
        if verb == b"QUIT":
            return "221 2.0.0 Bye"
        return "502 5.5.2 Error: command not recognized"


# --------------------------------------------------------------------------- helpers


def message(*recipients: str, sender: str = SENDER, body: bytes = CONTENT, **options: Any) -> Message:
    return Message("PIPE01", sender, recipients or ("a@one.test",), body, **options)


def smtp_client(cache: ConnectionCache | None = None) -> SmtpClient:
    return SmtpClient(ClientSettings("mx.mailforward.test", 5, 10), cache)


async def offer(client: SmtpClient, hop: NextHop, msg: Message) -> dict[str, Reply]:
    return await client.transaction(hop, msg, msg.recipients, Commit())


def offer_pipelining(ehlo: list[str]) -> list[str]:
    """For ``smtp_harness.Sink(ehlo=...)``: PIPELINING among the extensions (aiosmtpd
    takes pipelined commands but does not say so)."""
    return [*ehlo[:-1], "250-PIPELINING", ehlo[-1]]


def sink_hop(sink: Sink) -> NextHop:
    return NextHop("mx.one.test", "127.0.0.1", sink.port)


class SenderRefusingSink(Sink):
    """A harness sink that answers every MAIL with ``refusal``."""

    def __init__(self, refusal: str, **options: Any) -> None:
        super().__init__(**options)
        self.refusal = refusal

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        return self.refusal


# --------------------------------------------------------------------------- how commands travel


async def test_mail_rcpts_and_data_reach_a_pipelining_hop_in_one_read() -> None:
    async with ScriptedHop() as hop:
        client = smtp_client()
        results = await offer(client, hop.hop, message("a@one.test", "b@one.test"))
        assert results == {"a@one.test": ACCEPTED, "b@one.test": ACCEPTED}
        assert [b"MAIL FROM:<sender@ext.test>", b"RCPT TO:<a@one.test>",
                b"RCPT TO:<b@one.test>", b"DATA"] in hop.sessions[0].reads
        assert hop.messages == [CONTENT]


async def test_a_cached_sessions_rset_travels_with_the_envelope() -> None:
    async with ScriptedHop() as hop:
        cache = ConnectionCache(idle_time=30)
        client = smtp_client(cache)
        assert (await offer(client, hop.hop, message())) == {"a@one.test": ACCEPTED}
        assert (await offer(client, hop.hop, message())) == {"a@one.test": ACCEPTED}
        assert len(hop.sessions) == 1 and cache.reused == 1
        assert [b"RSET", b"MAIL FROM:<sender@ext.test>", b"RCPT TO:<a@one.test>",
                b"DATA"] in hop.sessions[0].reads
        assert hop.messages == [CONTENT, CONTENT]
        await client.close()


async def test_a_hop_without_pipelining_gets_one_command_per_read() -> None:
    async with ScriptedHop(pipelining=False) as hop:
        cache = ConnectionCache(idle_time=30)
        client = smtp_client(cache)
        for _ in range(2):
            results = await offer(client, hop.hop, message("a@one.test", "b@one.test"))
            assert results == {"a@one.test": ACCEPTED, "b@one.test": ACCEPTED}
        assert len(hop.sessions) == 1 and cache.reused == 1
        reads = hop.sessions[0].reads
        assert all(len(lines) == 1 for lines in reads)
        assert [b"RSET"] in reads  # the cached session's check, a round trip of its own
        assert hop.messages == [CONTENT, CONTENT]
        await client.close()


async def test_pipelining_works_over_starttls_on_new_and_cached_sessions(tmp_path: Path) -> None:
    with Sink(tls=write_self_signed(tmp_path, "mx.one.test"), ehlo=offer_pipelining) as sink:
        cache = ConnectionCache(idle_time=30)
        client = smtp_client(cache)
        for _ in range(2):
            results = await offer(client, sink_hop(sink), message("a@one.test", "reject@one.test"))
            assert [reply.code for reply in results.values()] == [250, 550]
        assert cache.reused == 1
        assert [(arrival.rcpt_tos, arrival.tls) for arrival in sink.arrivals] == [
            (["a@one.test"], True), (["a@one.test"], True)]
        await client.close()


async def test_pipelined_parameters_and_encoding_are_those_sent_one_at_a_time() -> None:
    sender = "s\u00e9nder@ext.test"
    dsn = {"a@one.test": RecipientDsn("SUCCESS,FAILURE", "rfc822;friend+2Btag@alias.test")}
    msg = message("a@one.test", sender=sender, body=content("Gr\u00fc\u00dfe"), dsn_ret="HDRS",
                  dsn_envid="Env-Id.7f+2B1", dsn=dsn)
    sent: dict[bool, list[bytes]] = {}
    for pipelining in (True, False):
        async with ScriptedHop(pipelining=pipelining,
                               extensions=("8BITMIME", "SMTPUTF8", "DSN", "SIZE 100000")) as hop:
            assert (await offer(smtp_client(), hop.hop, msg)) == {"a@one.test": ACCEPTED}
            sent[pipelining] = [line for lines in hop.sessions[0].reads for line in lines
                                if line.startswith((b"MAIL", b"RCPT"))]
    assert sent[True] == sent[False] == [
        f"MAIL FROM:<{sender}> SMTPUTF8 BODY=8BITMIME SIZE={len(msg.content)} RET=HDRS "
        "ENVID=Env-Id.7f+2B1".encode(),
        b"RCPT TO:<a@one.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;friend+2Btag@alias.test"]


# --------------------------------------------------------------------------- per-recipient results


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
async def test_one_refused_recipient_fails_alone_and_the_other_is_delivered(
        pipelining: bool) -> None:
    with Sink(ehlo=offer_pipelining if pipelining else None) as sink:
        results = await offer(smtp_client(), sink_hop(sink),
                              message("a@one.test", "nosuch@one.test"))
        assert results == {
            "a@one.test": ACCEPTED,
            "nosuch@one.test": Reply(550, "5.1.1", f"<nosuch@one.test>: {USER_UNKNOWN}")}
        assert [arrival.rcpt_tos for arrival in sink.arrivals] == [["a@one.test"]]


async def test_all_recipients_refused_sends_no_content() -> None:
    async with ScriptedHop() as hop:
        results = await offer(smtp_client(), hop.hop, message("reject1@one.test",
                                                               "reject2@one.test"))
        assert results == {
            rcpt: Reply(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: User unknown")
            for rcpt in ("reject1@one.test", "reject2@one.test")}
        await asyncio.wait_for(hop.sessions[0].ended.wait(), 10)  # the session was closed
        assert b"body-marker" not in hop.sessions[0].received
        assert hop.messages == []


async def test_a_354_without_an_accepted_recipient_closes_the_session_before_any_content() -> None:
    async with ScriptedHop(empty_data="354 go ahead, broken as I am") as hop:
        results = await offer(smtp_client(), hop.hop, message("reject1@one.test"))
        assert [reply.code for reply in results.values()] == [550]
        await asyncio.wait_for(hop.sessions[0].ended.wait(), 10)
        assert hop.sessions[0].received.endswith(b"DATA\r\n")  # not even QUIT
        assert hop.messages == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
async def test_a_permanently_refused_sender_fails_every_recipient(pipelining: bool) -> None:
    with SenderRefusingSink("550 5.7.1 Sender address rejected: Access denied",
                            ehlo=offer_pipelining if pipelining else None) as sink:
        results = await offer(smtp_client(), sink_hop(sink), message("a@one.test", "b@one.test"))
        assert results == {
            rcpt: Reply(550, "5.7.1", f"<{rcpt}>: Sender address rejected: Access denied")
            for rcpt in ("a@one.test", "b@one.test")}
        assert sink.arrivals == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
async def test_a_temporarily_refused_sender_tries_the_next_hop(pipelining: bool) -> None:
    with SenderRefusingSink("451 4.3.0 Temporary lookup failure",
                            ehlo=offer_pipelining if pipelining else None) as sink:
        with pytest.raises(TryNextHop) as refused:
            await offer(smtp_client(), sink_hop(sink), message("a@one.test", "b@one.test"))
        assert (refused.value.reply.code, refused.value.reply.status) == (451, "4.4.2")
        assert "Temporary lookup failure" in refused.value.reply.text
        assert sink.arrivals == []


async def test_a_session_whose_sender_was_refused_is_reused_for_the_next_message() -> None:
    async with ScriptedHop() as hop:
        cache = ConnectionCache(idle_time=30)
        client = smtp_client(cache)
        refused = await offer(client, hop.hop, message(sender="refused@ext.test"))
        assert [reply.code for reply in refused.values()] == [550]
        assert (await offer(client, hop.hop, message())) == {"a@one.test": ACCEPTED}
        assert (len(hop.sessions), cache.reused, hop.messages) == (1, 1, [CONTENT])
        await client.close()


# --------------------------------------------------------------------------- cached sessions


@pytest.mark.parametrize("rset", [None, "421 4.4.2 hop.test Error: timeout exceeded"],
                         ids=["closed", "421"])
async def test_a_dead_cached_session_is_found_by_the_pipelined_rset_and_replaced(
        rset: str | None) -> None:
    async with ScriptedHop(rset=rset) as hop:
        cache = ConnectionCache(idle_time=30)
        client = smtp_client(cache)
        first, second = content("first-message"), content("second-message")
        assert (await offer(client, hop.hop, message(body=first))) == {"a@one.test": ACCEPTED}
        assert (await offer(client, hop.hop, message(body=second))) == {"a@one.test": ACCEPTED}
        await asyncio.wait_for(hop.sessions[0].ended.wait(), 10)
        assert hop.sessions[0].reads[-1][0] == b"RSET"
        assert b"second-message" not in hop.sessions[0].received
        assert (len(hop.sessions), cache.reused) == (2, 0)
        assert hop.messages == [first, second]  # the second one once, on the new session
        await client.close()
