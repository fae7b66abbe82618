"""Delivery status notifications (mailforward.delivery.dsn), read back with the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import Message as EmailMessage

import pytest

from mailforward.delivery.base import Message, RecipientDsn, decode_xtext
from mailforward.delivery.dsn import (
    MAX_RETURNED_MESSAGE,
    build_dsn,
    failures_from_reasons,
    original_headers,
    should_bounce,
)
from mailforward.delivery.spool import SpooledMessage

T0 = 1_700_000_000.0
BODY_MARKER = b"UNIQUE-BODY-MARKER-7f3a9c"
ORIGINAL = (b"From: Alice <alice@example.org>\r\n"
            b"To: bob@x.test\r\n"
            b"Subject: quarterly numbers\r\n"
            b"Message-ID: <orig-1@example.org>\r\n"
            b"\r\n"
            b"Hello Bob,\r\n" + BODY_MARKER + b"\r\n")
FAILURES = [("bob@x.test", "5.1.1", "550 5.1.1 <bob@x.test>: Recipient address rejected"),
            ("carol@y.test", "4.4.7", "delivery time expired")]


def build(failures: list[tuple[str, str, str]] = FAILURES, delayed: bool = False,
          content: bytes = ORIGINAL) -> bytes:
    original = Message("ABC123", "alice@example.org", ("bob@x.test", "carol@y.test"), content)
    return build_dsn(reporting_mta="mx.example.net", original=original, failures=failures,
                     now=T0, delayed=delayed)


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def parts(data: bytes | EmailMessage) -> list[EmailMessage]:
    payload = (parse(data) if isinstance(data, bytes) else data).get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, EmailMessage)]


def decoded(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def status_blocks(data: bytes) -> list[EmailMessage]:
    return parts(parts(data)[1])


def test_dsn_is_a_delivery_status_report() -> None:
    dsn = parse(build())
    assert (dsn.get_content_type(), dsn.get_param("report-type")) == (
        "multipart/report", "delivery-status")


def test_dsn_has_text_status_and_headers_parts_in_order() -> None:
    assert [p.get_content_type() for p in parts(build())] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_dsn_returns_the_original_headers() -> None:
    headers = decoded(parts(build())[2])
    assert b"Subject: quarterly numbers" in headers
    assert b"Message-ID: <orig-1@example.org>" in headers


def test_dsn_never_returns_the_original_body() -> None:
    assert BODY_MARKER not in build()


def test_dsn_names_the_original_queue_id_in_the_report_and_the_text() -> None:
    data = build()
    per_message = status_blocks(data)[0]
    assert per_message["X-Mailforward-Queue-ID"] == "ABC123"
    assert "Reporting-MTA" in per_message and "Final-Recipient" not in per_message
    assert b"Queue ID: ABC123" in decoded(parts(data)[0])


def test_dsn_is_from_mailer_daemon_to_the_original_sender() -> None:
    dsn = parse(build())
    assert dsn["From"].startswith("MAILER-DAEMON@mx.example.net")
    assert dsn["To"] == "alice@example.org"


def test_dsn_is_marked_auto_replied() -> None:
    assert parse(build())["Auto-Submitted"] == "auto-replied"


def test_dsn_uses_crlf_line_endings_only() -> None:
    data = build()
    assert data.count(b"\n") == data.count(b"\r\n") > 0


def test_dsn_lines_fit_smtp_limits() -> None:
    long_text = "550 5.1.1 " + "x" * 2000
    data = build([("bob@x.test", "5.1.1", long_text)])
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_per_message_fields_name_the_reporting_mta_and_arrival() -> None:
    fields = status_blocks(build())[0]
    assert fields["Reporting-MTA"] == "dns; mx.example.net"
    assert fields["Arrival-Date"]


def test_each_failed_recipient_has_its_own_status_block() -> None:
    blocks = status_blocks(build())[1:]
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; bob@x.test", "failed", "5.1.1"),
        ("rfc822; carol@y.test", "failed", "4.4.7")]


def test_smtp_reply_is_given_as_smtp_diagnostic_code() -> None:
    block = status_blocks(build())[1]
    assert " ".join(block["Diagnostic-Code"].split()) == (
        "smtp; 550 5.1.1 <bob@x.test>: Recipient address rejected")


def test_own_reason_is_not_claimed_to_be_an_smtp_reply() -> None:
    block = status_blocks(build())[2]
    assert block["Diagnostic-Code"] == "X-Mailforward; delivery time expired"


def test_delayed_dsn_says_delayed() -> None:
    blocks = status_blocks(build([("bob@x.test", "4.4.1", "451 4.4.1 busy")], delayed=True))
    assert blocks[1]["Action"] == "delayed"


def test_human_readable_part_names_each_recipient_and_reason() -> None:
    text = decoded(parts(build())[0]).decode()
    assert "<bob@x.test>: 550 5.1.1" in text and "<carol@y.test>: delivery time expired" in text


def test_arrival_date_comes_from_the_spooled_message() -> None:
    spooled = SpooledMessage(
        queue_id="ABC123", sender="alice@example.org", pending=("bob@x.test",), delivered=(),
        failed=(), created=T0 - 86400, attempts=3, next_attempt=T0, errors={},
        size=len(ORIGINAL), content=ORIGINAL)
    data = build_dsn(reporting_mta="mx.example.net", original=spooled,
                     failures=FAILURES[:1], now=T0)
    assert status_blocks(data)[0]["Arrival-Date"] == "Mon, 13 Nov 2023 22:13:20 +0000"


def test_non_ascii_recipient_is_escaped_as_utf8_address_type() -> None:
    block = status_blocks(build([("jörg@x.test", "5.1.1", "550 5.1.1 unknown")]))[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@x.test"


def test_dsn_needs_at_least_one_failure() -> None:
    with pytest.raises(ValueError):
        build([])


def test_dsn_refuses_a_malformed_status() -> None:
    with pytest.raises(ValueError):
        build([("bob@x.test", "550", "550 no")])


# --- original_headers


def test_original_headers_stop_at_the_blank_line() -> None:
    assert original_headers(b"A: 1\nB: 2\n  folded\n\nbody: looks like a header\n") == (
        b"A: 1\r\nB: 2\r\n  folded\r\n")


def test_original_headers_stop_at_a_line_that_is_no_header() -> None:
    assert original_headers(b"A: 1\r\n" + BODY_MARKER + b"\r\nB: 2\r\n") == b"A: 1\r\n"


def test_original_headers_of_headerless_content_are_empty() -> None:
    assert original_headers(b"just a body\r\n") == b""


# --- should_bounce


def test_null_sender_never_gets_a_bounce() -> None:
    assert should_bounce("") is False


def test_mailer_daemon_never_gets_a_bounce() -> None:
    assert should_bounce("MAILER-DAEMON@example.org") is False


def test_ordinary_sender_gets_a_bounce() -> None:
    assert should_bounce("alice@example.org") is True


def test_postmaster_gets_a_bounce() -> None:
    assert should_bounce("postmaster@example.org") is True


# --- failures_from_reasons


def test_reply_reason_keeps_its_enhanced_status() -> None:
    assert failures_from_reasons({"b@x": "550 5.1.1 <b@x>: unknown"}) == [
        ("b@x", "5.1.1", "550 5.1.1 <b@x>: unknown")]


def test_expiry_reason_is_status_4_4_7() -> None:
    [(_, status, _)] = failures_from_reasons(
        {"b@x": "delivery time expired (last error: 451 4.4.1 busy)"})
    assert status == "4.4.7"


def test_reason_without_status_is_5_0_0() -> None:
    [(_, status, _)] = failures_from_reasons({"b@x": "something broke"})
    assert status == "5.0.0"


# --- privacy: the sender learns the alias it used, never the forwarding target

TARGET = "private.box@target.test"
ALIAS = "friend@alias.test"
TARGET_REPLY = f"550 5.1.1 <{TARGET}>: Recipient address rejected"


def build_forwarded(content: bytes = ORIGINAL, original_sender: str = "alice@example.org") -> bytes:
    """A DSN for ``ALIAS`` -> ``TARGET``, forwarded with an SRS envelope sender."""
    original = Message("ABC123", "SRS0=ab=CD=example.org=alice@fwd.test", (TARGET,), content,
                       original_sender=original_sender, aliases={TARGET: ALIAS})
    return build_dsn(reporting_mta="mx.example.net", original=original,
                     failures=[(TARGET, "5.1.1", TARGET_REPLY)], now=T0)


def test_final_recipient_is_the_alias() -> None:
    assert status_blocks(build_forwarded())[1]["Final-Recipient"] == f"rfc822; {ALIAS}"


def test_original_recipient_is_the_alias() -> None:
    assert status_blocks(build_forwarded())[1]["Original-Recipient"] == f"rfc822; {ALIAS}"


def test_diagnostic_code_names_the_alias_not_the_target() -> None:
    block = status_blocks(build_forwarded())[1]
    assert " ".join(block["Diagnostic-Code"].split()) == (
        f"smtp; 550 5.1.1 <{ALIAS}>: Recipient address rejected")


def test_human_readable_part_names_the_alias() -> None:
    text = decoded(parts(build_forwarded())[0]).decode()
    assert f"<{ALIAS}>: 550 5.1.1 <{ALIAS}>: Recipient address rejected" in text


def test_returned_headers_do_not_name_the_target() -> None:
    content = f"To: {TARGET.upper()}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    assert decoded(parts(build_forwarded(content))[2]) == f"To: {ALIAS}\r\nSubject: s\r\n".encode()


def test_target_appears_nowhere_in_a_dsn() -> None:
    assert TARGET.encode() not in build_forwarded().lower()


def test_dsn_is_addressed_to_the_sender_as_the_client_gave_it_not_the_srs_address() -> None:
    assert parse(build_forwarded())["To"] == "alice@example.org"


def test_dsn_to_a_utf8_sender_names_it_in_utf8_not_in_an_encoded_word() -> None:
    data = build_forwarded(original_sender="s\u00e9nder@sender.test")
    assert b"\r\nTo: s\xc3\xa9nder@sender.test\r\n" in data


def test_sender_with_a_line_break_cannot_add_a_header_to_the_dsn() -> None:
    data = build_forwarded(original_sender="a@b.test\r\nBcc: victim@c.test")
    assert b"\r\nBcc:" not in data


# --- RFC 3461: what the sender asked for with RET, ENVID, ORCPT and NOTIFY

EIGHT_BIT = b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nGr\xc3\xbc\xc3\x9fe \xff\r\n"


def build_with(content: bytes = ORIGINAL, ret: str = "", envid: str = "", orcpt: str = "",
               relayed: bool = False) -> bytes:
    original = Message("ABC123", "alice@example.org", ("bob@x.test",), content, dsn_ret=ret,
                       dsn_envid=envid, dsn={"bob@x.test": RecipientDsn("", orcpt)})
    status = "2.0.0" if relayed else "5.1.1"
    return build_dsn(reporting_mta="mx.example.net", original=original,
                     failures=[("bob@x.test", status, "550 5.1.1 unknown")], now=T0,
                     relayed=relayed)


def test_ret_full_returns_the_message_byte_for_byte() -> None:
    assert EIGHT_BIT in build_with(EIGHT_BIT, ret="FULL")


def test_ret_full_of_8bit_content_is_declared_8bit() -> None:
    part = parts(build_with(EIGHT_BIT, ret="FULL"))[2]
    assert (part.get_content_type(), part["Content-Transfer-Encoding"]) == (
        "message/rfc822", "8bit")


def test_report_enclosing_8bit_content_is_declared_8bit() -> None:
    assert parse(build_with(EIGHT_BIT, ret="FULL"))["Content-Transfer-Encoding"] == "8bit"


def test_ret_full_keeps_every_line_within_smtp_limits() -> None:
    data = build_with(ret="FULL")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_ret_full_with_a_line_smtp_cannot_carry_returns_headers_only() -> None:
    content = ORIGINAL + b"y" * 1200 + b"\r\n"
    assert parts(build_with(content, ret="FULL"))[2].get_content_type() == "text/rfc822-headers"


def sized(size: int) -> bytes:
    """ORIGINAL padded with short lines to exactly ``size`` octets."""
    padded = ORIGINAL + (b"z" * 98 + b"\r\n") * (size // 100 + 1)
    return padded[:size - 2] + b"\r\n"


def test_ret_full_up_to_the_size_cap_returns_the_message() -> None:
    content = sized(MAX_RETURNED_MESSAGE)
    assert parts(build_with(content, ret="FULL"))[2].get_content_type() == "message/rfc822"


def test_ret_full_one_octet_above_the_cap_returns_headers_only() -> None:
    content = sized(MAX_RETURNED_MESSAGE + 1)
    assert parts(build_with(content, ret="FULL"))[2].get_content_type() == "text/rfc822-headers"


def test_ret_full_says_the_message_is_attached() -> None:
    assert b"It is attached below." in decoded(parts(build_with(ret="FULL"))[0])


def test_envid_is_decoded_from_xtext() -> None:
    assert status_blocks(build_with(envid="a+2Bb+3Dc"))[0]["Original-Envelope-Id"] == "a+b=c"


def test_envid_comes_first_in_the_per_message_fields() -> None:
    assert list(status_blocks(build_with(envid="E1"))[0].keys())[:2] == [
        "Original-Envelope-Id", "Reporting-MTA"]


def test_envid_with_an_encoded_line_break_cannot_add_a_field() -> None:
    data = build_with(envid="x+0D+0ABcc:+20victim@c.test")
    assert b"\r\nBcc:" not in data
    assert status_blocks(data)[0]["Original-Envelope-Id"] == "x\\x{D}\\x{A}Bcc: victim@c.test"


def test_orcpt_with_another_address_type_keeps_it() -> None:
    block = status_blocks(build_with(orcpt="x-local;bob+2Bold"))[1]
    assert block["Original-Recipient"] == "x-local; bob+old"


def test_malformed_orcpt_falls_back_to_the_final_recipient() -> None:
    block = status_blocks(build_with(orcpt="no-semicolon"))[1]
    assert block["Original-Recipient"] == "rfc822; bob@x.test"


def test_orcpt_naming_the_private_target_names_the_alias() -> None:
    original = Message("ABC123", "alice@example.org", (TARGET,), ORIGINAL,
                       aliases={TARGET: ALIAS}, dsn={TARGET: RecipientDsn("", f"rfc822;{TARGET}")})
    data = build_dsn(reporting_mta="mx.example.net", original=original,
                     failures=[(TARGET, "5.1.1", TARGET_REPLY)], now=T0)
    assert status_blocks(data)[1]["Original-Recipient"] == f"rfc822; {ALIAS}"


def test_relayed_report_says_relayed_and_is_no_bounce() -> None:
    data = build_with(relayed=True)
    assert (parse(data)["Subject"], status_blocks(data)[1]["Action"]) == (
        "Successful Mail Delivery Report", "relayed")


@pytest.mark.parametrize("notify, event, wanted", [
    ("", "FAILURE", True), ("", "SUCCESS", False), ("NEVER", "FAILURE", False),
    ("SUCCESS", "FAILURE", False), ("SUCCESS,DELAY", "SUCCESS", True),
    ("DELAY,FAILURE", "FAILURE", True)])
def test_notify_decides_which_reports_are_wanted(notify: str, event: str, wanted: bool) -> None:
    assert RecipientDsn(notify).notifies(event) is wanted


def test_xtext_decodes_to_utf8() -> None:
    assert decode_xtext("j+C3+B6rg") == "j\u00f6rg"
