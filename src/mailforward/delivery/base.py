"""The delivery interface: one accepted transaction in, one SMTP reply out.

The reply is what the inbound client is told (pass-through acknowledgement):
250 only when every destination has the message or it is safely on disk.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..smtpd.replies import OK, Reply, queued


def new_queue_id() -> str:
    """Ten upper-case hex digits, like Postfix's short queue ids: safe as a file name."""
    return secrets.token_hex(5).upper()


@dataclass(frozen=True)
class Message:
    """An envelope and its raw content, ready to leave."""

    queue_id: str
    sender: str  # "" is the null sender
    recipients: tuple[str, ...]  # final destinations after alias expansion
    content: bytes
    client_ip: str = ""
    smtputf8: bool = False
    original_sender: str = ""  # before SRS: where a DSN goes ("" when sender is unchanged)
    aliases: Mapping[str, str] = field(default_factory=dict)
    """destination -> the address the client gave at RCPT: what the sender may be told."""

    def alias_of(self, destination: str) -> str:
        """The address the sender used for ``destination``; the destination itself when unknown."""
        return self.aliases.get(destination, destination)

    @property
    def bounce_to(self) -> str:
        """Where to send a delivery status notification: the sender as the client gave it."""
        return self.original_sender or self.sender


class Delivery(Protocol):
    async def deliver(self, message: Message) -> Reply: ...


@dataclass
class RecordingDelivery:
    """Keeps messages in memory and answers with ``reply``: for tests, nothing else."""

    reply: Reply = OK
    messages: list[Message] = field(default_factory=list)

    async def deliver(self, message: Message) -> Reply:
        self.messages.append(message)
        return queued(message.queue_id) if self.reply == OK else self.reply
