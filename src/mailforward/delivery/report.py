"""What delivery tells the operator: Postfix's log lines, and the recipient counters.

One line per recipient per delivery attempt, in the shape of Postfix's
smtp(8) (``ops.logs.log_recipient``), as soon as that recipient's
transaction has ended::

    4F2A9C01B3: to=<bob@dest.test>, orig_to=<alias@example.org>,
        relay=mx.dest.test[192.0.2.9]:25, delay=0.41, dsn=2.0.0,
        status=sent (250 2.0.0 Ok: queued as 12345)

``status`` is ``sent`` (2xx), ``deferred`` (4xx, the downstream's reply or
our own reason: connect failure, timeout) or ``bounced`` (5xx).  ``relay``
is the next hop that answered, ``none`` when none was reached; ``delay`` the
seconds since the message arrived.  ``to`` is the forwarding target: the
operator's own data, which this log may hold (Postfix logs it too); what
goes back to senders never names it.  Each line counts its recipient in
``mailforward_recipients{outcome=delivered|deferred|bounced}``.

For spooled messages, the queue manager's lines (``from=<...>, size=N,
nrcpt=N (queue active)`` when spooled, ``removed`` when done, ``status=expired``)
and the bounce daemon's ``sender non-delivery notification: DSNID``, which
links a DSN to the message it reports on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..ops.logs import log_recipient
from ..ops.metrics import count_recipients
from ..reply import Reply, printable

smtp_log = logging.getLogger("mailforward.delivery.smtp")
qmgr_log = logging.getLogger("mailforward.delivery.qmgr")
bounce_log = logging.getLogger("mailforward.delivery.bounce")

# log status -> mailforward_recipients outcome
OUTCOMES = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}


class Addressed(Protocol):
    """What a line needs from the message (``Message`` or ``SpooledMessage``)."""

    @property
    def queue_id(self) -> str: ...

    def alias_of(self, destination: str) -> str: ...


def status_of(reply: Reply) -> str:
    """``sent``, ``deferred`` or ``bounced``: Postfix's word for the reply's class."""
    if reply.is_success:
        return "sent"
    return "deferred" if reply.is_temporary else "bounced"


def _enhanced_status(answer: str) -> str:
    """The enhanced status code in a reply line such as ``250 2.6.0 Ok``, else ""."""
    parts = answer.split(" ", 2)
    if len(parts) >= 2 and len(parts[1]) >= 5 and parts[1][:1] in "245" and \
            parts[1].count(".") == 2 and parts[1].replace(".", "").isdigit():
        return parts[1]
    return ""


@dataclass
class Report:
    """Logs the outcomes of one message's attempt, measured from its arrival.

    ``arrived`` is when the message arrived (pass-through: when the sender's
    DATA ended; spooled: its ``created``), on ``clock``.
    """

    message: Addressed
    arrived: float
    clock: Callable[[], float] = time.time

    def outcomes(self, replies: Mapping[str, Reply], relay: str = "",
                 answer: str = "") -> None:
        """A line for each recipient's reply; ``answer`` is the next hop's own reply to the
        final dot, logged for the accepted recipients instead of our summary of it."""
        if not replies:
            return
        delay = self.clock() - self.arrived
        counts: Counter[str] = Counter()
        for rcpt, reply in replies.items():
            status = status_of(reply)
            text = answer if answer and reply.is_success else str(reply)
            dsn = (_enhanced_status(text) if reply.is_success else "") or reply.status
            log_recipient(smtp_log, self.message.queue_id, rcpt, relay=relay or "none",
                          delay=delay, dsn=dsn or f"{status_class(reply)}.0.0", status=status,
                          reply_text=text, orig_to=self.message.alias_of(rcpt))
            counts[status] += 1
        for status, count in counts.items():
            count_recipients(OUTCOMES[status], count)


def status_class(reply: Reply) -> str:
    """The first digit of an enhanced status code for ``reply``: 2, 4 or 5."""
    return "2" if reply.is_success else "4" if reply.is_temporary else "5"


# ---------------------------------------------------------------- the queue manager's lines


def log_queued(queue_id: str, sender: str, size: int, nrcpt: int) -> None:
    """The message is in the spool, waiting for its next attempt (Postfix's qmgr line)."""
    qmgr_log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id,
                  printable(sender), size, nrcpt)


def log_removed(queue_id: str) -> None:
    qmgr_log.info("%s: removed", queue_id)


def log_expired(queue_id: str, sender: str, recipients: int, *, returned: bool) -> None:
    """Postfix's ``status=expired, returned to sender`` (not returned when no DSN may be
    sent); the ``recipients`` still pending count as bounced."""
    qmgr_log.info("%s: from=<%s>, status=expired%s", queue_id, printable(sender),
                  ", returned to sender" if returned else "")
    count_recipients("bounced", recipients)


def log_notification(original_queue_id: str, dsn_queue_id: str, *, relayed: bool = False) -> None:
    """The DSN spooled as ``dsn_queue_id`` reports on ``original_queue_id`` (Postfix's bounce)."""
    kind = "delivery status" if relayed else "non-delivery"
    bounce_log.info("%s: sender %s notification: %s", original_queue_id, kind, dsn_queue_id)
