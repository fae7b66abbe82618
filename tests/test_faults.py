"""Faults around ``mailforward serve``: crashes, a dead resolver, an unwritable spool.

Each test runs the real server (a subprocess, killed with SIGKILL where the
test says so) against a real sink on loopback, and counts what arrives.  The
promise under test: every message the client got a 250 for is delivered, and
delivered exactly once; a failure we cannot work around is a 4xx, never a
250 and never a 5xx.
"""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailforward.admin import Admin
from mailforward.cli import main
from mailforward.config import DatabaseSettings
from mailforward.delivery.spool import Spool
from mailforward.tables import open_admin_database

from conftest import seed_reference_data
from smtp_harness import (
    HOSTNAME,
    USER_UNKNOWN,
    RawClient,
    ServeProcess,
    Sink,
    serve_zone,
    wait_until,
)

BODY = b"From: sender@ext.test\r\nSubject: fault test\r\n\r\nbody\r\n"


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
def sink() -> Iterator[Sink]:
    """The destination: tests make it defer (``sink.defer``) or hang in DATA (``sink.hang``)."""
    with Sink() as sink:
        yield sink


def write_config(tmp_path: Path, database: DatabaseSettings, delivery: str) -> Path:
    config = tmp_path / "mf.toml"
    config.write_text(f'[server]\nhostname = "{HOSTNAME}"\nlisten = ["127.0.0.1:0"]\n'
                      f'[database]\nurl = "{database.url}"\n'
                      f'[delivery]\nspool_directory = "{tmp_path / "spool"}"\n'
                      f'passthrough_timeout = 5\n{delivery}'
                      '[auth]\nverify = false\n')
    return config


def flush(served: ServeProcess) -> None:
    result = CliRunner().invoke(main, ["--config", str(served.config), "queue", "flush"])
    assert result.exit_code == 0, result.output


@pytest.fixture
def relayed(tmp_path: Path, database: DatabaseSettings, sink: Sink) -> Iterator[tuple[ServeProcess, Sink]]:
    config = write_config(tmp_path, database, f'relay_host = "[127.0.0.1]:{sink.port}"\n')
    with ServeProcess(config) as served:
        yield served, sink


def send(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        assert client.sendmail("sender@ext.test", [rcpt], BODY) == {}


def pending(served: ServeProcess) -> list[list[str]]:
    return [list(entry.pending) for entry in Spool(served.config.parent / "spool").list()]


def attempts(served: ServeProcess) -> list[int]:
    return [entry.attempts for entry in Spool(served.config.parent / "spool").list()]


def delivered_in_spool(served: ServeProcess) -> set[str]:
    return {r for entry in Spool(served.config.parent / "spool").list() for r in entry.delivered}


def test_kill_during_a_spool_retry_delivers_each_destination_exactly_once(
        relayed: tuple[ServeProcess, Sink]) -> None:
    served, sink = relayed
    sink.defer = {"b@two.test", "c@three.test"}
    send(served.port, "fan@example.org")  # a delivered, b and c spooled, then 250
    assert pending(served) == [["b@two.test", "c@three.test"]]
    # Through relay_host, b and c share one transaction: b goes out first, alone.
    sink.defer = {"c@three.test"}
    flush(served)
    # b recorded and the pass over (rescheduled), so the next flush is not overwritten by it
    wait_until(lambda: "b@two.test" in delivered_in_spool(served) and attempts(served) == [2], 30)
    sink.defer, sink.hang = set(), {"c@three.test"}
    flush(served)
    assert sink.hanging.wait(30)
    served.kill()  # b is recorded as delivered; c's DATA is still unanswered
    sink.hang = set()
    served.restart()
    flush(served)
    wait_until(lambda: pending(served) == [], 30)
    assert [sink.count(r) for r in ("a@one.test", "b@two.test", "c@three.test")] == [1, 1, 1]


def test_kill_during_a_passthrough_loses_nothing_and_duplicates_nothing(
        relayed: tuple[ServeProcess, Sink]) -> None:
    served, sink = relayed
    sink.hang = {"alice.dest@sink.test"}
    client = RawClient("127.0.0.1", served.port, timeout=30)
    assert client.read_reply().startswith("220")
    for line in ("EHLO client.test", "MAIL FROM:<sender@ext.test>", "RCPT TO:<alice@example.org>",
                 "DATA"):
        client.command(line)
    client.send(BODY + b".\r\n")
    assert sink.hanging.wait(30)
    served.kill()  # no 250 was given: the sender still holds the message
    assert client.read_reply() == "(closed)"
    client.close()
    sink.hang = set()
    served.restart()
    send(served.port, "alice@example.org")  # the sender's retry
    assert sink.count("alice.dest@sink.test") == 1
    assert pending(served) == []


def test_spool_that_becomes_unwritable_is_451_over_the_socket(
        relayed: tuple[ServeProcess, Sink]) -> None:
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
    config = write_config(tmp_path, database, "")
    result = subprocess.run([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "spool directory" in result.stderr


def test_stopped_dns_server_is_451_over_the_socket(tmp_path: Path,
                                                   database: DatabaseSettings) -> None:
    with serve_zone("sink.test. 300 IN A 127.0.0.1\n") as dns:
        nameserver = dns.nameserver
    # the resolver's address now answers nothing
    config = write_config(tmp_path, database, f'nameservers = ["{nameserver}"]\ndns_timeout = 2\n')
    with ServeProcess(config) as served:
        with smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test", timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("sender@ext.test", ["alice@example.org"], BODY)
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.startswith(b"4.4.3")
        assert pending(served) == []


# ---------------------------------------------------------------- UTF-8 and privacy, end to end


@pytest.fixture
def utf8_relayed(tmp_path: Path, database: DatabaseSettings,
                 sink: Sink) -> Iterator[tuple[ServeProcess, Sink]]:
    """The sink offers SMTPUTF8 and refuses ``nosuch*`` as Postfix does, naming the address."""
    async def add_aliases() -> None:
        db = await open_admin_database(database)
        await Admin(db).add_alias("j\u00f6s\u00e9@example.org", "\u00fcn\u00ef@dest.test")
        await Admin(db).add_alias("private@example.org", "nosuch.box@dest.test")
        await db.close()
    asyncio.run(add_aliases())
    config = write_config(tmp_path, database, f'relay_host = "[127.0.0.1]:{sink.port}"\n')
    with ServeProcess(config) as served:
        yield served, sink


def test_utf8_sender_to_a_utf8_destination_is_delivered_over_the_socket(
        utf8_relayed: tuple[ServeProcess, Sink]) -> None:
    served, sink = utf8_relayed
    with smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test", timeout=30) as client:
        refused = client.sendmail("s\u00e9nder@sender.test", ["j\u00f6s\u00e9@example.org"],
                                  BODY, mail_options=["SMTPUTF8"])
    assert refused == {}
    assert [a.rcpt_tos for a in sink.arrivals] == [["\u00fcn\u00ef@dest.test"]]
    assert pending(served) == []


def test_downstream_refusal_over_the_socket_names_the_alias_not_the_target(
        utf8_relayed: tuple[ServeProcess, Sink]) -> None:
    served, _ = utf8_relayed
    with (smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test", timeout=30) as client,
          pytest.raises(smtplib.SMTPDataError) as refused):
        client.sendmail("sender@ext.test", ["private@example.org"], BODY)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        550, f"5.1.1 <private@example.org>: {USER_UNKNOWN}".encode())
