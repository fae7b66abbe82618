"""Log lines an admin's tools can read: Postfix's shapes, levels, stderr/file/syslog, JSON.

Every line is ``<program>[<pid>]: [warning: ]<text>`` where the program is
named Postfix-style after the part that speaks (``mailforward/smtpd``,
``mailforward/smtp``, ``mailforward/qmgr``...), so pflogsumm
(``--syslog-name=mailforward``), fail2ban's postfix filters and
postfix_exporter find the fields they know:

    NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 554 5.7.1 <x@y.test>: Relay access denied;
        from=<a@b.test> to=<x@y.test> proto=ESMTP helo=<h.test> reason=relay_denied
    4F2A9C01B3: to=<alice@example.org>, relay=mx.dest.test[192.0.2.9]:25, delay=0.41,
        dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 12345)

A stable ``reason=`` name is appended to refusals so they can be counted.
Addresses, hosts and replies only: message content never reaches a log line
(third-party loggers are muted by ``logsafety``).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import socket
import sys
import time

from ..config import LogSettings
from ..logsafety import install_content_guard
from ..reply import printable

PROGRAMS = (
    ("mailforward.smtpd", "smtpd"),
    ("mailforward.delivery.retry", "qmgr"),
    ("mailforward.delivery.spool", "qmgr"),
    ("mailforward.delivery.qmgr", "qmgr"),
    ("mailforward.delivery.bounce", "bounce"),
    ("mailforward.delivery", "smtp"),
    ("mailforward.auth", "auth"),
    ("mailforward.srs_tcp", "srs"),
    ("mailforward.tables", "tables"),
)

log = logging.getLogger("mailforward.smtpd")


def program_of(logger_name: str) -> str:
    """``mailforward/<part>`` for our loggers, by the longest matching prefix."""
    for prefix, part in PROGRAMS:
        if logger_name == prefix or logger_name.startswith(prefix + "."):
            return f"mailforward/{part}"
    return "mailforward"


def _level_prefix(record: logging.LogRecord) -> str:
    """Postfix writes ``warning:``, ``error:``, ``fatal:`` before the text; info has none."""
    if record.levelno >= logging.CRITICAL:
        return "fatal: "
    if record.levelno >= logging.WARNING:
        return f"{record.levelname.lower()}: "
    return "" if record.levelno >= logging.INFO else "debug: "


class PostfixFormatter(logging.Formatter):
    """``Mon dd hh:mm:ss host program[pid]: text`` (the syslog prefix omitted for syslog)."""

    def __init__(self, with_header: bool = True) -> None:
        super().__init__()
        self.with_header = with_header
        self.host = socket.gethostname().split(".")[0]

    def format(self, record: logging.LogRecord) -> str:
        text = f"{program_of(record.name)}[{record.process}]: {_level_prefix(record)}" \
               f"{record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        if not self.with_header:
            return text
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(record.created))
        return f"{stamp} {self.host} {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "program": program_of(record.name),
                 "pid": record.process, "message": record.getMessage()}
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def make_handler(settings: LogSettings) -> logging.Handler:
    handler: logging.Handler
    if settings.destination == "syslog":
        facility = logging.handlers.SysLogHandler.facility_names[settings.syslog_facility]
        handler = logging.handlers.SysLogHandler(address=settings.syslog_socket, facility=facility)
    elif settings.destination == "file":
        handler = logging.handlers.WatchedFileHandler(settings.file)  # logrotate-friendly
    else:
        handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PostfixFormatter(with_header=settings.destination != "syslog"))
    return handler


def configure_logging(settings: LogSettings) -> None:
    """Replace the root logger's handlers with the configured one; call again on reload."""
    root = logging.getLogger()
    handler = make_handler(settings)
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    install_content_guard(root)


# ---------------------------------------------------------------- the lines Postfix tools parse


def client_name(ip: str) -> str:
    """Postfix's ``name[address]``; we do no reverse lookups, so the name is ``unknown``."""
    return f"unknown[{ip}]"


def log_reject(stage: str, client_ip: str, reply_text: str, reason: str, *, sender: str,
               recipient: str = "", helo: str = "", extended: bool = True) -> None:
    """``NOQUEUE: reject: RCPT from unknown[ip]: <reply>; from=<> to=<> proto= helo=<>``."""
    fields = f"from=<{printable(sender)}>"
    if recipient:
        fields += f" to=<{printable(recipient)}>"
    fields += f" proto={'ESMTP' if extended else 'SMTP'} helo=<{printable(helo)}>"
    log.info("NOQUEUE: reject: %s from %s: %s; %s reason=%s", stage, client_name(client_ip),
             printable(reply_text), fields, reason or "other")


def log_recipient(logger: logging.Logger, queue_id: str, recipient: str, *, relay: str,
                  delay: float, dsn: str, status: str, reply_text: str,
                  orig_to: str = "") -> None:
    """One delivery outcome, Postfix's smtp(8) line: status is sent, deferred or bounced."""
    if not logger.isEnabledFor(logging.INFO):
        return
    original = f", orig_to=<{printable(orig_to)}>" if orig_to and orig_to != recipient else ""
    logger.info("%s: to=<%s>%s, relay=%s, delay=%s, dsn=%s, status=%s (%s)", queue_id,
                printable(recipient), original, relay or "none", format_delay(delay),
                dsn or "4.0.0", status, printable(reply_text))


def format_delay(seconds: float) -> str:
    """Postfix's ``delay=``: whole seconds from 10 s on, else two significant digits, to 0.01 s.

    Never an exponent (``%.2g`` alone writes 120 as ``1.2e+02``, which no log reader parses).
    """
    seconds = max(0.0, seconds)
    if seconds >= 10:
        return str(int(seconds))
    return f"{round(seconds, 2):.2g}"
