"""Log lines in Postfix's shapes, to stderr, a file or syslog, as text or JSON."""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailforward.config import DatabaseSettings, LogSettings
from mailforward.ops.logs import (
    JsonFormatter,
    PostfixFormatter,
    configure_logging,
    log_recipient,
    log_reject,
    program_of,
)

from smtp_harness import RawClient, ServerThread


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, (), None)


def test_programs_are_named_postfix_style() -> None:
    assert program_of("mailforward.smtpd") == "mailforward/smtpd"
    assert program_of("mailforward.delivery.client") == "mailforward/smtp"
    assert program_of("mailforward.delivery.retry") == "mailforward/qmgr"
    assert program_of("mailforward.cli") == "mailforward"


def test_text_line_has_the_syslog_shape_and_a_level_prefix() -> None:
    line = PostfixFormatter().format(record("mailforward.smtpd", logging.WARNING, "hello"))
    assert re.fullmatch(r"\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ mailforward/smtpd\[\d+\]: warning: hello",
                        line)


def test_info_lines_have_no_level_prefix() -> None:
    line = PostfixFormatter(with_header=False).format(record("mailforward.smtpd", logging.INFO, "x"))
    assert re.fullmatch(r"mailforward/smtpd\[\d+\]: x", line)


def test_json_line_is_one_object() -> None:
    entry = json.loads(JsonFormatter().format(record("mailforward.smtpd", logging.ERROR, "boom")))
    assert entry["level"] == "error" and entry["program"] == "mailforward/smtpd"
    assert entry["message"] == "boom"


def test_reject_line_is_postfixs_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log_reject("RCPT", "192.0.2.7", "554 5.7.1 <x@y.test>: Relay access denied", "relay_denied",
               sender="a@b.test", recipient="x@y.test", helo="h.test")
    assert caplog.messages == [
        "NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 554 5.7.1 <x@y.test>: Relay access "
        "denied; from=<a@b.test> to=<x@y.test> proto=ESMTP helo=<h.test> reason=relay_denied"]


def test_delivery_line_is_smtps(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log_recipient(logging.getLogger("mailforward.delivery"), "4F2A9C01B3", "alice@dest.test",
                  relay="mx.dest.test[192.0.2.9]:25", delay=0.41, dsn="2.0.0", status="sent",
                  reply_text="250 2.0.0 Ok", orig_to="alice@example.org")
    assert caplog.messages == [
        "4F2A9C01B3: to=<alice@dest.test>, orig_to=<alice@example.org>, "
        "relay=mx.dest.test[192.0.2.9]:25, delay=0.41, dsn=2.0.0, status=sent (250 2.0.0 Ok)"]


def test_log_text_from_clients_cannot_forge_a_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log_reject("RCPT", "192.0.2.7", "554 5.7.1 x", "relay_denied",
               sender="a@b.test\nmailforward/smtpd[1]: forged", helo="h\x1b[2J")
    assert "\n" not in caplog.text.strip() and "\x1b" not in caplog.text


def test_refused_recipient_is_logged_with_its_reason(seeded_database: DatabaseSettings,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailforward.smtpd")
    server = ServerThread(seeded_database)
    try:
        with RawClient(server.host, server.port) as c:
            c.read_reply()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<sender@ext.test>")
            c.command("RCPT TO:<victim@elsewhere.test>")
            c.command("QUIT")
    finally:
        server.close()
    (line,) = [m for m in caplog.messages if m.startswith("NOQUEUE: reject: RCPT")]
    assert line == ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 "
                    "<victim@elsewhere.test>: Relay access denied; from=<sender@ext.test> "
                    "to=<victim@elsewhere.test> proto=ESMTP helo=<client.test> reason=relay_denied")


def test_file_destination_writes_lines_to_the_file(tmp_path: Path, restore_logging: None) -> None:
    path = tmp_path / "mail.log"
    configure_logging(LogSettings(destination="file", file=str(path)))
    logging.getLogger("mailforward.smtpd").info("to the file")
    assert re.search(r"mailforward/smtpd\[\d+\]: to the file\n", path.read_text())


def test_syslog_destination_sends_mail_facility_datagrams(tmp_path: Path,
                                                          restore_logging: None) -> None:
    address = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(5)
        configure_logging(LogSettings(destination="syslog", syslog_socket=address))
        logging.getLogger("mailforward.smtpd").info("to syslog")
        datagram = listener.recv(4096).decode()
    assert re.fullmatch(r"<22>mailforward/smtpd\[\d+\]: to syslog\x00?", datagram)  # mail.info


def test_level_setting_filters_lines(tmp_path: Path, restore_logging: None) -> None:
    path = tmp_path / "mail.log"
    configure_logging(LogSettings(destination="file", file=str(path), level="warning"))
    logging.getLogger("mailforward.smtpd").info("quiet")
    logging.getLogger("mailforward.smtpd").warning("loud")
    assert "quiet" not in path.read_text() and "warning: loud" in path.read_text()
