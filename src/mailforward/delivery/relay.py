"""Pass-through delivery to one next hop (Postfix's ``relayhost``), via aiosmtplib.

The inbound DATA is answered only after the next hop answered us, so a 250
means the next hop has the message.  Recipients are offered first; DATA is
sent only when every one was accepted, so a message is never delivered to
some destinations while the sender is told to retry (that needs the spool).
"""

from __future__ import annotations

import logging

import aiosmtplib

from ..smtpd import replies
from ..smtpd.replies import Reply
from .base import Message

log = logging.getLogger(__name__)

DEFERRED = Reply(451, "4.4.1", "Error: next hop temporarily unavailable, try again later")


def downstream_reply(error: aiosmtplib.SMTPResponseException, destination: str) -> Reply:
    """The downstream's code, enhanced code and text, prefixed with the destination."""
    status, _, text = error.message.partition(" ")
    if not (status[:1].isdigit() and status.count(".") == 2):
        status, text = ("5.0.0" if error.code >= 500 else "4.0.0"), error.message
    return Reply(error.code, status, f"<{destination}>: {text}")


class RelayDelivery:
    def __init__(self, host: str, port: int, helo: str, connect_timeout: float,
                 command_timeout: float) -> None:
        self.host, self.port, self.helo = host, port, helo
        self.connect_timeout, self.command_timeout = connect_timeout, command_timeout

    async def deliver(self, message: Message) -> Reply:
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, local_hostname=self.helo,
                                 timeout=self.command_timeout, start_tls=False, use_tls=False)
        try:
            await client.connect(timeout=self.connect_timeout)
            return await self._transaction(client, message)
        except aiosmtplib.SMTPResponseException as e:
            return downstream_reply(e, message.recipients[0]) if e.code >= 500 else DEFERRED
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            log.warning("%s: relay %s:%d: %s", message.queue_id, self.host, self.port, e)
            return DEFERRED
        finally:
            client.close()

    async def _transaction(self, client: aiosmtplib.SMTP, message: Message) -> Reply:
        await client.ehlo()
        if client.supports_extension("starttls"):
            await client.starttls(validate_certs=False)
            await client.ehlo()
        options = ["SMTPUTF8"] if message.smtputf8 else []
        await client.mail(message.sender, options=options)
        refused: list[Reply] = []
        for rcpt in message.recipients:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as e:
                refused.append(downstream_reply(e, rcpt))
        if refused:
            await client.rset()
            if all(r.is_permanent for r in refused) and len(refused) == len(message.recipients):
                return refused[0]
            return DEFERRED
        await client.data(message.content)
        await client.quit()
        return replies.queued(message.queue_id)

    async def close(self) -> None:
        pass


class UnroutedDelivery:
    """No route yet (MX delivery comes with the delivery issue): tempfail, never a false 250."""

    async def deliver(self, message: Message) -> Reply:
        return replies.DELIVERY_UNCONFIGURED

    async def close(self) -> None:
        pass
