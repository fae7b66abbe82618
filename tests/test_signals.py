"""Signals as the interface, as for Postfix: SIGTERM drains, SIGHUP reloads.

Over a real ``mailforward serve`` subprocess (helpers in ``test_workers.py``):
transactions in DATA when SIGTERM arrives get their reply and are delivered
once; an idle session is told ``421 4.3.2``; SIGHUP never kills the server,
flushes the lookup caches and loads a rotated DKIM key (judged by
Mail::DKIM against the key published on a loopback DNS server), and a key
that does not load leaves the old one signing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dnslib import RR

from mailforward.admin import Admin
from mailforward.auth.dkim import DkimKey, generate_key
from mailforward.config import DatabaseSettings
from mailforward.tables import open_admin_database

from conftest import seed_reference_data
from dns_server import LoopbackDNSServer, ZoneResolver
from mail_dkim import mail_dkim_verify
from test_workers import (
    DEADLINE,
    HOSTNAME,
    Client,
    Serve,
    Sink,
    alive,
    message,
    send,
    spooled_files,
    wait_until,
    write_config,
)


@pytest.fixture
def database(tmp_path: Path) -> DatabaseSettings:
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path / 'mf.db'}")
    asyncio.run(seed_reference_data(settings))
    return settings


def reloads(served: Serve, count: int, containing: str = "") -> list[re.Match[str]]:
    """``count`` worker reload lines (one per process), each containing ``containing``."""
    return served.wait_for(rf"\[(\d+)\]: (?:\w+: )?reload: [^\n]*{re.escape(containing)}[^\n]*",
                           count=count)


def reload_pids(served: Serve, matches: list[re.Match[str]]) -> set[int]:
    return {int(m.group(1)) for m in matches}


# ---------------------------------------------------------------- SIGTERM


def _transaction_in_data(port: int, tag: str, in_data: list[str]) -> str:
    """A whole transaction; returns the reply to the final dot (after the test released it)."""
    client = Client(port, timeout=60)
    try:
        assert client.reply().startswith("220")
        assert client.command("EHLO client.ext.test").startswith("250")
        assert client.command("MAIL FROM:<sender@ext.test>").startswith("250")
        assert client.command("RCPT TO:<alice@example.org>").startswith("250")
        assert client.command("DATA").startswith("354")
        client.sock.sendall(message(tag) + b".\r\n")
        in_data.append(tag)
        return client.reply()
    finally:
        client.close()


def test_sigterm_lets_transactions_in_data_finish_and_tells_idle_sessions_421(
        tmp_path: Path, database: DatabaseSettings) -> None:
    sink = Sink(gated=True)
    served = Serve(write_config(tmp_path, database, sink.port, "workers = 2"))
    pool = ThreadPoolExecutor(8)
    try:
        sent: list[str] = []
        answers = [pool.submit(_transaction_in_data, served.port, f"drain-{n}", sent)
                   for n in range(8)]
        idle = Client(served.port)
        assert idle.reply().startswith("220") and idle.command("EHLO idle.test").startswith("250")
        wait_until(lambda: sink.data_started == 8, "8 messages at the sink, unanswered")

        served.signal(signal.SIGTERM)
        assert idle.reply() == f"421 4.3.2 {HOSTNAME} Service shutting down"
        assert idle.reply() == "(closed)"
        idle.close()
        served.wait_for(r"draining (\d+) sessions", count=2)  # each worker, listeners closed
        with pytest.raises(ConnectionRefusedError):
            Client(served.port, timeout=5)
        assert not any(answer.done() for answer in answers)

        sink.release()
        replies = [answer.result(DEADLINE) for answer in answers]
        assert all(reply.startswith("250 ") for reply in replies), replies
        assert served.proc.wait(DEADLINE) == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        served.close()
        sink.stop()
    tags = sorted(re.search(rb"Subject: (\S+)", content)[1]  # type: ignore[index]
                  for _, _, content in sink.envelopes)
    assert tags == sorted(f"drain-{n}".encode() for n in range(8))  # each delivered once
    assert spooled_files(tmp_path) == []  # and nothing left to be sent again later
    drained = sum(int(m.group(1)) for m in served.find(r"draining (\d+) sessions"))
    assert drained == 9  # the 8 in DATA and the idle one
    assert served.find(rf"\[{served.pid}\]: .*stopped")


def test_sigterm_between_bdat_chunks_lets_the_message_finish(
        tmp_path: Path, database: DatabaseSettings) -> None:
    sink = Sink()
    served = Serve(write_config(tmp_path, database, sink.port, "workers = 1"))
    client = Client(served.port)
    try:
        assert client.reply().startswith("220")
        assert client.command("EHLO client.ext.test").startswith("250")
        assert client.command("MAIL FROM:<sender@ext.test>").startswith("250")
        assert client.command("RCPT TO:<alice@example.org>").startswith("250")
        head, _, body = message("bdat").partition(b"\r\n\r\n")
        first = head + b"\r\n\r\n"
        client.sock.sendall(b"BDAT %d\r\n" % len(first) + first)
        assert client.reply().startswith("250")
        served.signal(signal.SIGTERM)
        served.wait_for(r"draining 1 sessions")
        client.sock.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        assert client.reply().startswith("250 ")  # the transaction in progress finished
        assert client.reply() == f"421 4.3.2 {HOSTNAME} Service shutting down"
        assert served.proc.wait(DEADLINE) == 0
    finally:
        client.close()
        served.close()
        sink.stop()
    assert [re.search(rb"Subject: (\S+)", c)[1] for _, _, c in sink.envelopes] == [b"bdat"]  # type: ignore[index]


def test_drain_timeout_cuts_what_is_still_running_and_exits_0(
        tmp_path: Path, database: DatabaseSettings) -> None:
    sink = Sink(gated=True)  # never released while the server runs
    served = Serve(write_config(tmp_path, database, sink.port,
                                "workers = 1\ndrain_timeout = 1"))
    pool = ThreadPoolExecutor(1)
    try:
        answer = pool.submit(_transaction_in_data, served.port, "cut", [])
        wait_until(lambda: sink.data_started == 1, "the message at the sink")
        served.signal(signal.SIGTERM)
        assert served.proc.wait(DEADLINE) == 0
        assert answer.result(DEADLINE) == "(closed)"
        served.wait_for(r"drain_timeout \(1 s\) reached: cutting 1 sessions")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        served.close()
        sink.stop()


# ---------------------------------------------------------------- SIGHUP: lookups


async def _add_alias(database: DatabaseSettings, address: str, goto: str) -> None:
    db = await open_admin_database(database)
    try:
        await Admin(db).add_alias(address, goto)
    finally:
        await db.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_flushes_the_lookup_caches_and_keeps_serving(
        tmp_path: Path, database: DatabaseSettings, workers: int) -> None:
    asyncio.run(_add_alias(database, "hup@example.org", "old@sink.test"))
    sink = Sink()
    served = Serve(write_config(tmp_path, database, sink.port, f"workers = {workers}",
                                extra_database="cache_ttl = 3600"))
    try:
        sent = iter(range(100))

        def destinations() -> list[str]:  # each message different: none is a duplicate
            before = len(sink.envelopes)
            assert send(served.port, f"hup-{next(sent)}", rcpt="hup@example.org").startswith("250")
            return sink.envelopes[before][1]
        for _ in range(4):
            assert destinations() == ["old@sink.test"]
        connection = sqlite3.connect(database.url.removeprefix("sqlite:///"))
        connection.execute("UPDATE alias SET goto = 'new@sink.test' WHERE address = 'hup@example.org'")
        connection.commit()
        connection.close()
        if workers == 1:
            assert destinations() == ["old@sink.test"]  # the cache is what answers

        served.signal(signal.SIGHUP)
        lines = reloads(served, workers, "lookup caches flushed")
        assert len(reload_pids(served, lines)) == workers
        assert served.proc.poll() is None  # SIGHUP used to kill it (exit 129)
        for _ in range(4):
            assert destinations() == ["new@sink.test"]
        assert served.stop() == 0
    finally:
        served.close()
        sink.stop()


def test_sighup_with_a_config_that_does_not_load_keeps_everything(
        tmp_path: Path, database: DatabaseSettings) -> None:
    sink = Sink()
    served = Serve(write_config(tmp_path, database, sink.port, "workers = 2"))
    try:
        config = tmp_path / "mf.toml"
        config.write_text(config.read_text().replace("[server]\n", "[server]\nnope = 1\n"))
        served.signal(signal.SIGHUP)
        served.wait_for(r"configuration not loaded, everything kept.*\[server\] nope")
        assert served.proc.poll() is None
        assert send(served.port, "still-serving").startswith("250")
        assert served.stop() == 0
    finally:
        served.close()
        sink.stop()


# ---------------------------------------------------------------- SIGHUP: DKIM keys


class DkimWorld:
    def __init__(self, tmp_path: Path, database: DatabaseSettings) -> None:
        self.keys = tmp_path / "keys"
        self.keys.mkdir()
        self.key = generate_key("example.org", "fwd", self.keys, bits=1024)
        self.resolver = ZoneResolver(self.key.zone_lines() + "\n")
        self.dns = LoopbackDNSServer(self.resolver).start()
        self.sink = Sink()
        config = write_config(tmp_path, database, self.sink.port, "workers = 2", extra=f"""
