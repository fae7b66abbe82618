"""Faults around ``mailforward serve``: crashes, a dead resolver, an unwritable spool.

Each test runs the real server (a subprocess, killed with SIGKILL where the
test says so) against a real sink on loopback, and counts what arrives.  The
promise under test: every message the client got a 250 for is delivered, and
delivered exactly once; a failure we cannot work around is a 4xx, never a
250 and never a 5xx.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner

from mailforward.admin import Admin
from mailforward.cli import main
from mailforward.config import DatabaseSettings
from mailforward.delivery.spool import Spool
from mailforward.tables import open_admin_database

from conftest import seed_reference_data
from dns_server import LoopbackDNSServer, ZoneResolver
from smtp_harness import HOSTNAME, RawClient, free_port
from test_queue import _start_serve

BODY = b"From: sender@ext.test\r\nSubject: fault test\r\n\r\nbody\r\n"


class FaultSink:
    """A destination that defers, or hangs in DATA, for the recipients it is told to."""

    def __init__(self) -> None:
        self.envelopes: list[list[str]] = []
        self.defer: set[str] = set()
        self.hang: set[str] = set()
        self.hanging = threading.Event()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address in self.defer:
            return "451 4.2.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.hang & set(envelope.rcpt_tos):
            self.hanging.set()
            await asyncio.sleep(60)  # cancelled by aiosmtpd when the client disappears
        self.envelopes.append(list(envelope.rcpt_tos))
        return "250 2.0.0 Ok"

    def count(self, rcpt: str) -> int:
        return sum(rcpts.count(rcpt) for rcpts in self.envelopes)


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


@pytest.fixture
def database(tmp_path: Path) -> DatabaseSettings:
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path / 'mf.db'}", cache_ttl=0,
                                negative_cache_ttl=0)

    async def seed() -> None:
        await seed_reference_data(settings)
        db = await open_admin_database(settings)
        await Admin(db).add_alias("fan@example.org", "a@one.test,b@two.test,c@three.test")
        await db.close()
    asyncio.run(seed())
    return settings


@pytest.fixture
def sink() -> Iterator[tuple[FaultSink, int]]:
    handler = FaultSink()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def write_config(tmp_path: Path, database: DatabaseSettings, port: int, delivery: str) -> Path:
    config = tmp_path / "mf.toml"
    config.write_text(f'[server]\nhostname = "{HOSTNAME}"\nlisten = ["127.0.0.1:{port}"]\n'
                      f'[database]\nurl = "{database.url}"\n'
                      f'[delivery]\nspool_directory = "{tmp_path / "spool"}"\n'
                      f'passthrough_timeout = 5\n{delivery}'
                      '[auth]\nverify = false\n')
    return config


class Served:
    """``mailforward serve`` as a subprocess that a test may kill and restart."""

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port = config, port
        self.log = config.parent / "serve.log"
        self.proc = _start_serve(config, port, self.log)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        self.proc = _start_serve(self.config, self.port, self.log)

    def flush(self) -> None:
        result = CliRunner().invoke(main, ["--config", str(self.config), "queue", "flush"])
        assert result.exit_code == 0, result.output

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def relayed(tmp_path: Path, database: DatabaseSettings,
            sink: tuple[FaultSink, int]) -> Iterator[tuple[Served, FaultSink]]:
    handler, sink_port = sink
    port = free_port()
    served = Served(write_config(tmp_path, database, port,
                                 f'relay_host = "[127.0.0.1]:{sink_port}"\n'), port)
    yield served, handler
    served.stop()


def send(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        assert client.sendmail("sender@ext.test", [rcpt], BODY) == {}


def pending(served: Served) -> list[list[str]]:
    return [list(entry.pending) for entry in Spool(served.config.parent / "spool").list()]


def delivered_in_spool(served: Served) -> set[str]:
    return {r for entry in Spool(served.config.parent / "spool").list() for r in entry.delivered}


def test_kill_during_a_spool_retry_delivers_each_destination_exactly_once(
        relayed: tuple[Served, FaultSink]) -> None:
    served, sink = relayed
    sink.defer = {"b@two.test", "c@three.test"}
    send(served.port, "fan@example.org")  # a delivered, b and c spooled, then 250
    assert pending(served) == [["b@two.test", "c@three.test"]]
    sink.defer, sink.hang = set(), {"c@three.test"}
    served.flush()
    until(lambda: sink.hanging.is_set() and "b@two.test" in delivered_in_spool(served))
    served.kill()  # b is recorded as delivered; c's DATA is still unanswered
    sink.hang = set()
    served.restart()
    served.flush()
    until(lambda: pending(served) == [])
    assert [sink.count(r) for r in ("a@one.test", "b@two.test", "c@three.test")] == [1, 1, 1]


def test_kill_during_a_passthrough_loses_nothing_and_duplicates_nothing(
        relayed: tuple[Served, FaultSink]) -> None:
    served, sink = relayed
    sink.hang = {"alice.dest@sink.test"}
    client = RawClient("127.0.0.1", served.port, timeout=30)
    assert client.read_reply().startswith("220")
    for line in ("EHLO client.test", "MAIL FROM:<sender@ext.test>", "RCPT TO:<alice@example.org>",
                 "DATA"):
        client.command(line)
    client.send(BODY + b".\r\n")
    until(sink.hanging.is_set)
    served.kill()  # no 250 was given: the sender still holds the message
    assert client.read_reply() == "(closed)"
    client.close()
    sink.hang = set()
    served.restart()
    send(served.port, "alice@example.org")  # the sender's retry
    assert sink.count("alice.dest@sink.test") == 1
    assert pending(served) == []


def test_spool_that_becomes_unwritable_is_451_over_the_socket(
        relayed: tuple[Served, FaultSink]) -> None:
    served, sink = relayed
    sink.defer = {"b@two.test"}
    spool = served.config.parent / "spool"
    spool.rename(spool.with_name("spool.gone"))  # as root, permissions would not stop us:
    spool.write_text("a file where the spool directory was")  # ENOTDIR, as on a dead disk
    with smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test", timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("sender@ext.test", ["fan@example.org"], BODY)
    assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.3.0")


def test_serve_refuses_to_start_without_a_usable_spool(tmp_path: Path,
                                                      database: DatabaseSettings) -> None:
    (tmp_path / "spool").write_text("not a directory")
    config = write_config(tmp_path, database, free_port(), "")
    result = subprocess.run([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "spool directory" in result.stderr


def test_stopped_dns_server_is_451_over_the_socket(tmp_path: Path,
                                                   database: DatabaseSettings) -> None:
    dns = LoopbackDNSServer(ZoneResolver("sink.test. 300 IN A 127.0.0.1\n")).start()
    nameserver = dns.nameserver
    dns.stop()  # the resolver's address now answers nothing
    port = free_port()
    served = Served(write_config(tmp_path, database, port,
                                 f'nameservers = ["{nameserver}"]\ndns_timeout = 2\n'), port)
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("sender@ext.test", ["alice@example.org"], BODY)
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.startswith(b"4.4.3")
        assert pending(served) == []
    finally:
        served.stop()



# ---------------------------------------------------------------- UTF-8 and privacy, end to end


class EchoingSink(FaultSink):
    """Offers SMTPUTF8; refuses ``nosuch*`` as Postfix does, naming the address."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address.startswith("nosuch"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.fixture
