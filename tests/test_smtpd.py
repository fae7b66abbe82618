"""The inbound SMTP server over real loopback sockets, on SQLite and MariaDB.

Each test is one behaviour; expected replies are the named constants from
``mailforward.smtpd.replies`` (whose texts are the reference stack's).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from mailforward.config import DatabaseSettings
from mailforward.smtpd import replies
from mailforward.smtpd.replies import Reply

from smtp_harness import HOSTNAME, RawClient, ServerThread, held_port, wait_until, wait_until_consumed

BODY = "From: sender@ext.test\r\nTo: x\r\nSubject: probe\r\n\r\nprobe body\r\n"


def dialog(server: ServerThread, *commands: str, helo: str = "EHLO client.test") -> list[str]:
    """Replies to HELO/EHLO and each command (last line of each reply)."""
    with RawClient(server.host, server.port) as c:
        c.read_reply()
        out = [c.command(helo)] if helo else []
        out += [c.command(cmd) for cmd in commands]
        c.command("QUIT")
    return out


def rcpt_reply(server: ServerThread, recipient: str, sender: str = "sender@ext.test") -> str:
    return dialog(server, f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>")[-1]


def send(server: ServerThread, recipients: list[str], sender: str = "sender@ext.test",
         body: str = BODY) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=10) as s:
        return s.sendmail(sender, recipients, body)


# ---------------------------------------------------------------- greeting


def test_banner_is_hostname_and_esmtp_only(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        assert c.read_reply() == f"220 {HOSTNAME} ESMTP"


def test_ehlo_advertises_extensions_without_auth_or_starttls(smtp_server: ServerThread) -> None:
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="client.test") as s:
        s.ehlo()
        features = set(s.esmtp_features)
    assert {"pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes"} <= features
    assert "auth" not in features and "starttls" not in features
    assert s.esmtp_features["size"] == "10240000"


# ---------------------------------------------------------------- accepted mail


def test_valid_alias_is_handed_to_delivery(smtp_server: ServerThread) -> None:
    assert send(smtp_server, ["alice@example.org"]) == {}
    (message,) = smtp_server.messages
    assert message.recipients == ("alice.dest@sink.test",)
    assert message.sender == "sender@ext.test"
    assert message.content.endswith(b"\r\n\r\nprobe body\r\n")
    assert message.content.startswith(b"Received: from client.test ([127.0.0.1])")


def test_upper_case_recipient_reaches_the_alias(smtp_server: ServerThread) -> None:
    send(smtp_server, ["ALICE@EXAMPLE.ORG"])
    assert smtp_server.messages[0].recipients == ("alice.dest@sink.test",)


def test_chained_alias_is_expanded_again(smtp_server: ServerThread) -> None:
    send(smtp_server, ["chain@example.org"])
    assert smtp_server.messages[0].recipients == ("alice.dest@sink.test",)


def test_multi_destination_alias_reaches_every_destination(smtp_server: ServerThread) -> None:
    send(smtp_server, ["multi@example.org"])
    assert smtp_server.messages[0].recipients == ("a@sink.test", "b@sink2.test")


def test_duplicate_destinations_are_delivered_once(smtp_server: ServerThread) -> None:
    send(smtp_server, ["alice@example.org", "chain@example.org"])
    assert smtp_server.messages[0].recipients == ("alice.dest@sink.test",)


def test_null_sender_is_accepted(smtp_server: ServerThread) -> None:
    send(smtp_server, ["alice@example.org"], sender="")
    assert smtp_server.messages[0].sender == ""


def test_trailing_dot_in_domain_is_accepted(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "alice@example.org.") == str(replies.RECIPIENT_OK)


def test_recipient_without_brackets_is_accepted(smtp_server: ServerThread) -> None:
    replies_ = dialog(smtp_server, "MAIL FROM:<sender@ext.test>", "RCPT TO:alice@example.org")
    assert replies_[-1] == str(replies.RECIPIENT_OK)


def test_data_reply_is_the_delivery_reply(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        c.command("RCPT TO:<alice@example.org>")
        assert c.command("DATA") == str(replies.START_DATA)
        reply = c.command("From: s@ext.test\r\nSubject: x\r\n\r\nbody\r\n.")
    assert reply.startswith("250 2.0.0 Ok: queued as ")


# ---------------------------------------------------------------- recipients refused


def test_unknown_alias_is_user_unknown(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "nobody@example.org") == str(
        replies.USER_UNKNOWN.about("nobody@example.org"))


def test_inactive_alias_is_user_unknown(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "off@example.org") == str(replies.USER_UNKNOWN.about("off@example.org"))


@pytest.mark.parametrize("recipient", ["ghost@inactive.test", "victim@victim.test", "x@sub.example.org"])
def test_recipient_outside_hosted_active_domains_is_relay_denied(smtp_server: ServerThread,
                                                                 recipient: str) -> None:
    assert rcpt_reply(smtp_server, recipient) == str(replies.RELAY_DENIED.about(recipient))


def test_non_fqdn_recipient_is_relay_denied(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "alice") == str(replies.RELAY_DENIED.about("alice"))


def test_postmaster_without_domain_and_nowhere_to_send_it_is_user_unknown(
        smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "postmaster") == str(replies.USER_UNKNOWN.about("postmaster"))


@pytest.mark.parametrize("postmaster, destination", [
    ("alice@example.org", "alice.dest@sink.test"),  # a hosted address: through the alias table
    ("hostmaster@ops.test", "hostmaster@ops.test"),  # elsewhere: straight there
])
def test_postmaster_without_domain_goes_to_the_configured_postmaster(
        seeded_database: DatabaseSettings, postmaster: str, destination: str) -> None:
    server = ServerThread(seeded_database, postmaster=postmaster)
    try:
        assert rcpt_reply(server, "Postmaster") == str(replies.RECIPIENT_OK)
        send(server, ["postmaster"])
        assert server.messages[0].recipients == (destination,)
    finally:
        server.close()


@pytest.mark.parametrize("trick", [
    "user%victim.test@example.org",
    "@example.org:user@victim.test",
    '"user@victim.test"@example.org',
    "victim.test!user@example.org",
    "user@victim.test@example.org",
    "@example.org,@other.test:user@victim.test",
])
def test_address_tricks_are_relay_denied(smtp_server: ServerThread, trick: str) -> None:
    reply = rcpt_reply(smtp_server, trick)
    assert reply.startswith("554 5.7.1") and reply.endswith("Relay access denied")


def test_percent_hack_is_not_relayed_even_with_a_catch_all(seeded_database: DatabaseSettings) -> None:
    import asyncio

    from mailforward.admin import Admin
    from mailforward.tables import open_admin_database

    async def add_catch_all() -> None:
        db = await open_admin_database(seeded_database)
        await Admin(db).add_alias("@example.org", "catchall@sink.test")
        await db.close()
    asyncio.run(add_catch_all())
    server = ServerThread(seeded_database)
    try:
        assert rcpt_reply(server, "user%victim.test@example.org").startswith("554 5.7.1")
        assert rcpt_reply(server, "whoever@example.org") == str(replies.RECIPIENT_OK)
    finally:
        server.close()


def test_ip_literal_of_our_own_address_is_user_unknown(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "user@[127.0.0.1]") == str(replies.USER_UNKNOWN.about("user@[127.0.0.1]"))


def test_foreign_ip_literal_is_relay_denied(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "user@[192.0.2.1]").startswith("554 5.7.1")


def test_empty_recipient_is_a_syntax_error(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "") == str(replies.BAD_RECIPIENT_SYNTAX)


def test_overlong_local_part_is_user_unknown(smtp_server: ServerThread) -> None:
    recipient = "a" * 1900 + "@example.org"
    assert rcpt_reply(smtp_server, recipient).startswith("550 5.1.1")


def test_non_utf8_recipient_is_a_syntax_error(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        c.send(b"RCPT TO:<\xff\xfe@example.org>\r\n")
        assert c.read_reply() == str(replies.BAD_RECIPIENT_SYNTAX)


# ---------------------------------------------------------------- senders refused


@pytest.mark.parametrize("sender", ["someone@example.org", "someone@EXAMPLE.ORG"])
def test_forged_local_sender_is_rejected_at_rcpt(smtp_server: ServerThread, sender: str) -> None:
    mail, rcpt = dialog(smtp_server, f"MAIL FROM:<{sender}>", "RCPT TO:<alice@example.org>")[1:]
    assert mail == str(replies.SENDER_OK)
    assert rcpt == str(replies.FORGED_LOCAL_SENDER.about(sender))


@pytest.mark.parametrize("sender", ["SRS0=abcd=TT=ext.test=user@other.test",
                                    "srs0+abcd=TT=ext.test=user@other.test",
                                    "SRS0-abcd=TT=ext.test=user@other.test",
                                    "SRS1=abcd=other.test==abcd=TT=ext.test=user@third.test"])
def test_srs_sender_is_rejected_inbound(smtp_server: ServerThread, sender: str) -> None:
    assert rcpt_reply(smtp_server, "alice@example.org", sender=sender) == str(
        replies.SRS_SENDER_INBOUND.about(sender))


def test_sender_from_inactive_domain_is_not_forged(smtp_server: ServerThread) -> None:
    assert rcpt_reply(smtp_server, "alice@example.org", sender="x@inactive.test") == str(
        replies.RECIPIENT_OK)


def test_bad_sender_syntax_is_refused(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, "MAIL FROM:<a b@ext.test>")[-1] == str(replies.BAD_SENDER_SYNTAX)


# ---------------------------------------------------------------- mynetworks


def test_mynetworks_client_may_relay_and_use_local_sender(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, mynetworks=("127.0.0.2/32",))
    try:
        with smtplib.SMTP(server.host, server.port, local_hostname="client.test",
                          source_address=("127.0.0.2", 0)) as s:
            assert s.sendmail("app@example.org", ["victim@victim.test"], BODY) == {}
        assert server.messages[0].recipients == ("victim@victim.test",)
        assert rcpt_reply(server, "victim@victim.test").startswith("554 5.7.1")  # 127.0.0.1 is outside
    finally:
        server.close()


# ---------------------------------------------------------------- HELO


def test_mail_before_helo_is_refused(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, "MAIL FROM:<sender@ext.test>", helo="") == [str(replies.NEED_HELO)]


def test_invalid_helo_is_rejected_at_rcpt(smtp_server: ServerThread) -> None:
    out = dialog(smtp_server, "MAIL FROM:<sender@ext.test>", "RCPT TO:<alice@example.org>",
                 helo="HELO -bad_")
    assert out == [f"250 {HOSTNAME}", str(replies.SENDER_OK), str(replies.INVALID_HELO.about("-bad_"))]


@pytest.mark.parametrize("helo", ["HELO [127.0.0.1]", "EHLO 192.0.2.7", "EHLO localhost", "EHLO mx_1.example.net"])
def test_valid_helo_forms_are_accepted(smtp_server: ServerThread, helo: str) -> None:
    assert dialog(smtp_server, "MAIL FROM:<sender@ext.test>", "RCPT TO:<alice@example.org>",
                  helo=helo)[-1] == str(replies.RECIPIENT_OK)


def test_helo_without_hostname_is_a_syntax_error(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, helo="HELO") == [str(replies.HELO_SYNTAX)]


# ---------------------------------------------------------------- commands


@pytest.mark.parametrize("command, expected", [
    ("VRFY alice@example.org", replies.VRFY_DISABLED),
    ("EXPN staff", replies.UNRECOGNIZED),
    ("HELP", replies.UNRECOGNIZED),
    ("XYZZY", replies.UNRECOGNIZED),
    ("AUTH PLAIN AGFsaWNlAHNlY3JldA==", replies.AUTH_NOT_ENABLED),
    ("STARTTLS", replies.NOT_IMPLEMENTED),
    ("ETRN example.org", replies.ETRN_REFUSED.about("example.org")),
    ("NOOP", replies.OK),
    ("RSET", replies.OK),
    ("RCPT TO:<alice@example.org>", replies.NEED_MAIL),
    ("DATA", replies.NEED_RCPT),
])
def test_command_reply(smtp_server: ServerThread, command: str, expected: Reply) -> None:
    assert dialog(smtp_server, command)[-1] == str(expected)


def test_data_without_valid_recipients_is_refused(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, "MAIL FROM:<sender@ext.test>", "DATA")[-1] == str(replies.NO_VALID_RECIPIENTS)


def test_nested_mail_is_refused(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, "MAIL FROM:<a@ext.test>", "MAIL FROM:<b@ext.test>")[-1] == str(
        replies.NESTED_MAIL)


def test_rset_starts_a_new_transaction(smtp_server: ServerThread) -> None:
    out = dialog(smtp_server, "MAIL FROM:<a@ext.test>", "RCPT TO:<victim@victim.test>", "RSET",
                 "MAIL FROM:<a@ext.test>", "RCPT TO:<alice@example.org>")
    assert out[-3:] == [str(replies.OK), str(replies.SENDER_OK), str(replies.RECIPIENT_OK)]


def test_unknown_mail_parameter_is_refused(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, "MAIL FROM:<a@ext.test> XFOO=1")[-1] == str(replies.BAD_PARAMETER)


def test_nul_byte_in_command_is_a_syntax_error(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.send(b"EHLO cli\x00ent.test\r\n")
        assert c.read_reply() == str(replies.BAD_SYNTAX)


def test_2000_byte_command_line_is_read_whole(smtp_server: ServerThread) -> None:
    local = "b" * (2000 - len("RCPT TO:<@example.org>"))
    assert rcpt_reply(smtp_server, f"{local}@example.org").startswith("550 5.1.1")


def test_overlong_command_line_is_refused_and_session_continues(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        assert c.command("EHLO " + "x" * 5000) == str(replies.LINE_TOO_LONG)
        assert c.command("NOOP") == str(replies.OK)


def test_pipelined_commands_are_answered_in_order(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.send("MAIL FROM:<sender@ext.test>\r\nRCPT TO:<alice@example.org>\r\n"
               "RCPT TO:<victim@victim.test>\r\nDATA\r\n")
        got = [c.read_reply() for _ in range(4)]
        c.send(BODY + ".\r\n")
        final = c.read_reply()
    assert got == [str(replies.SENDER_OK), str(replies.RECIPIENT_OK),
                   str(replies.RELAY_DENIED.about("victim@victim.test")), str(replies.START_DATA)]
    assert final.startswith("250 2.0.0")
    assert smtp_server.messages[0].recipients == ("alice.dest@sink.test",)


# ---------------------------------------------------------------- smuggling and DATA framing


def _start_data(c: RawClient) -> None:
    c.read_reply()
    c.command("EHLO client.test")
    c.command("MAIL FROM:<sender@ext.test>")
    c.command("RCPT TO:<alice@example.org>")
    assert c.command("DATA") == str(replies.START_DATA)


SMUGGLING_PAYLOAD = ("From: s@ext.test\r\nSubject: one\r\n\r\nfirst\n.\nMAIL FROM:<admin@example.org>\r\n"
                     "RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n")


@pytest.fixture
def rejecting_server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    """``forbid_bare_newline = "reject"``: bare line ends are refused, not normalised."""
    server = ServerThread(seeded_database, forbid_bare_newline="reject")
    yield server
    server.close()


def test_bare_lf_dot_does_not_end_data(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send(SMUGGLING_PAYLOAD)
        assert c.read_reply().startswith("250 2.0.0")
        assert c.command("QUIT") == str(replies.BYE)
    (message,) = smtp_server.messages  # one message: the smuggled one is its content
    assert b"Subject: smuggled" in message.content


def test_bare_lf_in_data_is_normalised_to_crlf(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send("From: s@ext.test\nSubject: one\n\nfirst\nsecond\r\n.\r\n")
        assert c.read_reply().startswith("250 2.0.0")
    (message,) = smtp_server.messages
    assert message.content.endswith(b"Subject: one\r\n\r\nfirst\r\nsecond\r\n")


def test_bare_cr_in_data_is_normalised_to_crlf(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send("Subject: hi\rFrom: ceo@sender.test\r\r\nFrom: x@attacker.test\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply().startswith("250 2.0.0")
    (message,) = smtp_server.messages
    assert message.content.endswith(
        b"Subject: hi\r\nFrom: ceo@sender.test\r\n\r\nFrom: x@attacker.test\r\n\r\nbody\r\n")


def test_cr_dot_cr_does_not_end_data(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send("From: s@ext.test\r\nSubject: one\r\n\r\nfirst\r.\rMAIL FROM:<admin@example.org>\r\n.\r\n")
        assert c.read_reply().startswith("250 2.0.0")
        assert c.command("QUIT") == str(replies.BYE)
    (message,) = smtp_server.messages
    assert message.content.endswith(b"first\r\n.\r\nMAIL FROM:<admin@example.org>\r\n")


def test_bare_lf_in_a_command_is_accepted_as_a_line_end(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.send("EHLO client.test\n")
        assert c.read_reply().startswith("250 ")


def test_bare_lf_dot_is_refused_in_reject_mode(rejecting_server: ServerThread) -> None:
    with RawClient(rejecting_server.host, rejecting_server.port) as c:
        _start_data(c)
        c.send(SMUGGLING_PAYLOAD)
        assert c.read_reply() == str(replies.BARE_NEWLINE)
        assert c.read_reply() == "(closed)"
    assert rejecting_server.messages == []


def test_bare_cr_in_data_is_refused_in_reject_mode(rejecting_server: ServerThread) -> None:
    with RawClient(rejecting_server.host, rejecting_server.port) as c:
        _start_data(c)
        c.send("Subject: hi\rFrom: ceo@sender.test\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply() == str(replies.BARE_CARRIAGE_RETURN)
        assert c.read_reply() == "(closed)"
    assert rejecting_server.messages == []


def test_bare_lf_in_a_command_is_refused_in_reject_mode(rejecting_server: ServerThread) -> None:
    with RawClient(rejecting_server.host, rejecting_server.port) as c:
        c.read_reply()
        c.send("EHLO client.test\n")
        assert c.read_reply() == str(replies.BARE_NEWLINE)
        assert c.read_reply() == "(closed)"


def test_dot_stuffing_is_removed(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send("From: s@ext.test\r\nSubject: x\r\n\r\n..leading dot\r\n.\r\n")
        assert c.read_reply().startswith("250")
    assert smtp_server.messages[0].content.endswith(b"\r\n.leading dot\r\n")


def test_long_data_lines_are_kept_intact(smtp_server: ServerThread) -> None:
    line = "y" * 5000
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send(f"From: s@ext.test\r\nSubject: x\r\n\r\n{line}\r\n.\r\n")
        assert c.read_reply().startswith("250")
    assert smtp_server.messages[0].content.endswith(line.encode() + b"\r\n")


def test_disconnect_mid_data_delivers_nothing(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send("Subject: half\r\n\r\nhalf a message\r\n")
    wait_until(lambda: smtp_server.open_connections() == 0)  # the session is over
    assert smtp_server.messages == []
    assert dialog(smtp_server, "NOOP")[-1] == str(replies.OK)  # still serving


def test_8bit_and_non_utf8_body_bytes_pass_unchanged(smtp_server: ServerThread) -> None:
    body = b"From: s@ext.test\r\nSubject: x\r\n\r\n\xff\xfe caf\xc3\xa9\r\n"
    with RawClient(smtp_server.host, smtp_server.port) as c:
        _start_data(c)
        c.send(body + b".\r\n")
        assert c.read_reply().startswith("250")
    assert smtp_server.messages[0].content.endswith(body)


# ---------------------------------------------------------------- limits


def test_declared_size_over_the_limit_is_refused(smtp_server: ServerThread) -> None:
    assert dialog(smtp_server, "MAIL FROM:<a@ext.test> SIZE=10240001")[-1] == str(
        replies.MESSAGE_TOO_BIG_DECLARED)


def test_message_over_the_size_limit_is_refused(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, message_size_limit=1000)
    try:
        with RawClient(server.host, server.port) as c:
            _start_data(c)
            c.send("From: s@ext.test\r\nSubject: big\r\n\r\n" + ("z" * 100 + "\r\n") * 20 + ".\r\n")
            assert c.read_reply() == str(replies.MESSAGE_TOO_BIG)
        assert server.messages == []
    finally:
        server.close()


def test_recipient_limit(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, recipient_limit=2)
    try:
        out = dialog(server, "MAIL FROM:<a@ext.test>", "RCPT TO:<alice@example.org>",
                     "RCPT TO:<multi@example.org>", "RCPT TO:<chain@example.org>")
        assert out[-1] == str(replies.TOO_MANY_RECIPIENTS)
    finally:
        server.close()


def test_hop_count_limit_stops_mail_loops(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, hopcount_limit=3)
    try:
        body = "Received: from a\r\n" * 4 + "From: s@ext.test\r\nSubject: loop\r\n\r\nx\r\n"
        with pytest.raises(smtplib.SMTPDataError) as error:
            send(server, ["alice@example.org"], body=body)
        assert (error.value.smtp_code, error.value.smtp_error.decode()) == (554, "5.4.6 Error: too many hops")
        assert server.messages == []
    finally:
        server.close()


def test_concurrent_connection_limit_per_client(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, client_connection_count_limit=2)
    try:
        first, second = RawClient(server.host, server.port), RawClient(server.host, server.port)
        assert first.read_reply().startswith("220") and second.read_reply().startswith("220")
        with RawClient(server.host, server.port) as third:
            assert third.read_reply() == str(replies.too_many_connections(HOSTNAME, "127.0.0.1"))
        first.close()
        wait_until(lambda: server.open_connections() == 1)  # the server saw the first go
        with RawClient(server.host, server.port) as fourth:
            assert fourth.read_reply().startswith("220")
        second.close()
    finally:
        server.close()


def test_connection_rate_limit_per_client(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, client_connection_rate_limit=3)
    try:
        got = []
        for _ in range(4):
            with RawClient(server.host, server.port) as c:
                got.append(c.read_reply())
        assert [r.startswith("220") for r in got] == [True, True, True, False]
        assert got[-1].startswith("421 4.7.0")
        with RawClient(server.host, server.port, source="127.0.0.3") as other:
            assert other.read_reply().startswith("220")  # limits are per client IP
    finally:
        server.close()


def test_500_rapid_connections_hold_the_limits_and_the_server_stays_up(smtp_server: ServerThread) -> None:
    admitted = refused = 0
    for _ in range(500):
        with RawClient(smtp_server.host, smtp_server.port, source="127.0.0.9") as c:
            reply = c.read_reply()
            admitted += reply.startswith("220")
            refused += reply.startswith("421 4.7.0")
    assert admitted == 60 and refused == 440
    assert rcpt_reply(smtp_server, "alice@example.org") == str(replies.RECIPIENT_OK)


def test_hard_error_limit_closes_the_session(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, hard_error_limit=3)
    try:
        with RawClient(server.host, server.port) as c:
            c.read_reply()
            c.command("XYZZY")
            c.command("XYZZY")
            assert c.command("XYZZY") == str(replies.UNRECOGNIZED)
            assert c.read_reply() == str(replies.too_many_errors(HOSTNAME))
            assert c.read_reply() == "(closed)"
    finally:
        server.close()


def test_idle_client_is_disconnected_with_421(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, command_timeout=0.5)
    try:
        with RawClient(server.host, server.port) as c:
            c.read_reply()
            assert c.read_reply() == str(replies.timeout_exceeded(HOSTNAME))
            assert c.read_reply() == "(closed)"
    finally:
        server.close()


def test_idle_timeout_counts_from_the_last_command(seeded_database: DatabaseSettings) -> None:
    """The timer is moved by each command, not armed once: a client that keeps talking
    for longer than the timeout in all is never cut off."""
    server = ServerThread(seeded_database, command_timeout=0.5)
    try:
        with RawClient(server.host, server.port) as c:
            c.read_reply()
            started = time.monotonic()
            while time.monotonic() - started < 1.2:  # the pauses are what is tested
                time.sleep(0.2)
                assert c.command("NOOP").startswith("250")
            assert c.read_reply() == str(replies.timeout_exceeded(HOSTNAME))
            assert time.monotonic() - started >= 1.2 + 0.5
    finally:
        server.close()


# ---------------------------------------------------------------- failures become 4xx


def test_database_outage_is_a_temporary_lookup_failure() -> None:
    with held_port() as nothing_listens:
        dead = DatabaseSettings(url=f"mysql://root@127.0.0.1:{nothing_listens}/maildb",
                                connect_timeout=0.5, query_timeout=0.5)
        server = ServerThread(dead)
        try:
            assert rcpt_reply(server, "alice@example.org") == str(
                replies.TEMPORARY_LOOKUP_FAILURE.about("alice@example.org"))
        finally:
            server.close()


class _ExplodingDelivery:
    async def deliver(self, message: object) -> Reply:
        raise RuntimeError("secret internal detail")

    async def close(self) -> None:
        pass


def test_internal_error_is_451_without_internal_text(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, delivery=_ExplodingDelivery())  # type: ignore[arg-type]
    try:
        with RawClient(server.host, server.port) as c:
            _start_data(c)
            c.send(BODY + ".\r\n")
            reply = c.read_reply()
        assert reply == str(replies.INTERNAL_ERROR)
        assert "secret" not in reply
    finally:
        server.close()


# ---------------------------------------------------------------- logs


def test_logs_never_contain_message_content(smtp_server: ServerThread,
                                            caplog: pytest.LogCaptureFixture) -> None:
    marker = "MARKER-7f3a9c-do-not-log"
    caplog.set_level("DEBUG")
    send(smtp_server, ["alice@example.org"],
         body=f"From: sender@ext.test\r\nSubject: {marker}\r\nX-Note: {marker}\r\n\r\n{marker}\r\n")
    assert smtp_server.messages
    assert marker not in caplog.text
    assert "client=unknown[127.0.0.1]" in caplog.text and "status=250 2.0.0" in caplog.text


def test_long_lines_count_once_against_the_size_limit(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, message_size_limit=8000)
    try:
        line = "w" * 5000
        with RawClient(server.host, server.port) as c:
            _start_data(c)
            c.send(f"From: s@ext.test\r\nSubject: x\r\n\r\n{line}\r\n.\r\n")
            assert c.read_reply().startswith("250")
        assert server.messages[0].content.endswith(line.encode() + b"\r\n")
    finally:
        server.close()


def test_dot_after_an_oversized_long_line_does_not_end_data(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, message_size_limit=3000)
    try:
        with RawClient(server.host, server.port) as c:
            _start_data(c)
            # The long line's last piece is ".", its line end arrives on its own.
            c.send("From: s@ext.test\r\nSubject: x\r\n\r\n" + "v" * 5000 + ".")
            wait_until_consumed(c.sock)  # the server has this piece before the next is sent
            c.send("\r\nmore\r\n.\r\n")
            assert c.read_reply() == str(replies.MESSAGE_TOO_BIG)
            assert c.command("NOOP") == str(replies.OK)
        assert server.messages == []
    finally:
        server.close()


def test_utf8_recipient_without_smtputf8_is_refused(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        c.send("RCPT TO:<jösé@example.org>\r\n".encode())
        assert c.read_reply() == str(replies.SMTPUTF8_REQUIRED)


def test_sender_with_a_control_character_is_refused(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.send(b'MAIL FROM:<"a\x1bb"@ext.test>\r\n')
        assert c.read_reply() == str(replies.UNFORWARDABLE_SENDER)


def test_each_destination_remembers_the_alias_the_sender_used(smtp_server: ServerThread) -> None:
    send(smtp_server, ["multi@example.org", "chain@example.org"])
    (message,) = smtp_server.messages
    assert message.aliases == {"a@sink.test": "multi@example.org",
                               "b@sink2.test": "multi@example.org",
                               "alice.dest@sink.test": "chain@example.org"}


def test_8bit_helo_is_refused_with_a_printable_reply(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.send(b"EHLO cli\xc3\xa9nt\xff.test\r\n")
        c.read_reply()
        c.command("MAIL FROM:<sender@ext.test>")
        assert c.command("RCPT TO:<alice@example.org>") == str(
            replies.INVALID_HELO.about("cli?nt?.test"))


def test_8bit_etrn_argument_is_echoed_as_question_marks(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.send(b"ETRN \xff\xfe\r\n")
        assert c.read_reply() == str(replies.ETRN_REFUSED.about("??"))
