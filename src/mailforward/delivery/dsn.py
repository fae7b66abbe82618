"""RFC 3464 delivery status notifications (bounces and delay warnings).

A DSN is a multipart/report (RFC 6522) of three parts: a human-readable
explanation, the machine-readable message/delivery-status, and the original
message's headers as text/rfc822-headers.  Only the headers are returned,
never the body: the body may be large, and returning it would make us a
reflector of arbitrary content to a possibly forged sender.

The DSN must be sent with the null envelope sender (``MAIL FROM:<>``) so it
can never cause another bounce; :func:`should_bounce` says when to send one.

Forwarding targets are private: a DSN names each failed destination by the
alias the sender used (Final-Recipient and Original-Recipient alike), every
text in it has the targets replaced the same way, and it is addressed to
the sender as the client gave it, never to our SRS address.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.message import Message as EmailMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, make_msgid
from io import BytesIO
from typing import Protocol

from ..headerfields import header_block
from .base import conceal_destinations

DSN_POLICY = compat32.clone(linesep="\r\n")
HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")  # a field start or a continuation
REPLY_STATUS = re.compile(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
DAEMON_SENDERS = {"mailer-daemon", "mailer_daemon", "mailerdaemon"}
MAX_TEXT_LINE = 900  # longer lines are sent quoted-printable
MAX_DIAGNOSTIC = 900  # longer diagnostics are cut, so the field stays within 998 octets
EXPIRED = "delivery time expired"  # the reason RetryScheduler gives when mail expires


class Original(Protocol):
    """What a DSN needs from the original message (``Message`` or ``SpooledMessage``).

    An optional ``created`` attribute (arrival time) gives Arrival-Date.
    """

    @property
    def queue_id(self) -> str: ...

    @property
    def sender(self) -> str: ...

    @property
    def content(self) -> bytes | bytearray: ...

    @property
    def bounce_to(self) -> str: ...

    @property
    def aliases(self) -> Mapping[str, str]: ...

    def alias_of(self, destination: str) -> str: ...


def should_bounce(sender: str) -> bool:
    """Whether a failure may be reported to ``sender``.

    Never to the null sender (RFC 5321 4.5.5: a bounce must not bounce),
    nor to a MAILER-DAEMON address: such mail is itself a notification, and
    answering it is how two daemons start a bounce loop.
    """
    if not sender.strip("<> "):
        return False
    local = sender.rpartition("@")[0] or sender
    return local.lower() not in DAEMON_SENDERS


def failures_from_reasons(reasons: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(recipient, status, diagnostic) for :func:`build_dsn` from the scheduler's reasons.

    A reason that is an SMTP reply (``"550 5.1.1 ..."``) keeps its enhanced
    status; an expiry is 4.4.7 (RFC 3463: delivery time expired); anything
    else is 5.0.0.
    """
    failures: list[tuple[str, str, str]] = []
    for rcpt, reason in reasons.items():
        match = REPLY_STATUS.match(reason)
        if reason.startswith(EXPIRED):
            status = "4.4.7"
        elif match:
            status = match.group(1)
        else:
            status = "4.0.0" if reason.startswith("4") else "5.0.0"
        failures.append((rcpt, status, reason))
    return failures


def build_dsn(*, reporting_mta: str, original: Original,
              failures: Sequence[tuple[str, str, str]], now: float,
              delayed: bool = False) -> bytes:
    """The DSN as bytes with CRLF line endings, ready to send from ``<>`` to the sender.

    ``failures`` are (recipient, status such as "5.1.1", diagnostic text),
    recipients being destinations: the DSN reports their aliases instead.
    With ``delayed`` it is a delay warning (Action: delayed) instead of a bounce.
    """
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    for _, status, _ in failures:
        if not STATUS.fullmatch(status):
            raise ValueError(f"invalid status {status!r}")
    failures = _as_the_sender_knows_them(original, failures)
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"MAILER-DAEMON@{reporting_mta} (Mail Delivery System)"
    report["To"] = _header_address(original.bounce_to)
    report["Subject"] = ("Delayed Mail (still being retried)" if delayed
                         else "Undelivered Mail Returned to Sender")
    report["Date"] = _date(now)
    report["Message-ID"] = make_msgid(idstring=original.queue_id, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a MIME-encapsulated message."
    report.attach(_text_part(_explanation(reporting_mta, original, failures, delayed), "plain"))
    report.attach(_status_part(reporting_mta, original, failures, now, delayed))
    headers = original_headers(original.content).decode("ascii", "replace")
    report.attach(_text_part(conceal_destinations(headers, original.aliases), "rfc822-headers"))
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=DSN_POLICY).flatten(report)
    return out.getvalue()


def original_headers(content: bytes | bytearray) -> bytes:
    """The header section of ``content`` (CRLF line endings), never any of the body.

    It stops at the first line that is neither a header field nor a
    continuation, not only at the blank line, so malformed content cannot
    smuggle body lines in.  Non-ASCII bytes become ``?`` (the part is 7-bit).
    """
    lines: list[bytes] = []
    for line in header_block(content).splitlines():
        if not HEADER_LINE.match(line) or (not lines and line[:1] in b" \t"):
            break
        lines.append(re.sub(rb"[^\t\x20-\x7e]", b"?", line))
    return b"".join(line + b"\r\n" for line in lines)