def utf8_relayed(tmp_path: Path, database: DatabaseSettings) -> Iterator[tuple[Served, FaultSink]]:
    async def add_aliases() -> None:
        db = await open_admin_database(database)
        await Admin(db).add_alias("j\u00f6s\u00e9@example.org", "\u00fcn\u00ef@dest.test")
        await Admin(db).add_alias("private@example.org", "nosuch.box@dest.test")
        await db.close()
    asyncio.run(add_aliases())
    handler = EchoingSink()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=True)
    controller.start()
    port = free_port()
    served = Served(write_config(tmp_path, database, port,
                                 f'relay_host = "[127.0.0.1]:{controller.port}"\n'), port)
    yield served, handler
    served.stop()
    controller.stop()


def test_utf8_sender_to_a_utf8_destination_is_delivered_over_the_socket(
        utf8_relayed: tuple[Served, FaultSink]) -> None:
    served, sink = utf8_relayed
    with smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test", timeout=30) as client:
        refused = client.sendmail("s\u00e9nder@sender.test", ["j\u00f6s\u00e9@example.org"],
                                  BODY, mail_options=["SMTPUTF8"])
    assert refused == {}
    assert sink.envelopes == [["\u00fcn\u00ef@dest.test"]] and pending(served) == []


def test_downstream_refusal_over_the_socket_names_the_alias_not_the_target(
        utf8_relayed: tuple[Served, FaultSink]) -> None:
    served, _ = utf8_relayed
    with (smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test", timeout=30) as client,
          pytest.raises(smtplib.SMTPDataError) as refused):
        client.sendmail("sender@ext.test", ["private@example.org"], BODY)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        550, b"5.1.1 <private@example.org>: Recipient address rejected: User unknown")
