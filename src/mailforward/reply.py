"""The SMTP reply value type, shared by the inbound and the outbound side.

A base module: ``smtpd/`` builds replies to send, ``delivery/`` builds them
from what the next hop answered, and neither imports the other for it.  The
acknowledgement both need (:data:`OK`, :func:`queued`) is here too; the
table of the replies we send is ``smtpd/replies.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    code: int
    status: str  # enhanced status code, "" only for 220/354 style replies
    text: str
    reason: str = field(default="", compare=False)
    """A stable name for a refusal (``relay_denied``), for logs and metrics; not sent."""

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.status, self.text) if part)

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def about(self, subject: str) -> Reply:
        """The same reply about ``<subject>``, as Postfix prefixes restriction rejects.

        ``subject`` usually comes from the client: anything but printable ASCII
        (8-bit, undecodable bytes, controls) is echoed as ``?``, as Postfix
        does, so a reply can always be sent.
        """
        return Reply(self.code, self.status, f"<{printable(subject)}>: {self.text}", self.reason)


OK = Reply(250, "2.0.0", "Ok")


def queued(queue_id: str) -> Reply:
    """The 250 that acknowledges a message: delivered, or safely in the spool."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def printable(text: str) -> str:
    """``text`` with every character outside printable ASCII replaced by ``?``."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)
