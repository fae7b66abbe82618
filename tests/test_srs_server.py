"""SRS in the server (envelope rewrite, bounces home) and the ``mailforward srs`` commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailforward.cli import main
from mailforward.config import DatabaseSettings
from mailforward.smtpd import replies
from mailforward.smtpd.server import MailServer
from mailforward.srs import SrsRewriter

from smtp_harness import Clock, RawClient, ServerThread, wait_for_log
from test_smtpd import rcpt_reply, send

SECRET = "tops3cr3t"


@pytest.fixture
def rewriter() -> SrsRewriter:
    return SrsRewriter("example.org", [SECRET])


@pytest.fixture
def srs_server(seeded_database: DatabaseSettings, rewriter: SrsRewriter):  # type: ignore[no-untyped-def]
    server = ServerThread(seeded_database)
    server.loops.run(server.server.stop())
    server.server = MailServer(server.settings, server.table, server.delivery, rewriter)
    server.host, server.port = server.loops.run(server.server.start())[0]
    yield server
    server.close()


def test_forwarded_mail_gets_an_srs0_envelope_sender(srs_server: ServerThread,
                                                     rewriter: SrsRewriter) -> None:
    send(srs_server, ["alice@example.org"], sender="sender@ext.test")
    (message,) = srs_server.messages
    assert message.sender == rewriter.forward("sender@ext.test")
    assert message.sender.startswith("SRS0=") and message.sender.endswith("=ext.test=sender@example.org")
    assert b"From: sender@ext.test" in message.content  # headers untouched


def test_null_sender_is_not_rewritten(srs_server: ServerThread) -> None:
    send(srs_server, ["alice@example.org"], sender="")
    assert srs_server.messages[0].sender == ""


def test_bounce_to_our_srs_address_goes_to_the_original_sender(srs_server: ServerThread,
                                                                rewriter: SrsRewriter) -> None:
    address = rewriter.forward("someone@ext.test")
    send(srs_server, [address], sender="")
    assert srs_server.messages[0].recipients == ("someone@ext.test",)


def test_srs_address_is_matched_case_insensitively(srs_server: ServerThread,
                                                   rewriter: SrsRewriter) -> None:
    address = rewriter.forward("someone@ext.test").upper()
    send(srs_server, [address], sender="")
    assert srs_server.messages[0].recipients == ("SOMEONE@EXT.TEST",)


def test_tampered_hash_is_user_unknown(srs_server: ServerThread, rewriter: SrsRewriter) -> None:
    address = rewriter.forward("someone@ext.test")
    forged = "SRS0=XXXX" + address[len("SRS0=XXXX"):]
    assert rcpt_reply(srs_server, forged, sender="") == str(replies.USER_UNKNOWN.about(forged))


def test_expired_srs_address_is_user_unknown(srs_server: ServerThread) -> None:
    month_ago = SrsRewriter("example.org", [SECRET], clock=Clock(time.time() - 30 * 86400))
    address = month_ago.forward("someone@ext.test")
    assert rcpt_reply(srs_server, address, sender="") == str(replies.USER_UNKNOWN.about(address))


@pytest.mark.parametrize("address", ["SRS0=abcd@example.org", "SRS0=abcd=2W@example.org",
                                     "SRS1=abcd=x@example.org"])
def test_malformed_srs_address_is_user_unknown(srs_server: ServerThread, address: str) -> None:
    assert rcpt_reply(srs_server, address, sender="") == str(replies.USER_UNKNOWN.about(address))


def test_srs_address_signed_with_another_secret_is_user_unknown(srs_server: ServerThread) -> None:
    address = SrsRewriter("example.org", ["other"]).forward("someone@ext.test")
    assert rcpt_reply(srs_server, address, sender="").startswith("550 5.1.1")


# ---------------------------------------------------------------- serve start-up


def _serve_with_secret(tmp_path: Path, secret: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mf.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n'
                      f'[database]\nurl = "sqlite:///{tmp_path}/db"\n'
                      f'[srs]\ndomain = "example.org"\nsecret_file = "{secret}"\n')
    return subprocess.run([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                          capture_output=True, text=True, timeout=30)


def test_serve_refuses_a_missing_secret_file(tmp_path: Path) -> None:
    result = _serve_with_secret(tmp_path, tmp_path / "absent.secret")
    assert result.returncode == 2
    assert "absent.secret does not exist" in result.stderr


def test_serve_refuses_a_group_readable_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "loose.secret"
    secret.write_text("abc\n")
    secret.chmod(0o640)
    result = _serve_with_secret(tmp_path, secret)
    assert result.returncode == 2
    assert "readable by group" in result.stderr


def test_serve_refuses_an_empty_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "empty.secret"
    secret.write_text("\n")
    secret.chmod(0o600)
    result = _serve_with_secret(tmp_path, secret)
    assert result.returncode == 2
    assert "is empty" in result.stderr


# ---------------------------------------------------------------- CLI


def _srs_env(secret: Path) -> dict[str, str]:
    return {"MAILFORWARD_SRS__DOMAIN": "example.org", "MAILFORWARD_SRS__SECRET_FILE": str(secret)}


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "srs.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def test_keygen_writes_a_private_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "new.secret"
    result = CliRunner().invoke(main, ["srs", "keygen", "--file", str(path)])
    assert result.exit_code == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 64


def test_keygen_refuses_to_overwrite(secret_file: Path) -> None:
    result = CliRunner().invoke(main, ["srs", "keygen", "--file", str(secret_file)])
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.output


def test_cli_forward_and_reverse_round_trip(secret_file: Path) -> None:
    runner = CliRunner()
    forwarded = runner.invoke(main, ["srs", "forward", "user@ext.test"], env=_srs_env(secret_file))
    assert forwarded.exit_code == 0 and forwarded.output.startswith("SRS0=")
    reversed_ = runner.invoke(main, ["srs", "reverse", forwarded.output.strip()], env=_srs_env(secret_file))
    assert (reversed_.exit_code, reversed_.output) == (0, "user@ext.test\n")


@pytest.mark.parametrize("address, reason", [
    ("SRS0=FAKE=2V=otherdomain.com=test@example.com", "Time stamp out of date"),
    ("test@example.com", "Not an SRS address"),
    ("SRS0=XjO9@example.com", "No timestamp"),
])
def test_cli_reverse_failure_exits_2_with_the_reason(secret_file: Path, address: str, reason: str) -> None:
    result = CliRunner().invoke(main, ["srs", "reverse", address], env=_srs_env(secret_file))
    assert result.exit_code == 2
    assert reason in result.output


def test_cli_reverse_of_a_tampered_hash_exits_2(secret_file: Path, rewriter: SrsRewriter) -> None:
    forged = "SRS0=XXXX" + rewriter.forward("user@ext.test")[len("SRS0=XXXX"):]
    result = CliRunner().invoke(main, ["srs", "reverse", forged], env=_srs_env(secret_file))
    assert result.exit_code == 2
    assert "Hash invalid" in result.output


def test_cli_srs_without_domain_exits_2() -> None:
    result = CliRunner().invoke(main, ["srs", "forward", "a@b.test"], env={})
    assert result.exit_code == 2
    assert "[srs] domain" in result.output


def test_srs_serve_answers_tcp_table_queries(tmp_path: Path, secret_file: Path) -> None:
    env = {**_srs_env(secret_file), "MAILFORWARD_SRS__FORWARD_PORT": "0",
           "MAILFORWARD_SRS__REVERSE_PORT": "0",
           "MAILFORWARD_DATABASE__URL": f"sqlite:///{tmp_path}/db"}
    log = tmp_path / "srs.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mailforward", "srs", "serve"],
                                env={**os.environ, **env}, stderr=out)
    try:
        forward, reverse = wait_for_log(proc, log, r"listening for (forward|reverse) lookups on "
                                                   r"127\.0\.0\.1:(\d+)", count=2)
        ports = {kind: int(port) for kind, port in (forward.groups(), reverse.groups())}
        forward_port, reverse_port = ports["forward"], ports["reverse"]
        with socket.create_connection(("127.0.0.1", forward_port), timeout=5) as s:
            s.sendall(b"get user@ext.test\n")
            answer = s.makefile("rb").readline()
        assert answer.startswith(b"200 SRS0=")
        srs_address = answer[4:].strip().decode()
        with socket.create_connection(("127.0.0.1", reverse_port), timeout=5) as s:
            s.sendall(f"get {srs_address}\n".encode())
            assert s.makefile("rb").readline() == b"200 user@ext.test\n"
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- senders SRS cannot carry

def mail_from_reply(server: ServerThread, mail_from: bytes) -> str:
    with RawClient(server.host, server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.send(b"MAIL FROM:" + mail_from + b"\r\n")
        return c.read_reply()


@pytest.mark.parametrize("mail_from", [
    b'<"john doe"@sender.test>',
    b'<"a@b"@sender.test>',
    b'<"ctl\x01char"@sender.test>',
], ids=["quoted-space", "quoted-at", "control-character"])
def test_sender_srs_cannot_rewrite_is_refused_at_mail_from(srs_server: ServerThread,
                                                           mail_from: bytes) -> None:
    assert mail_from_reply(srs_server, mail_from) == str(replies.UNFORWARDABLE_SENDER)


def test_utf8_sender_without_smtputf8_is_refused(srs_server: ServerThread) -> None:
    reply = mail_from_reply(srs_server, "<sénder@sender.test>".encode())
    assert reply == str(replies.SMTPUTF8_REQUIRED)


def test_utf8_sender_with_smtputf8_is_rewritten_to_a_utf8_srs_address(
        srs_server: ServerThread, rewriter: SrsRewriter) -> None:
    with RawClient(srs_server.host, srs_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.send("MAIL FROM:<sénder@sender.test> SMTPUTF8\r\n".encode())
        assert c.read_reply() == str(replies.SENDER_OK)
        assert c.command("RCPT TO:<alice@example.org>") == str(replies.RECIPIENT_OK)
        c.command("DATA")
        c.send("From: sénder@sender.test\r\n\r\nbody\r\n.\r\n".encode())
        assert c.read_reply().startswith("250 2.0.0")
    (message,) = srs_server.messages
    assert message.sender == rewriter.forward("sénder@sender.test")
    assert message.sender.endswith("=sender.test=sénder@example.org")
    assert message.smtputf8
