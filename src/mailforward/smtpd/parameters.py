"""ESMTP parameters of MAIL FROM and RCPT TO: syntax, and what they ask of us.

The extensions we advertise, and only those: SIZE (RFC 1870), BODY (8BITMIME,
RFC 6152), SMTPUTF8 (RFC 6531) and DSN (RFC 3461: RET and ENVID on MAIL,
NOTIFY and ORCPT on RCPT).  Anything else, or a parameter given twice, is
``555 5.5.4``.  The values are kept as given so that they can be passed on to
a next hop that offers the same extension.
"""

from __future__ import annotations

import re

from ..reply import Reply
from . import replies
from .session import RecipientDsn, Transaction

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2: the address as the client gave it, xtext-encoded

# xtext (RFC 3461 4): printable ASCII except "+" and "=", or "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def is_xtext(text: str) -> bool:
    return _XTEXT.fullmatch(text) is not None


def apply_mail_parameters(txn: Transaction, params: list[str], size_limit: int) -> Reply | None:
    """Record MAIL FROM's parameters in ``txn``; a refusal when one is bad or unknown."""
    seen: set[str] = set()
    for param in params:
        name, equals, value = param.partition("=")
        name = name.upper()
        if name in seen:
            return replies.BAD_PARAMETER
        seen.add(name)
        if name == "SIZE" and value.isdigit():
            if int(value) > size_limit:
                return replies.MESSAGE_TOO_BIG_DECLARED
        elif name == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
            txn.body = value.upper()
        elif name == "SMTPUTF8" and not equals:
            txn.smtp_utf8 = True
        elif name == "RET" and value.upper() in ("FULL", "HDRS"):
            txn.dsn_ret = value.upper()
        elif name == "ENVID" and 0 < len(value) <= MAX_ENVID and is_xtext(value):
            txn.dsn_envid = value
        else:
            return replies.BAD_PARAMETER
    return None


def recipient_dsn(params: list[str]) -> RecipientDsn | Reply:
    """RCPT TO's DSN parameters, or the refusal for a bad or unknown one."""
    notify = orcpt = ""
    seen: set[str] = set()
    for param in params:
        name, _, value = param.partition("=")
        name = name.upper()
        if name in seen:
            return replies.BAD_PARAMETER
        seen.add(name)
        if name == "NOTIFY" and _valid_notify(value.upper()):
            notify = value.upper()
        elif name == "ORCPT" and _valid_orcpt(value):
            orcpt = value
        else:
            return replies.BAD_PARAMETER
    return RecipientDsn(notify, orcpt)


def _valid_notify(value: str) -> bool:
    if value == "NEVER":
        return True
    words = value.split(",")
    return bool(words) and len(set(words)) == len(words) and set(words) <= _NOTIFY_WORDS


def _valid_orcpt(value: str) -> bool:
    kind, semicolon, address = value.partition(";")
    return (bool(semicolon) and kind.isascii() and kind.replace("-", "").isalnum()
            and 0 < len(address) <= MAX_ORCPT and is_xtext(address))
