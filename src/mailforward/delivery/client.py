"""Outbound SMTP: one transaction per destination domain, via aiosmtplib.

Results are per recipient (a ``Reply`` each: 250 accepted, 4xx deferred,
5xx failed), like aiosmtplib's own per-recipient errors.  A next hop that
cannot be reached, or that answers 4xx before any recipient was offered, is
skipped for the next one, as Postfix's smtp(8) does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from ..smtpd.replies import Reply
from .base import Message
from .routing import NextHop

log = logging.getLogger(__name__)

ACCEPTED = Reply(250, "2.0.0", "Ok")


@dataclass(frozen=True)
class ClientSettings:
    helo: str
    connect_timeout: float = 30.0
    command_timeout: float = 300.0


class _TryNextHop(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def downstream_reply(error: aiosmtplib.SMTPResponseException, destination: str) -> Reply:
    """The downstream's code, enhanced code and text, prefixed with the destination."""
    status, _, text = error.message.partition(" ")
    if not (status[:1] in ("2", "4", "5") and status.count(".") == 2):
        status, text = ("5.0.0" if error.code >= 500 else "4.0.0"), error.message
    return Reply(error.code, status, f"<{destination}>: {text}")


def unreachable(hop: NextHop, why: str) -> Reply:
    return Reply(451, "4.4.1", f"connect to {hop.host}[{hop.address}]:{hop.port}: {why}")


async def send_to_domain(hops: Sequence[NextHop], message: Message, recipients: Sequence[str],
                         settings: ClientSettings) -> dict[str, Reply]:
    """Offer ``message`` to ``recipients`` (one domain) through the first hop that answers."""
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
        return await _envelope_and_data(client, hop, message, recipients)
    except aiosmtplib.SMTPResponseException as e:
        if e.code >= 500:  # refused the sender or the session: permanent for everyone
            return {rcpt: downstream_reply(e, rcpt) for rcpt in recipients}
        raise _TryNextHop(Reply(e.code, "4.4.2", f"{hop.host}[{hop.address}] said: {e.message}")) from e
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


def _refuse_before_mail(client: aiosmtplib.SMTP, message: Message) -> Reply | None:
    if message.smtputf8 and not client.supports_extension("smtputf8"):
        return Reply(553, "5.6.7", "destination does not support SMTPUTF8, which this message needs")
    limit = client.esmtp_extensions.get("size", "")
    if limit.isdigit() and int(limit) and len(message.content) > int(limit):
        return Reply(552, "5.3.4", f"message is larger than the destination accepts ({limit} bytes)")
    return None


async def _envelope_and_data(client: aiosmtplib.SMTP, hop: NextHop, message: Message,
                             recipients: Sequence[str]) -> dict[str, Reply]:
    options = ["SMTPUTF8"] if message.smtputf8 else []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(message.content)}")
    await client.mail(message.sender, options=options)
    results: dict[str, Reply] = {}
    for rcpt in recipients:
        try:
            await client.rcpt(rcpt)
            results[rcpt] = ACCEPTED
        except aiosmtplib.SMTPRecipientRefused as e:
            results[rcpt] = downstream_reply(e, rcpt)
    accepted = [rcpt for rcpt, reply in results.items() if reply is ACCEPTED]
    if not accepted:
        return results
    try:
        await client.data(message.content)
    except aiosmtplib.SMTPResponseException as e:
        results.update({rcpt: downstream_reply(e, rcpt) for rcpt in accepted})
        return results
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        # The outcome is unknown: deferring may deliver twice, but never loses mail.
        results.update({rcpt: unreachable(hop, f"lost during DATA ({type(e).__name__})")
                        for rcpt in accepted})
        return results
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    return results
