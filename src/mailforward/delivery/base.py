"""The delivery interface: one accepted transaction in, one SMTP reply out.

The reply is what the inbound client is told (pass-through acknowledgement):
250 only when every destination has the message or it is safely on disk.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..reply import OK, Reply, queued

log = logging.getLogger(__name__)


def domain_of(address: str) -> str:
    """The domain of a mailbox, lower-case: what mail is routed and queued by."""
    return address.rpartition("@")[2].lower()


def new_queue_id() -> str:
    """Ten upper-case hex digits, like Postfix's short queue ids: safe as a file name."""
    return secrets.token_hex(5).upper()


@dataclass(frozen=True)
class RecipientDsn:
    """RFC 3461 parameters given with one RCPT, kept for every destination it expands to."""

    notify: str = ""  # "" (not given), "NEVER", or a comma list of SUCCESS, FAILURE, DELAY
    orcpt: str = ""  # "rfc822;xtext" as the client gave it

    def notifies(self, event: str) -> bool:
        """Whether the sender wants a DSN for ``event``: "SUCCESS", "FAILURE" or "DELAY".

        RFC 3461 4.1: without NOTIFY, failures (and delays, at the MTA's
        discretion) are reported but never success; ``NEVER`` asks for none.
        """
        if not self.notify:
            return event in ("FAILURE", "DELAY")
        return event in self.notify.split(",")


NO_DSN_PARAMETERS = RecipientDsn()
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2: the address as the client gave it, xtext-encoded

# RFC 3461 4: printable ASCII except "+" and "=", or "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_XTEXT_HEX = re.compile(rb"\+([0-9A-Fa-f]{2})")


def is_xtext(text: str) -> bool:
    return _XTEXT.fullmatch(text) is not None


def orcpt_parts(orcpt: str) -> tuple[str, str] | None:
    """(address type, xtext address) of a well-formed ORCPT value, else None (RFC 3461 4.2)."""
    kind, semicolon, address = orcpt.partition(";")
    if (semicolon and kind.isascii() and kind.replace("-", "").isalnum()
            and 0 < len(address) <= MAX_ORCPT and is_xtext(address)):
        return kind, address
    return None


def decode_xtext(text: str) -> str:
    """The text an xtext stands for; bytes that are not UTF-8 become U+FFFD."""
    raw = _XTEXT_HEX.sub(lambda m: bytes([int(m.group(1), 16)]),
                         text.encode("ascii", "replace"))
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class Message:
    """An envelope and its raw content, ready to leave."""

    queue_id: str
    sender: str  # "" is the null sender
    recipients: tuple[str, ...]  # final destinations after alias expansion
    content: bytes | bytearray  # the engine's own buffer when nothing had to rewrite it
    client_ip: str = ""
    smtputf8: bool = False
    original_sender: str = ""  # before SRS: where a DSN goes ("" when sender is unchanged)
    aliases: Mapping[str, str] = field(default_factory=dict)
    """destination -> the address the client gave at RCPT: what the sender may be told."""
    body: str = ""  # "", "7BIT" or "8BITMIME", as declared at MAIL (RFC 6152)
    dsn_ret: str = ""  # RFC 3461 RET: "", "FULL" or "HDRS"
    dsn_envid: str = ""  # RFC 3461 ENVID, xtext as given
    dsn: Mapping[str, RecipientDsn] = field(default_factory=dict)  # destination -> its RCPT's
    original_queue_id: str = ""  # a DSN of ours: the queue id of the message it reports on

    def alias_of(self, destination: str) -> str:
        """The address the sender used for ``destination``; the destination itself when unknown."""
        return self.aliases.get(destination, destination)

    def dsn_of(self, destination: str) -> RecipientDsn:
        """The RFC 3461 parameters of the RCPT that gave ``destination`` (none when not given)."""
        return self.dsn.get(destination, NO_DSN_PARAMETERS)

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


OUR_OWN_FAILURE = "the destination could not be reached"
_REPLY_HEAD = re.compile(r"(\d{3}[ -](?:[245]\.\d{1,3}\.\d{1,3} )?)(.*)", re.DOTALL)


def for_the_sender(reply_text: str, alias: str) -> str:
    """A reply as the sender may see it: the downstream's own words (which we prefix with
    ``<alias>:`` and scrub of targets) pass; our own words about reaching the target's
    next hop (``connect to mx.target.example[ip]: ...``, DNS failures for its domain)
    would name where the alias goes, so they become a neutral text about the alias."""
    match = _REPLY_HEAD.match(reply_text)
    head, text = (match.group(1), match.group(2)) if match else ("", reply_text)
    names_the_target = text.startswith("connect to ") or (
        text.startswith("<") and not text.lower().startswith(f"<{alias.lower()}>:"))
    return f"{head}<{alias}>: {OUR_OWN_FAILURE}" if names_the_target else reply_text


def conceal_destinations(text: str, aliases: Mapping[str, str]) -> str:
    """``text`` with every destination in ``aliases`` replaced by the address the sender used.

    Forwarding targets are private: a downstream reply or a DSN must not tell
    the sender where an alias really goes.  Matching ignores case (servers
    echo addresses as they like) and angle brackets stay where they were.
    One pass, so an alias that happens to contain another target is not
    rewritten again.
    """
    hidden = {target.lower(): alias for target, alias in aliases.items()
              if target and target.lower() != alias.lower()}
    if not hidden:
        return text
    pattern = "|".join(re.escape(target) for target in sorted(hidden, key=len, reverse=True))
    return re.sub(pattern, lambda m: hidden[m.group(0).lower()], text, flags=re.IGNORECASE)


# (queue id, exception type) pairs whose traceback is already in the log, oldest first.
_TRACEBACKS_LOGGED: OrderedDict[tuple[str, str], None] = OrderedDict()
_MAX_TRACEBACKS_REMEMBERED = 4096


def internal_failure(queue_id: str, error: BaseException) -> Reply:
    """The temporary failure an unexpected exception becomes, naming only its type.

    It is a bug of ours, not the destination's answer: the message is kept
    and retried (4xx), the sender is told nothing internal, and the
    traceback is logged once per message and exception type, not on every
    retry pass for the days the message may stay in the spool.
    """
    kind = type(error).__name__
    key = (queue_id, kind)
    if key in _TRACEBACKS_LOGGED:
        log.error("%s: delivery failed again: %s", queue_id, kind)
    else:
        _TRACEBACKS_LOGGED[key] = None
        if len(_TRACEBACKS_LOGGED) > _MAX_TRACEBACKS_REMEMBERED:
            _TRACEBACKS_LOGGED.popitem(last=False)
        log.error("%s: delivery failed: %s", queue_id, kind, exc_info=error)
    return Reply(451, "4.3.0", f"internal error ({kind})")
