"""``install_content_guard``: third-party loggers never write message text into our log.

Records go through real handlers writing to a buffer, formatted with the
level, logger name and message, as an operator's log would show them.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Iterator

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailforward.logsafety import WITHHELD, ContentGuard, install_content_guard

HEADER_TEXT = "From: CEO <ceo@bank.test>"
FORMAT = "%(levelname)s %(name)s %(message)s"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """A guarded handler on the root logger; everything propagated ends up in the buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(FORMAT))
    install_content_guard(handler)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
def dkimpy_debug() -> Iterator[None]:
    logger = logging.getLogger("dkimpy")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(old_level)


def _sealed_message() -> tuple[bytes, bytes, bytes]:
    """(message sealed by dkimpy, its ARC-Seal b= value, the key's DNS record)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    message = (b"Authentication-Results: mx.test; arc=none\r\n"
               + f"{HEADER_TEXT}\r\nSubject: secret plans\r\n\r\nbody\r\n".encode())
    seal = b"".join(dkim.arc_sign(message, b"arc", b"sealer.test", private, b"mx.test"))
    b_value = re.search(rb"ARC-Seal:.*?\bb=([^;]+)", seal, re.DOTALL)
    assert b_value is not None
    return seal + message, b"".join(b_value.group(1).split()), b"v=DKIM1; k=rsa; p=" + public


def test_dkimpy_logging_an_arc_seal_writes_none_of_it(output: io.StringIO,
                                                      dkimpy_debug: None) -> None:
    sealed, b_value, record = _sealed_message()
    state, _, _ = dkim.arc_verify(sealed, dnsfunc=lambda name, timeout=5: record)
    assert state == dkim.CV_Pass
    text = output.getvalue()
    assert f"DEBUG dkimpy {WITHHELD}" in text  # dkimpy did log, through this handler
    assert b_value[:20].decode() not in text
    assert "ceo@bank.test" not in text and "secret plans" not in text


def test_header_text_in_a_third_party_records_arguments_is_withheld(
        output: io.StringIO) -> None:
    logging.getLogger("dkimpy").warning("bad header: %s", HEADER_TEXT)
    assert output.getvalue() == f"WARNING dkimpy {WITHHELD}\n"


@pytest.mark.parametrize("name", ["authheaders", "spf", "aiosmtplib", "asyncio", "mail.log",
                                  "mailforwarder"])
def test_every_logger_outside_our_namespace_is_withheld(output: io.StringIO, name: str) -> None:
    logging.getLogger(name).error("saw %s", HEADER_TEXT)
    assert output.getvalue() == f"ERROR {name} {WITHHELD}\n"


def test_exception_type_is_kept_without_its_text_or_traceback(output: io.StringIO) -> None:
    try:
        raise ValueError(HEADER_TEXT)
    except ValueError:
        logging.getLogger("asyncio").exception("Task failed on %s", HEADER_TEXT)
    assert output.getvalue() == f"ERROR asyncio {WITHHELD} (ValueError)\n"


def test_stack_information_is_dropped(output: io.StringIO) -> None:
    logging.getLogger("aiosmtplib").info("sending %s", HEADER_TEXT, stack_info=True)
    assert output.getvalue() == f"INFO aiosmtplib {WITHHELD}\n"


def test_our_own_records_keep_their_text(output: io.StringIO) -> None:
    logging.getLogger("mailforward.smtpd").info("status=%d", 250)
    assert output.getvalue() == "INFO mailforward.smtpd status=250\n"


def test_guarding_a_logger_guards_the_handlers_it_has(dkimpy_debug: None) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(FORMAT))
    parent = logging.getLogger("guarded-parent-for-test")
    parent.addHandler(handler)
    try:
        install_content_guard(parent)
        logging.getLogger("guarded-parent-for-test.child").warning("%s", HEADER_TEXT)
    finally:
        parent.removeHandler(handler)
    assert buffer.getvalue() == f"WARNING guarded-parent-for-test.child {WITHHELD}\n"


def test_guarding_twice_adds_one_filter() -> None:
    handler = logging.StreamHandler(io.StringIO())
    install_content_guard(handler)
    install_content_guard(handler)
    assert sum(isinstance(f, ContentGuard) for f in handler.filters) == 1


def test_the_commands_that_log_guard_the_root_logger() -> None:
    from mailforward.cli import setup_logging
    from mailforward.logsafety import ContentGuard
    setup_logging()
    root = logging.getLogger()
    assert any(isinstance(f, ContentGuard) for f in root.filters)
    assert all(any(isinstance(f, ContentGuard) for f in h.filters) for h in root.handlers)