def _as_the_sender_knows_them(original: Original, failures: Sequence[tuple[str, str, str]]
                              ) -> list[tuple[str, str, str]]:
    """``failures`` with each destination replaced by its alias, in the address and the text."""
    return [(original.alias_of(rcpt), status, conceal_destinations(diagnostic, original.aliases))
            for rcpt, status, diagnostic in failures]


# --- parts


def _explanation(reporting_mta: str, original: Original,
                 failures: Sequence[tuple[str, str, str]], delayed: bool) -> str:
    """The human-readable part, worded like Postfix's so users recognise it."""
    if delayed:
        intro = ("This is the mail system at host {host}.\n\n"
                 "####################################################################\n"
                 "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
                 "####################################################################\n\n"
                 "Your message could not be delivered yet to one or more recipients.\n"
                 "The mail system will keep trying.\n")
    else:
        intro = ("This is the mail system at host {host}.\n\n"
                 "I'm sorry to have to inform you that your message could not\n"
                 "be delivered to one or more recipients. Its headers are attached below.\n\n"
                 "For further assistance, please send mail to postmaster.\n\n"
                 "If you do so, please include this problem report. You can\n"
                 "delete your own text from the attached returned headers.\n")
    lines = [intro.format(host=reporting_mta), f"Queue ID: {original.queue_id}", ""]
    lines += [f"<{rcpt}>: {diagnostic}" for rcpt, _, diagnostic in failures]
    return "\n".join(lines) + "\n"


def _status_part(reporting_mta: str, original: Original,
                 failures: Sequence[tuple[str, str, str]], now: float,
                 delayed: bool) -> MIMEBase:
    """message/delivery-status: one per-message block, then one block per recipient."""
    per_message = EmailMessage()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Mailforward-Queue-ID"] = original.queue_id
    per_message["X-Mailforward-Sender"] = f"rfc822; {_ascii(original.sender)}"
    created = getattr(original, "created", None)
    arrival = created if isinstance(created, (int, float)) else now
    per_message["Arrival-Date"] = _date(arrival)
    blocks: list[EmailMessage | str] = [per_message]
    for rcpt, status, diagnostic in failures:
        block = EmailMessage()
        block["Original-Recipient"] = _final_recipient(rcpt)
        block["Final-Recipient"] = _final_recipient(rcpt)
        block["Action"] = "delayed" if delayed else "failed"
        block["Status"] = status
        block["Diagnostic-Code"] = _diagnostic_code(diagnostic)
        blocks.append(block)
    part = MIMEBase("message", "delivery-status")
    del part["MIME-Version"]  # only the top level has one
    part.set_payload(blocks)
    return part


def _text_part(text: str, subtype: str) -> MIMEText:
    """7-bit when it can be, else UTF-8 quoted-printable (still 7-bit safe, still readable).

    Quoted-printable also wraps lines too long for SMTP (RFC 5321: 998 octets).
    """
    if text.isascii() and all(len(line) <= MAX_TEXT_LINE for line in text.splitlines()):
        part = MIMEText(text, subtype, "us-ascii")
    else:
        charset = Charset("utf-8")
        charset.body_encoding = QP
        part = MIMEText(text, subtype, charset)  # type: ignore[arg-type]  # typeshed: str only
    del part["MIME-Version"]  # only the top level has one
    return part


def _date(timestamp: float) -> str:
    """An RFC 5322 date in UTC (+0000, not the "unknown zone" -0000)."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _final_recipient(address: str) -> str:
    """rfc822 for ASCII addresses, RFC 6533 utf-8 (\\x{..} escaped) otherwise.

    Used for Original-Recipient too: both name the address the sender used.
    """
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_ascii(address)}"


def _diagnostic_code(text: str) -> str:
    """``smtp;`` for a remote SMTP reply, our own type for our own reasons (RFC 3464 2.3.6)."""
    kind = "smtp" if re.match(r"\d{3}\b", text) else "X-Mailforward"
    text = _ascii(" ".join(text.split()))
    if len(text) > MAX_DIAGNOSTIC:  # a field line cannot be wrapped inside a long word
        text = text[:MAX_DIAGNOSTIC] + "..."
    return f"{kind}; {text}"


def _header_address(address: str) -> str:
    """An address for the ``To:`` field exactly as the sender wrote it.

    A UTF-8 address stays UTF-8 (RFC 6532; the DSN then travels with
    SMTPUTF8): an encoded-word is no address.  Anything unprintable is
    escaped, so no address can break the header.  The surrogate escapes make
    the compat32 generator write the UTF-8 bytes unchanged.
    """
    if not address.isprintable():
        return _ascii(address)
    return address.encode("utf-8").decode("ascii", "surrogateescape")


def _ascii(text: str) -> str:
    """Non-ASCII as RFC 6533 ``\\x{HEX}``: DSN fields are 7-bit."""
    return "".join(c if " " <= c <= "~" else f"\\x{{{ord(c):X}}}" for c in text)
