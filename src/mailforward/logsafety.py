"""Keep message content out of the log, whatever third-party libraries log.

Our own log lines name exception types, never message text.  Libraries do
not keep that rule: dkimpy (logger ``dkimpy``) logs signature tags -- an ARC
``b=`` value, header lines in its parse errors -- and authheaders, pyspf,
aiosmtplib and asyncio may quote what they were given.  A log is kept
longer and read by more people than the mail itself, so nothing of a
message may reach it.

:class:`ContentGuard` lets records of the ``mailforward`` namespace through
untouched and replaces the message of every other record with a fixed text
plus the exception *type*, if any: level and logger name stay, so operators
still see that, and where, something happened.  Arguments, exception text,
tracebacks and stack information are dropped, since any of them may quote
the message.
"""

from __future__ import annotations

import logging

__all__ = ["OWN_NAMESPACE", "WITHHELD", "ContentGuard", "install_content_guard"]

OWN_NAMESPACE = "mailforward"
"""Loggers at or below this name are ours and keep their text."""

WITHHELD = "log text withheld: third-party messages may quote mail content"


def is_own_logger(name: str) -> bool:
    return name == OWN_NAMESPACE or name.startswith(OWN_NAMESPACE + ".")


class ContentGuard(logging.Filter):
    """Rewrites records from loggers outside ``mailforward`` to the fixed text.

    The record is changed in place, so every handler after this one sees
    the withheld version too.  It is never dropped: that something was
    logged, and at what level, is still worth knowing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if is_own_logger(record.name):
            return True
        error_type = record.exc_info[0] if record.exc_info else None
        record.msg = WITHHELD if error_type is None else f"{WITHHELD} ({error_type.__name__})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def install_content_guard(target: logging.Handler | logging.Logger) -> ContentGuard:
    """Guard a handler, or every handler a logger has now (typically the root logger).

    Handler filters are what applies to records propagated from other
    loggers (a logger's own filters see only records logged on it), so on a
    logger the guard goes onto each of its handlers -- handlers added later
    must be guarded themselves -- and onto the logger too, for records
    logged on it directly.  Installing twice adds nothing.
    """
    guard = ContentGuard()
    handlers = [target] if isinstance(target, logging.Handler) else [target, *target.handlers]
    for filterer in handlers:
        if not any(isinstance(f, ContentGuard) for f in filterer.filters):
            filterer.addFilter(guard)
    return guard
