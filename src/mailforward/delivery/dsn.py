"""RFC 3464 delivery status notifications (bounces and delay warnings).

A DSN is a multipart/report (RFC 6522) of three parts: a human-readable
explanation, the machine-readable message/delivery-status, and the original
message: its headers as text/rfc822-headers, or all of it as message/rfc822
when the sender asked with ``RET=FULL`` and it is at most
:data:`MAX_RETURNED_MESSAGE` octets (Postfix's ``bounce_size_limit``; a larger
one, or one whose lines SMTP cannot carry, is returned as headers only, as
Postfix does).  By default only the headers are returned: the body may be
large, and returning it unasked would make us a reflector of arbitrary
content to a possibly forged sender.

The sender's RFC 3461 wishes are honoured: :func:`wants_dsn` says whether a
recipient's ``NOTIFY`` asks for a report of an event, the ``ENVID`` comes
back as ``Original-Envelope-Id`` and a recipient's ``ORCPT`` as its
``Original-Recipient``.  Success reports are only "relayed" ones (the next
hop could not pass ``NOTIFY=SUCCESS`` on); they and delay warnings return
headers only whatever ``RET`` says (RFC 3461 4.3: RET is about failure
reports).

The DSN must be sent with the null envelope sender (``MAIL FROM:<>``) so it
can never cause another bounce; :func:`should_bounce` says when to send one.

Forwarding targets are private: a DSN names each failed destination by the
alias the sender used (Final-Recipient, and Original-Recipient unless the
client gave an ORCPT), every text in it has the targets replaced the same
way (the returned message included), and it is addressed to the sender as
the client gave it, never to our SRS address.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from .base import RecipientDsn, conceal_destinations, decode_xtext, for_the_sender, is_xtext, orcpt_parts

DSN_POLICY = compat32.clone(linesep="\r\n")
HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")  # a field start or a continuation
REPLY_STATUS = re.compile(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
DAEMON_SENDERS = {"mailer-daemon", "mailer_daemon", "mailerdaemon"}
MAX_TEXT_LINE = 900  # longer lines are sent quoted-printable
MAX_DIAGNOSTIC = 900  # longer diagnostics are cut, so the field stays within 998 octets
EXPIRED = "delivery time expired"  # the reason RetryScheduler gives when mail expires
MAX_RETURNED_MESSAGE = 50_000  # RET=FULL returns the whole message up to this size (Postfix)
MAX_SMTP_LINE = 998  # RFC 5321 4.5.3.1.6, without CRLF


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

    @property
    def dsn_ret(self) -> str: ...

    @property
    def dsn_envid(self) -> str: ...

    def alias_of(self, destination: str) -> str: ...

    def dsn_of(self, destination: str) -> RecipientDsn: ...


def wants_dsn(original: Original, destination: str, event: str) -> bool:
    """Whether the sender asked (or by default gets) a DSN about ``event`` for ``destination``.

    ``event`` is "FAILURE", "DELAY" or "SUCCESS" (RFC 3461 4.1): ``NOTIFY=NEVER``
    wants none, ``NOTIFY`` without FAILURE no failure report, and without
    ``NOTIFY`` failures are reported but success is not.
    """
    return original.dsn_of(destination).notifies(event)


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


@dataclass(frozen=True)
class _Row:
    """One recipient as the report shows it: never the private destination."""

    final: str  # the alias the sender used
    original: str  # Original-Recipient's value
    status: str
    diagnostic: str


def build_dsn(*, reporting_mta: str, original: Original,
              failures: Sequence[tuple[str, str, str]], now: float,
              delayed: bool = False, relayed: bool = False) -> bytes:
    """The DSN as bytes with CRLF line endings, ready to send from ``<>`` to the sender.

    ``failures`` are (recipient, status such as "5.1.1", diagnostic text),
    recipients being destinations: the DSN reports their aliases instead.
    With ``delayed`` it is a delay warning (Action: delayed) instead of a
    bounce; with ``relayed`` a success report (Action: relayed, status 2.x.x)
    for recipients handed to a next hop that could not take NOTIFY=SUCCESS.
    Which recipients want the report is the caller's choice (:func:`wants_dsn`).
    """
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    for _, status, _ in failures:
        if not STATUS.fullmatch(status):
            raise ValueError(f"invalid status {status!r}")
    action = "relayed" if relayed else "delayed" if delayed else "failed"
    rows = _as_the_sender_knows_them(original, failures)
    returned = _returnable_message(original) if action == "failed" else None
    boundary = _boundary(returned or b"")
    report = MIMEMultipart("report", boundary=boundary, report_type="delivery-status")
    report["From"] = f"MAILER-DAEMON@{reporting_mta} (Mail Delivery System)"
    report["To"] = _header_address(original.bounce_to)
    report["Subject"] = {"relayed": "Successful Mail Delivery Report",
                         "delayed": "Delayed Mail (still being retried)",
                         "failed": "Undelivered Mail Returned to Sender"}[action]
    report["Date"] = _date(now)
    report["Message-ID"] = make_msgid(idstring=original.queue_id, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    if returned is not None and not returned.isascii():
        report["Content-Transfer-Encoding"] = "8bit"  # what it encloses (RFC 2045 6.4)
    report.preamble = "This is a MIME-encapsulated message."
    report.attach(_text_part(_explanation(reporting_mta, original, rows, action,
                                          returned is not None), "plain"))
    report.attach(_status_part(reporting_mta, original, rows, now, action))
    placeholder = ""
    if returned is None:
        headers = original_headers(original.content).decode("ascii", "replace")
        report.attach(_text_part(conceal_destinations(headers, original.aliases),
                                 "rfc822-headers"))
    else:
        placeholder = f"returned-message-{secrets.token_hex(16)}"
        report.attach(_message_part(placeholder, eight_bit=not returned.isascii()))
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=DSN_POLICY).flatten(report)
    data = out.getvalue()
    if returned is not None:
        # The generator would re-encode the message: it is put in as it is, once.
        data = data.replace(placeholder.encode("ascii"), returned, 1)
    return data


def _returnable_message(original: Original) -> bytes | None:
    """The whole message to return (targets concealed), or None to return headers only.

    Only with RET=FULL, only up to :data:`MAX_RETURNED_MESSAGE`, and only if
    every line fits SMTP's limit (message/rfc822 cannot be re-encoded).
    """
    content = original.content
    if original.dsn_ret != "FULL" or len(content) > MAX_RETURNED_MESSAGE:
        return None
    if any(len(line) > MAX_SMTP_LINE for line in content.splitlines()):
        return None
    # surrogateescape: bytes that are not UTF-8 come back out unchanged
    text = bytes(content).decode("utf-8", "surrogateescape")
    concealed = conceal_destinations(text, original.aliases).encode("utf-8", "surrogateescape")
    if not concealed.endswith(b"\n"):
        concealed += b"\r\n"
    return concealed


def _boundary(returned: bytes) -> str:
    """A MIME boundary that does not occur in the returned message."""
    while True:
        boundary = f"=_mailforward_{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in returned:
            return boundary


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
                              ) -> list[_Row]:
    """``failures`` with each destination replaced by its alias, in the address and the text.

    Original-Recipient is the ORCPT the client gave (xtext decoded, its
    address type kept), else the alias.
    """
    rows: list[_Row] = []
    for rcpt, status, diagnostic in failures:
        alias = original.alias_of(rcpt)
        orcpt = orcpt_parts(original.dsn_of(rcpt).orcpt)
        if orcpt is None:
            original_recipient = _final_recipient(alias)
        else:
            address = conceal_destinations(decode_xtext(orcpt[1]), original.aliases)
            original_recipient = f"{orcpt[0]}; {_ascii(address)}"
        rows.append(_Row(alias, original_recipient, status,
                         for_the_sender(conceal_destinations(diagnostic, original.aliases),
                                        alias)))
    return rows


# --- parts


def _explanation(reporting_mta: str, original: Original, rows: Sequence[_Row], action: str,
                 full: bool) -> str:
    """The human-readable part, worded like Postfix's so users recognise it."""
    if action == "relayed":
        intro = ("This is the mail system at host {host}.\n\n"
                 "Your message was successfully relayed to the destination(s)\n"
                 "listed below, to a mail system that does not report delivery\n"
                 "itself. You will receive no further notifications of success;\n"
                 "you may still receive notifications of mail delivery errors\n"
                 "from other systems.\n")
    elif action == "delayed":
        intro = ("This is the mail system at host {host}.\n\n"
                 "####################################################################\n"
                 "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
                 "####################################################################\n\n"
                 "Your message could not be delivered yet to one or more recipients.\n"
                 "The mail system will keep trying.\n")
    else:
        returned = ("It is attached below", "returned message") if full else (
            "Its headers are attached below", "returned headers")
        intro = ("This is the mail system at host {host}.\n\n"
                 "I'm sorry to have to inform you that your message could not\n"
                 f"be delivered to one or more recipients. {returned[0]}.\n\n"
                 "For further assistance, please send mail to postmaster.\n\n"
                 "If you do so, please include this problem report. You can\n"
                 f"delete your own text from the attached {returned[1]}.\n")
    lines = [intro.format(host=reporting_mta), f"Queue ID: {original.queue_id}", ""]
    lines += [f"<{row.final}>: {row.diagnostic}" for row in rows]
    return "\n".join(lines) + "\n"