[dkim]
keys = ["fwd._domainkey.example.org example.org:fwd:{self.key.path}"]
sign_forwarded_as = "example.org"
""")
        self.served = Serve(config)

    def publish(self, key: DkimKey) -> None:
        self.resolver.records = RR.fromZone(key.zone_lines() + "\n")

    def replace_key_file(self, pem: bytes) -> None:
        temp = self.keys / "fwd.private.new"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(temp, self.key.path)

    def forwarded_verdicts(self, tag: str) -> list[tuple[str, str]]:
        before = len(self.sink.envelopes)
        assert send(self.served.port, tag).startswith("250")
        return mail_dkim_verify(self.sink.envelopes[before][2], self.dns.port)

    def close(self) -> None:
        self.served.close()
        self.sink.stop()
        self.dns.stop()


@pytest.fixture
def dkim_world(tmp_path: Path, database: DatabaseSettings) -> Iterator[DkimWorld]:
    world = DkimWorld(tmp_path, database)
    yield world
    world.close()


def test_sighup_signs_with_a_rotated_dkim_key(dkim_world: DkimWorld, tmp_path: Path) -> None:
    world = dkim_world
    assert world.forwarded_verdicts("before") == [("pass", "example.org")]
    rotated = generate_key("example.org", "fwd", tmp_path, bits=1024)  # same selector, new key
    world.replace_key_file(rotated.private_pem)
    world.publish(rotated)  # only the new key is published now: the old one would fail

    world.served.signal(signal.SIGHUP)
    lines = reloads(world.served, 2, "DKIM/ARC keys and tables reloaded")
    assert len(reload_pids(world.served, lines)) == 2  # both workers
    for n in range(4):  # whichever worker takes it
        assert world.forwarded_verdicts(f"after-{n}") == [("pass", "example.org")]
    assert world.served.proc.poll() is None


def test_sighup_keeps_the_old_dkim_key_when_the_new_file_is_broken(
        dkim_world: DkimWorld) -> None:
    world = dkim_world
    world.replace_key_file(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")

    world.served.signal(signal.SIGHUP)
    lines = reloads(world.served, 2, "DKIM/ARC kept the old keys")
    assert all(str(world.key.path) in line.group(0) for line in lines), lines  # and why
    assert world.served.proc.poll() is None
    for n in range(4):
        assert world.forwarded_verdicts(f"kept-{n}") == [("pass", "example.org")]
    for pid in world.served.workers().values():
        assert alive(pid)
