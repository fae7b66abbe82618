"""The SMTP engine's own duties, over real sockets: framing, limits, extensions, hang-ups.

Policy is tested elsewhere (``test_smtpd.py``, ``test_from_policy.py``); here
every test is about bytes on the wire: what ends a message, what a client
can make the server hold in memory, what makes it hang up.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailforward.config import DatabaseSettings
from mailforward.smtpd import replies

from certs import write_self_signed
from smtp_harness import HOSTNAME, RawClient, ServeProcess, ServerThread, Sink

MESSAGE = b"From: sender@ext.test\r\nSubject: engine\r\n\r\nbody\r\n"


def open_transaction(c: RawClient, sender: str = "sender@ext.test",
                     recipient: str = "alice@example.org") -> None:
    c.read_reply()
    assert c.command("EHLO client.test").startswith("250 ")
    assert c.command(f"MAIL FROM:<{sender}>") == str(replies.SENDER_OK)
    assert c.command(f"RCPT TO:<{recipient}>") == str(replies.RECIPIENT_OK)


# ---------------------------------------------------------------- DATA framing

def test_half_close_after_the_final_dot_still_gets_a_reply(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.command("DATA")
        c.send(MESSAGE + b".\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_reply().startswith("250 2.0.0 Ok: queued as")
    assert len(smtp_server.messages) == 1


def test_lf_dot_crlf_does_not_end_data(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.command("DATA")
        c.send(MESSAGE + b"line\n.\r\nstill content\r\n.\r\n")
        assert c.read_reply().startswith("250 2.0.0")
    (message,) = smtp_server.messages
    assert message.content.endswith(b"line\r\n\r\nstill content\r\n")


def test_data_split_across_many_tiny_writes_is_one_message(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.command("DATA")
        for byte in MESSAGE + b".\r\n":
            c.send(bytes([byte]))
        assert c.read_reply().startswith("250 2.0.0")
    assert smtp_server.messages[0].content.endswith(MESSAGE)


def test_commands_pipelined_after_the_final_dot_are_answered(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.command("DATA")
        c.send(MESSAGE + b".\r\nMAIL FROM:<other@ext.test>\r\nRSET\r\nQUIT\r\n")
        assert c.read_reply().startswith("250 2.0.0")
        assert c.read_reply() == str(replies.SENDER_OK)
        assert c.read_reply() == str(replies.OK)
        assert c.read_reply() == str(replies.BYE)


def test_empty_message_ends_at_its_first_line(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.command("DATA")
        c.send(b".\r\n")
        assert c.read_reply() == str(replies.FROM_MISSING)  # ended, then judged by policy


def test_oversized_message_is_refused_and_the_session_goes_on(
        seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, message_size_limit=1000)
    try:
        with RawClient(server.host, server.port) as c:
            open_transaction(c)
            c.command("DATA")
            c.send(MESSAGE + b"x" * 5000 + b"\r\n.\r\n")
            assert c.read_reply() == str(replies.MESSAGE_TOO_BIG)
            assert c.command("NOOP") == str(replies.OK)
        assert server.messages == []
    finally:
        server.close()


# ---------------------------------------------------------------- BDAT (RFC 3030)

def test_chunking_and_dsn_are_advertised(smtp_server: ServerThread) -> None:
    with smtplib.SMTP(smtp_server.host, smtp_server.port, local_hostname="client.test") as s:
        s.ehlo()
        assert {"chunking", "dsn", "8bitmime", "smtputf8"} <= set(s.esmtp_features)


def test_bdat_chunks_pipelined_make_one_message(smtp_server: ServerThread) -> None:
    first, second = MESSAGE[:20], MESSAGE[20:]
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.send(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(first), first, len(second), second))
        assert c.read_reply() == str(replies.chunk_received(len(first)))
        assert c.read_reply().startswith("250 2.0.0 Ok: queued as")
    assert smtp_server.messages[0].content.endswith(MESSAGE)


def test_bdat_content_that_looks_like_commands_is_content(smtp_server: ServerThread) -> None:
    smuggled = (MESSAGE + b".\r\nMAIL FROM:<admin@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n")
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.send(b"BDAT %d LAST\r\n%s" % (len(smuggled), smuggled))
        assert c.read_reply().startswith("250 2.0.0")
        assert c.command("QUIT") == str(replies.BYE)
    (message,) = smtp_server.messages
    assert b"Subject: smuggled" in message.content


def test_bdat_bare_line_ends_are_normalised_like_data(smtp_server: ServerThread) -> None:
    content = b"From: sender@ext.test\nSubject: x\r\rbody\n"
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.send(b"BDAT %d LAST\r\n%s" % (len(content), content))
        assert c.read_reply().startswith("250 2.0.0")
    assert smtp_server.messages[0].content.endswith(
        b"From: sender@ext.test\r\nSubject: x\r\n\r\nbody\r\n")


def test_bdat_without_recipients_is_consumed_and_refused(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        c.send(b"BDAT 9 LAST\r\nNOOP\r\nXYZ")
        assert c.read_reply() == str(replies.NO_VALID_RECIPIENTS)
        assert c.command("NOOP") == str(replies.OK)  # the chunk was not read as commands


def test_data_inside_a_bdat_transaction_is_refused(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        open_transaction(c)
        c.send(b"BDAT 4\r\nabcd")
        c.read_reply()
        assert c.command("DATA") == str(replies.BDAT_EXPECTED)


def test_bdat_over_the_size_limit_is_refused(seeded_database: DatabaseSettings) -> None:
    server = ServerThread(seeded_database, message_size_limit=100)
    try:
        with RawClient(server.host, server.port) as c:
            open_transaction(c)
            c.send(b"BDAT 300 LAST\r\n" + b"y" * 300)
            assert c.read_reply() == str(replies.MESSAGE_TOO_BIG)
            assert c.command("NOOP") == str(replies.OK)
    finally:
        server.close()


# ---------------------------------------------------------------- DSN and BODY parameters

def test_dsn_parameters_are_accepted_and_kept(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        assert c.command("MAIL FROM:<sender@ext.test> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME") \
            == str(replies.SENDER_OK)
        assert c.command("RCPT TO:<alice@example.org> NOTIFY=SUCCESS,FAILURE "
                         "ORCPT=rfc822;alice@example.org") == str(replies.RECIPIENT_OK)
        c.command("DATA")
        c.send(MESSAGE + b".\r\n")
        assert c.read_reply().startswith("250 2.0.0")
    (message,) = smtp_server.messages
    assert (message.dsn_ret, message.dsn_envid, message.body) == ("HDRS", "abc+2Bdef", "8BITMIME")
    dsn = message.dsn["alice.dest@sink.test"]
    assert (dsn.notify, dsn.orcpt) == ("SUCCESS,FAILURE", "rfc822;alice@example.org")


@pytest.mark.parametrize("command", [
    "MAIL FROM:<sender@ext.test> RET=SOME",
    "MAIL FROM:<sender@ext.test> ENVID=bad=xtext",
    "MAIL FROM:<sender@ext.test> RET=FULL RET=HDRS",
    "MAIL FROM:<sender@ext.test> BODY=BINARYMIME",
])
def test_malformed_mail_parameters_are_refused(smtp_server: ServerThread, command: str) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        assert c.command(command) == str(replies.BAD_PARAMETER)


@pytest.mark.parametrize("params", ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=alice",
                                    "FOO=BAR"])
def test_malformed_rcpt_parameters_are_refused(smtp_server: ServerThread, params: str) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        assert c.command(f"RCPT TO:<alice@example.org> {params}") == str(replies.BAD_PARAMETER)


def test_received_header_says_utf8smtp_in_an_smtputf8_session(smtp_server: ServerThread) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test> SMTPUTF8")
        c.command("RCPT TO:<alice@example.org>")
        c.command("DATA")
        c.send(MESSAGE + b".\r\n")
        assert c.read_reply().startswith("250 2.0.0")
    assert b" with UTF8SMTP id " in smtp_server.messages[0].content


# ---------------------------------------------------------------- hang-ups

@pytest.fixture
def trusting_server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    server = ServerThread(seeded_database, mynetworks=("127.0.0.0/8",))
    yield server
    server.close()


def test_http_post_from_a_trusted_client_relays_nothing(trusting_server: ServerThread) -> None:
    body = (b"EHLO x\r\nMAIL FROM:<a@ext.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
            b"From: a@ext.test\r\n\r\nspam\r\n.\r\nQUIT\r\n")
    request = (b"POST / HTTP/1.1\r\nHost: mail.example.com\r\nContent-Length: %d\r\n\r\n"
               % len(body)) + body
    with RawClient(trusting_server.host, trusting_server.port) as c:
        c.read_reply()
        c.send(request)
        assert c.read_reply() == str(replies.FORBIDDEN_COMMAND)
        assert c.read_reply() == "(closed)"
    assert trusting_server.messages == []


@pytest.mark.parametrize("line", ["GET / HTTP/1.0", "CONNECT mail.example.com:25 HTTP/1.1",
                                  "Host: mail.example.com", "<html>"])
def test_non_smtp_commands_end_the_session(smtp_server: ServerThread, line: str) -> None:
    with RawClient(smtp_server.host, smtp_server.port) as c:
        c.read_reply()
        assert c.command(line) == str(replies.FORBIDDEN_COMMAND)
        assert c.read_reply() == "(closed)"


def test_plaintext_pipelined_behind_starttls_is_discarded(seeded_database: DatabaseSettings,
                                                          tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path, HOSTNAME)
    server = ServerThread(seeded_database, tls_cert=str(cert), tls_key=str(key))
    try:
        with RawClient(server.host, server.port) as c:
            c.read_reply()
            c.command("EHLO client.test")
            c.send(b"STARTTLS\r\nMAIL FROM:<injected@ext.test>\r\n")
            assert c.read_reply() == str(replies.READY_FOR_TLS)
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            tls = context.wrap_socket(c.sock, server_hostname=HOSTNAME)
            tls.sendall(b"RCPT TO:<alice@example.org>\r\n")
            reply = tls.recv(4096).decode()
            tls.close()
        assert reply.startswith("503 5.5.1")  # no HELO and no MAIL survived the upgrade
    finally:
        server.close()


# ---------------------------------------------------------------- bounded, under load

@pytest.fixture
def refusing_sink() -> Iterator[int]:
    """A next hop that refuses every recipient: the message never leaves us, so what the
    server holds is what the engine and the handler hold."""
    with Sink(refuse_all=True) as sink:
        yield sink.port


def _serve(tmp_path: Path, database: DatabaseSettings, extra: str = "",
           relay_port: int = 9) -> ServeProcess:
    config = tmp_path / "mf.toml"
    config.write_text(f'[server]\nhostname = "{HOSTNAME}"\nlisten = ["127.0.0.1:0"]\n{extra}\n'
                      f'[database]\nurl = "{database.url}"\n'
                      f'[delivery]\nspool_directory = "{tmp_path / "spool"}"\n'
                      f'relay_host = "[127.0.0.1]:{relay_port}"\n'
                      '[auth]\nverify = false\n')
    return ServeProcess(config)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_9_mb_message_of_short_lines_is_held_within_twice_its_size(
        seeded_database: DatabaseSettings, tmp_path: Path, refusing_sink: int) -> None:
    with _serve(tmp_path, seeded_database, relay_port=refusing_sink) as served:
        def send(content: bytes) -> str:
            with RawClient("127.0.0.1", served.port, timeout=60) as c:
                open_transaction(c)
                c.command("DATA")
                c.send(content + b".\r\n")
                return c.read_reply()

        send(MESSAGE)  # warm up: the first transaction's imports, TLS context, pools
        before = _rss_kib(served.proc.pid)
        body = b"ab\r\n" * (9_000_000 // 4)
        reply = send(MESSAGE.replace(b"body\r\n", b"") + body)
        growth = _rss_kib(served.proc.pid) - before
    assert reply.startswith("550 5.1.1")  # read, judged, offered, refused downstream
    print(f"peak RSS growth for a {len(body)} byte message: {growth} KiB")
    assert growth * 1024 < 2 * len(body), f"peak RSS grew by {growth} KiB"


def test_a_burst_of_1000_connections_all_get_a_banner(seeded_database: DatabaseSettings,
                                                      tmp_path: Path) -> None:
    served = _serve(tmp_path, seeded_database,
                    "client_connection_count_limit = 5000\n"
                    "client_connection_rate_limit = 5000")

    async def burst() -> list[bytes]:
        async def one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            try:
                return await asyncio.wait_for(reader.readline(), 60)
            finally:
                writer.close()
        return await asyncio.gather(*(one() for _ in range(1000)))

    with served:
        banners = asyncio.run(burst())
    assert banners == [f"220 {HOSTNAME} ESMTP\r\n".encode()] * 1000

