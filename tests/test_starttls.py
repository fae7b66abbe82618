"""STARTTLS with a configured certificate, over a real socket."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

import pytest

from mailforward.config import DatabaseSettings

from certs import write_self_signed
from smtp_harness import HOSTNAME, ServerThread
from test_smtpd import BODY


@pytest.fixture
def tls_server(seeded_database: DatabaseSettings, tmp_path: Path):  # type: ignore[no-untyped-def]
    cert, key = write_self_signed(tmp_path, HOSTNAME)
    server = ServerThread(seeded_database, tls_cert=str(cert), tls_key=str(key))
    yield server
    server.close()


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_starttls_is_advertised_with_a_certificate(tls_server: ServerThread) -> None:
    with smtplib.SMTP(tls_server.host, tls_server.port, local_hostname="client.test") as s:
        s.ehlo()
        assert s.has_extn("starttls")


def test_mail_is_accepted_over_starttls(tls_server: ServerThread) -> None:
    with smtplib.SMTP(tls_server.host, tls_server.port, local_hostname="client.test") as s:
        s.starttls(context=_client_context())
        s.ehlo()
        assert not s.has_extn("starttls")
        assert s.sendmail("sender@ext.test", ["alice@example.org"], BODY) == {}
    (message,) = tls_server.messages
    assert b"with ESMTPS id" in message.content


def test_session_state_is_reset_after_starttls(tls_server: ServerThread) -> None:
    with smtplib.SMTP(tls_server.host, tls_server.port, local_hostname="client.test") as s:
        s.ehlo()
        s.starttls(context=_client_context())
        code, _ = s.docmd("MAIL FROM:<sender@ext.test>")
    assert code == 503  # RFC 3207: the client must EHLO again