def _status_part(reporting_mta: str, original: Original, rows: Sequence[_Row], now: float,
                 action: str) -> MIMEBase:
    """message/delivery-status: one per-message block, then one block per recipient.

    Fields in RFC 3464's order; extension fields (``X-``) after the standard ones.
    """
    per_message = EmailMessage()
    if original.dsn_envid and is_xtext(original.dsn_envid):
        envid = conceal_destinations(decode_xtext(original.dsn_envid), original.aliases)
        per_message["Original-Envelope-Id"] = _ascii(envid)
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    created = getattr(original, "created", None)
    arrival = created if isinstance(created, (int, float)) else now
    per_message["Arrival-Date"] = _date(arrival)
    per_message["X-Mailforward-Queue-ID"] = original.queue_id
    per_message["X-Mailforward-Sender"] = f"rfc822; {_ascii(original.sender)}"
    blocks: list[EmailMessage | str] = [per_message]
    for row in rows:
        block = EmailMessage()
        block["Original-Recipient"] = row.original
        block["Final-Recipient"] = _final_recipient(row.final)
        block["Action"] = action
        block["Status"] = row.status
        block["Diagnostic-Code"] = _diagnostic_code(row.diagnostic)
        blocks.append(block)
    part = MIMEBase("message", "delivery-status")
    del part["MIME-Version"]  # only the top level has one
    part.set_payload(blocks)
    return part


def _message_part(placeholder: str, eight_bit: bool) -> MIMEBase:
    """message/rfc822 holding ``placeholder``, for :func:`build_dsn` to replace by the message.

    A message/rfc822 part cannot be base64 or quoted-printable (RFC 2046
    5.2.1): 8-bit content is declared as such, and the DSN sent with
    BODY=8BITMIME.
    """
    part = MIMEBase("message", "rfc822")
    del part["MIME-Version"]  # only the top level has one
    part["Content-Transfer-Encoding"] = "8bit" if eight_bit else "7bit"
    part.set_payload(placeholder)
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
