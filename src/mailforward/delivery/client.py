"""Outbound SMTP: one transaction per destination domain, via aiosmtplib.

Results are per recipient (a ``Reply`` each: 250 accepted, 4xx deferred,
5xx failed), like aiosmtplib's own per-recipient errors.  A next hop that
cannot be reached, or that answers 4xx before any recipient was offered, is
skipped for the next one, as Postfix's smtp(8) does.

Nothing that goes wrong while offering a message to one domain escapes from
here as an exception: an address that cannot be written is a permanent
failure before any connection, UTF-8 that the next hop cannot carry is a
permanent ``553 5.6.7``, 8-bit content that it cannot carry a permanent
``554 5.6.3``, and anything unexpected is a temporary ``451 4.3.0``
(:func:`.base.internal_failure`).  Replies passed back from downstream name
the alias the sender used, never the private forwarding target.

What the sender declared travels on when the next hop offers the extension,
and is dropped otherwise (RFC 3461 4.1): ``BODY`` (RFC 6152; ``8BITMIME`` is
also declared for undeclared 8-bit content), and the DSN parameters ``RET``
and ``ENVID`` on MAIL, ``NOTIFY`` and ``ORCPT`` on each RCPT.  8-bit content
is never sent to a hop without 8BITMIME: those recipients fail (no 7-bit
conversion; see :data:`EIGHT_BIT_UNSUPPORTED`).  A recipient that asked for
``NOTIFY=SUCCESS`` and is accepted by a hop without DSN gets
:data:`RELAYED_WITHOUT_DSN` instead of :data:`ACCEPTED`: the sender is owed a
"relayed" DSN (RFC 3461 6.2.1), which the caller sends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
import aiosmtplib.email

from ..addresses import is_sendable
from ..smtpd.replies import Reply
from .base import MAX_ENVID, Message, conceal_destinations, internal_failure, is_xtext, orcpt_parts
from .routing import NextHop

log = logging.getLogger(__name__)

ACCEPTED = Reply(250, "2.0.0", "Ok")
SMTPUTF8_UNSUPPORTED = Reply(553, "5.6.7",
                             "destination does not support SMTPUTF8, which this message needs")
UNWRITABLE_SENDER = Reply(553, "5.1.7", "sender address cannot be written in an SMTP command")
UNWRITABLE_RECIPIENT = Reply(553, "5.1.3",
                             "recipient address cannot be written in an SMTP command")
# RFC 3463 5.6.3, conversion required but not supported: we do not downgrade to 7 bits.
EIGHT_BIT_UNSUPPORTED = Reply(554, "5.6.3",
                              "next hop does not accept 8-bit data, which this message has")
# Accepted by a hop that cannot pass NOTIFY=SUCCESS on: the sender gets a "relayed" DSN.
RELAYED_WITHOUT_DSN = Reply(250, "2.0.0", "Ok: relayed to a next hop that does not offer DSN")


@dataclass(frozen=True)
class ClientSettings:
    helo: str
    connect_timeout: float = 30.0
    command_timeout: float = 300.0


class _TryNextHop(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def downstream_reply(error: aiosmtplib.SMTPResponseException, destination: str,
                     message: Message) -> Reply:
    """The downstream's code, enhanced code and text, about the alias the sender used.

    The text is passed back to the sender, so the private target is replaced
    by its alias wherever the downstream echoed it, and the ``<alias>:``
    prefix is added only when the text does not already start with it.
    """
    status, _, text = error.message.partition(" ")
    if not (status[:1] in ("2", "4", "5") and status.count(".") == 2):
        status, text = ("5.0.0" if error.code >= 500 else "4.0.0"), error.message
    text = conceal_destinations(text, message.aliases)
    prefix = f"<{message.alias_of(destination)}>:"
    if not text.lower().startswith(prefix.lower()):
        text = f"{prefix} {text}"
    return Reply(error.code, status, text)


def unreachable(hop: NextHop, why: str) -> Reply:
    return Reply(451, "4.4.1", f"connect to {hop.host}[{hop.address}]:{hop.port}: {why}")


async def send_to_domain(hops: Sequence[NextHop], message: Message, recipients: Sequence[str],
                         settings: ClientSettings) -> dict[str, Reply]:
    """Offer ``message`` to ``recipients`` (one domain) through the first hop that answers.

    Always a reply per recipient, never an exception: a raised exception
    would leave the domain's outcome unknown, and unknown used to be
    reported (and retried for days) as a timeout.
    """
    try:
        return await _send_to_domain(hops, message, recipients, settings)
    except Exception as error:  # noqa: BLE001  (internal_failure logs it)
        return {rcpt: internal_failure(message.queue_id, error) for rcpt in recipients}


def writable(address: str) -> bool:
    """Whether ``address`` can go into our MAIL FROM or RCPT TO exactly as it is.

    It must be a plain mailbox (:func:`..addresses.is_sendable`), and
    aiosmtplib must write it unchanged: its parser drops comments and
    refuses whitespace that our address syntax lets through (U+00A0, ...).
    """
    if not is_sendable(address):
        return False
    try:
        return aiosmtplib.email.quote_address(address) == f"<{address}>"
    except ValueError:
        return False


async def _send_to_domain(hops: Sequence[NextHop], message: Message, recipients: Sequence[str],
                          settings: ClientSettings) -> dict[str, Reply]:
    """Addresses that cannot be written fail here, before a connection: no hop could take them."""
    if not writable(message.sender):
        return {rcpt: UNWRITABLE_SENDER for rcpt in recipients}
    results = {rcpt: UNWRITABLE_RECIPIENT.about(message.alias_of(rcpt))
               for rcpt in recipients if not writable(rcpt)}
    offered = [rcpt for rcpt in recipients if rcpt not in results]
    if offered:
        results.update(await _through_first_hop(hops, message, offered, settings))
    return results


async def _through_first_hop(hops: Sequence[NextHop], message: Message,
                             recipients: Sequence[str], settings: ClientSettings) -> dict[str, Reply]:
    """The first hop's answers; the last hop's failure if none could be reached."""
    last = Reply(451, "4.4.3", "no next hop for this destination")
    for hop in hops:
        try:
            return await _transaction(hop, message, recipients, settings)
        except _TryNextHop as e:
            log.info("%s: %s", message.queue_id, e.reply)
            last = e.reply
    return {rcpt: last for rcpt in recipients}


async def _transaction(hop: NextHop, message: Message, recipients: Sequence[str],
                       settings: ClientSettings) -> dict[str, Reply]:
    client = aiosmtplib.SMTP(hostname=hop.address, port=hop.port, local_hostname=settings.helo,
                             timeout=settings.command_timeout, start_tls=False, use_tls=False)
    try:
        await client.connect(timeout=settings.connect_timeout)
        await _hello(client, hop)
        refusal = _refuse_before_mail(client, message)
        if refusal is not None:
            return {rcpt: refusal for rcpt in recipients}
        results = _refuse_utf8_recipients(client, message, recipients)
        offered = [rcpt for rcpt in recipients if rcpt not in results]
        if offered:
            results.update(await _envelope_and_data(client, hop, message, offered))
        return results
    except aiosmtplib.SMTPResponseException as e:
        if e.code >= 500:  # refused the sender or the session: permanent for everyone
            return {rcpt: downstream_reply(e, rcpt, message) for rcpt in recipients}
        said = conceal_destinations(e.message, message.aliases)
        raise _TryNextHop(Reply(e.code, "4.4.2", f"{hop.host}[{hop.address}] said: {said}")) from e
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        raise _TryNextHop(unreachable(hop, type(e).__name__)) from e
    finally:
        client.close()


async def _hello(client: aiosmtplib.SMTP, hop: NextHop) -> None:
    """EHLO, then opportunistic STARTTLS (any certificate: the point is privacy, not identity)."""
    await client.ehlo()
    if client.supports_extension("starttls"):
        await client.starttls(validate_certs=False, server_hostname=hop.host)
        await client.ehlo()


def needs_smtputf8(message: Message) -> bool:
    """The whole transaction needs SMTPUTF8: the client declared it, or the sender is UTF-8."""
    return message.smtputf8 or not message.sender.isascii()


def has_8bit_content(message: Message) -> bool:
    """Any byte above 0x7F, in the body or (undeclared UTF-8) the header."""
    return not message.content.isascii()


def _refuse_before_mail(client: aiosmtplib.SMTP, message: Message) -> Reply | None:
    if needs_smtputf8(message) and not client.supports_extension("smtputf8"):
        return SMTPUTF8_UNSUPPORTED
    if has_8bit_content(message) and not client.supports_extension("8bitmime"):
        return EIGHT_BIT_UNSUPPORTED
    limit = client.esmtp_extensions.get("size", "")  # the next hop's text: "²" is a digit too
    if limit.isascii() and limit.isdigit() and int(limit) and len(message.content) > int(limit):
        return Reply(552, "5.3.4", f"message is larger than the destination accepts ({limit} bytes)")
    return None


def _refuse_utf8_recipients(client: aiosmtplib.SMTP, message: Message,
                            recipients: Sequence[str]) -> dict[str, Reply]:
    """UTF-8 destinations a hop without SMTPUTF8 cannot be given: never raw, undeclared UTF-8.

    Only those fail; ASCII destinations of the same domain still get the message.
    """
    if client.supports_extension("smtputf8"):
        return {}
    return {rcpt: SMTPUTF8_UNSUPPORTED.about(message.alias_of(rcpt))
            for rcpt in recipients if not rcpt.isascii()}


async def _envelope_and_data(client: aiosmtplib.SMTP, hop: NextHop, message: Message,
                             recipients: Sequence[str]) -> dict[str, Reply]:
    utf8 = needs_smtputf8(message) or not all(rcpt.isascii() for rcpt in recipients)
    encoding = "utf-8" if utf8 else "ascii"
    await client.mail(message.sender, options=mail_options(client, message, utf8),
                      encoding=encoding)
    results: dict[str, Reply] = {}
    for rcpt in recipients:
        try:
            await client.rcpt(rcpt, options=rcpt_options(client, message, rcpt),
                              encoding=encoding)
            results[rcpt] = ACCEPTED
        except aiosmtplib.SMTPRecipientRefused as e:
            results[rcpt] = downstream_reply(e, rcpt, message)
    accepted = [rcpt for rcpt, reply in results.items() if reply is ACCEPTED]
    if not accepted:
        return results
    try:
        await client.data(bytes(message.content))
    except aiosmtplib.SMTPResponseException as e:
        results.update({rcpt: downstream_reply(e, rcpt, message) for rcpt in accepted})
        return results
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        # The outcome is unknown: deferring may deliver twice, but never loses mail.
        results.update({rcpt: unreachable(hop, f"lost during DATA ({type(e).__name__})")
                        for rcpt in accepted})
        return results
    if not client.supports_extension("dsn"):
        results.update({rcpt: RELAYED_WITHOUT_DSN for rcpt in accepted
                        if message.dsn_of(rcpt).notifies("SUCCESS")})
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    return results


def mail_options(client: aiosmtplib.SMTP, message: Message, utf8: bool) -> list[str]:
    """MAIL FROM's parameters: what the message needs and the next hop offers."""
    options = ["SMTPUTF8"] if utf8 else []
    if client.supports_extension("8bitmime"):
        if message.body == "8BITMIME" or has_8bit_content(message):
            options.append("BODY=8BITMIME")
        elif message.body == "7BIT":
            options.append("BODY=7BIT")
    if client.supports_extension("size"):
        options.append(f"SIZE={len(message.content)}")
    if client.supports_extension("dsn"):
        if message.dsn_ret in ("FULL", "HDRS"):
            options.append(f"RET={message.dsn_ret}")
        envid = message.dsn_envid
        if 0 < len(envid) <= MAX_ENVID and is_xtext(envid):
            options.append(f"ENVID={envid}")
    return options


def rcpt_options(client: aiosmtplib.SMTP, message: Message, destination: str) -> list[str]:
    """RCPT TO's DSN parameters: those of the RCPT that gave ``destination``, if the hop takes them.

    Values are checked again (they may come from a spool file) so that
    nothing but xtext is ever written into the command.
    """
    if not client.supports_extension("dsn"):
        return []
    dsn = message.dsn_of(destination)
    options: list[str] = []
    if dsn.notify and _valid_notify(dsn.notify):
        options.append(f"NOTIFY={dsn.notify}")
    if orcpt_parts(dsn.orcpt) is not None:
        options.append(f"ORCPT={dsn.orcpt}")
    return options


def _valid_notify(notify: str) -> bool:
    words = notify.split(",")
    return notify == "NEVER" or (len(set(words)) == len(words)
                                 and set(words) <= {"SUCCESS", "FAILURE", "DELAY"})
