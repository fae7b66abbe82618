"""The From-header policy: exactly one From with one mailbox; our own domains not for strangers.

The reader (``from_field``) and each named check one at a time, then the
policy over a real socket.  The full spoofing matrix, judged by Mail::DKIM at
a sink, is in ``test_spoofing.py``.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator

import pytest

from mailforward.config import DatabaseSettings
from mailforward.from_field import FromProblem, read_from_field
from mailforward.smtpd import replies
from mailforward.smtpd.policy import (
    ACCEPT,
    CONTINUE,
    FROM_CHECKS,
    MessageContext,
    reject_unauthenticated_own_domain,
    run_checks,
)

from smtp_harness import RawClient, ServerThread
from test_policy import MemoryTable


def message(*header_lines: bytes) -> bytes:
    return b"\r\n".join(header_lines) + b"\r\nSubject: s\r\n\r\nbody\r\n"


# ---------------------------------------------------------------- the reader

@pytest.mark.parametrize("field", [
    b"From: ceo@sender.test",
    b"From: <ceo@sender.test>",
    b'From: "CEO, Sender" <ceo@sender.test>',
    b"From: =?utf-8?q?J=C3=B6rg?= <ceo@sender.test>",
    b"From: CEO (the (real) one) <ceo@sender.test>",
    b"From: Very\r\n Long Name <ceo@SENDER.test>",
    b"From: Dr. J. Doe <ceo@sender.test>",
    "From: Jörg <ceo@sender.test>".encode(),
    b"FROM:ceo@sender.test",
])
def test_one_mailbox_is_read_with_its_domain(field: bytes) -> None:
    assert read_from_field(message(field)).domain == "sender.test"


def test_from_with_white_space_before_the_colon_is_a_from_field() -> None:
    assert read_from_field(message(b"From : ceo@sender.test")).domain == "sender.test"


def test_message_without_from_is_missing() -> None:
    assert read_from_field(message(b"To: a@b.test")).problem is FromProblem.MISSING


def test_from_in_the_body_does_not_count() -> None:
    content = b"Subject: s\r\n\r\nFrom: ceo@sender.test\r\n"
    assert read_from_field(content).problem is FromProblem.MISSING


@pytest.mark.parametrize("fields", [
    (b"From: ceo@sender.test", b"From: x@attacker.test"),
    (b"From: x@attacker.test", b"From: ceo@sender.test"),
    (b"From: ceo@sender.test", b"From:"),
])
def test_two_from_fields_are_repeated(fields: tuple[bytes, ...]) -> None:
    assert read_from_field(message(*fields)).problem is FromProblem.REPEATED


@pytest.mark.parametrize("field", [
    b"From: ceo@sender.test, x@attacker.test",
    b"From: ceo@sender.test <ceo>",
    b"From: =?utf-8?q?ceo=40sender.test?=",
    b"From: ceo@sender.test\x00",
    b"From: ceo@sender.test\xff",
    b"From: undisclosed-recipients:;",
    b"From: ",
    b"From: ceo@sender.test (unclosed",
    b"From: <ceo@sender.test",
    b'From: "unclosed <ceo@sender.test>',
    b"From: ceo@[192.0.2.1]",
    b"From: ceo@localhost",
    b"From: Name <ceo@sender.test> trailing",
    b"From: " + b"(" * 5000 + b")" * 5000 + b" ceo@sender.test",
])
def test_anything_but_one_mailbox_is_not_one_mailbox(field: bytes) -> None:
    assert read_from_field(message(field)).problem is FromProblem.NOT_ONE_MAILBOX


# ---------------------------------------------------------------- the own-domain check

def context(from_address: str, *, authenticated: frozenset[str] = frozenset(),
            dmarc_pass: str = "", own: frozenset[str] = frozenset({"fwd.example.net"}),
            trusted: bool = False) -> MessageContext:
    return MessageContext(MemoryTable(hosted=("example.org",)), trusted,
                          read_from_field(message(f"From: {from_address}".encode())),
                          own, authenticated, dmarc_pass)


@pytest.mark.parametrize("address", ["ceo@example.org", "ceo@sub.example.org",
                                     "ceo@fwd.example.net", "ceo@other.example.net"])
def test_own_domain_from_without_authentication_is_refused(address: str) -> None:
    verdict = asyncio.run(reject_unauthenticated_own_domain(context(address)))
    domain = address.partition("@")[2]
    assert verdict == replies.own_domain_unauthenticated(domain)


def test_own_domain_from_with_aligned_dkim_pass_is_accepted() -> None:
    ctx = context("ceo@example.org", authenticated=frozenset({"mail.example.org"}))
    assert asyncio.run(reject_unauthenticated_own_domain(ctx)) is CONTINUE


def test_own_domain_from_with_dmarc_pass_is_accepted() -> None:
    ctx = context("ceo@example.org", dmarc_pass="example.org")
    assert asyncio.run(reject_unauthenticated_own_domain(ctx)) is CONTINUE


def test_unaligned_authentication_does_not_help_an_own_domain_from() -> None:
    ctx = context("ceo@example.org", authenticated=frozenset({"attacker.test"}))
    assert asyncio.run(reject_unauthenticated_own_domain(ctx)) == \
        replies.own_domain_unauthenticated("example.org")


def test_foreign_from_is_not_the_own_domain_checks_business() -> None:
    assert asyncio.run(reject_unauthenticated_own_domain(context("ceo@sender.test"))) is CONTINUE


def test_mynetworks_clients_skip_the_from_checks() -> None:
    ctx = MessageContext(MemoryTable(), True, read_from_field(b"Subject: none\r\n\r\n"))
    assert asyncio.run(run_checks(FROM_CHECKS, ctx)) is None
    assert asyncio.run(FROM_CHECKS[0](ctx)) is ACCEPT


# ---------------------------------------------------------------- over a socket

@pytest.fixture
def server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    server = ServerThread(seeded_database, mynetworks=("127.0.0.2/32",))
    yield server
    server.close()


def data_reply(server: ServerThread, content: bytes, source: str | None = None) -> str:
    with RawClient(server.host, server.port, source=source) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        c.command("RCPT TO:<alice@example.org>")
        c.command("DATA")
        c.send(content + b".\r\n")
        return c.read_reply()


def test_message_without_from_is_refused(server: ServerThread) -> None:
    assert data_reply(server, b"Subject: s\r\n\r\nbody\r\n") == str(replies.FROM_MISSING)
    assert server.messages == []


def test_two_from_fields_are_refused(server: ServerThread) -> None:
    content = message(b"From: ceo@sender.test", b"From: x@attacker.test")
    assert data_reply(server, content) == str(replies.FROM_REPEATED)


def test_from_with_two_mailboxes_is_refused(server: ServerThread) -> None:
    content = message(b"From: ceo@sender.test, x@attacker.test")
    assert data_reply(server, content) == str(replies.FROM_NOT_ONE_MAILBOX)


def test_from_hidden_behind_a_bare_cr_is_the_one_judged(server: ServerThread) -> None:
    content = b"Subject: hi\rFrom: postmaster@example.org\r\r\nFrom: x@attacker.test\r\n\r\nbody\r\n"
    assert data_reply(server, content) == str(replies.own_domain_unauthenticated("example.org"))


def test_hosted_domain_from_from_a_stranger_is_refused(server: ServerThread) -> None:
    content = message(b"From: postmaster@example.org")
    assert data_reply(server, content) == str(replies.own_domain_unauthenticated("example.org"))
    assert server.messages == []


def test_subdomain_of_a_hosted_domain_from_a_stranger_is_refused(server: ServerThread) -> None:
    content = message(b"From: ceo@mail.example.org")
    assert data_reply(server, content) == \
        str(replies.own_domain_unauthenticated("mail.example.org"))


def test_hosted_domain_from_from_mynetworks_is_forwarded(server: ServerThread) -> None:
    content = message(b"From: postmaster@example.org")
    assert data_reply(server, content, source="127.0.0.2").startswith("250 2.0.0")
    assert len(server.messages) == 1


def test_foreign_from_from_a_stranger_is_forwarded(server: ServerThread) -> None:
    with smtplib.SMTP(server.host, server.port, local_hostname="client.test") as s:
        assert s.sendmail("sender@ext.test", ["alice@example.org"],
                          message(b"From: Sender <sender@ext.test>")) == {}
    assert len(server.messages) == 1
