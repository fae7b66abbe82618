"""``[server] workers``: a supervisor and worker processes, checked from outside.

Every test runs ``mailforward serve`` as a subprocess on 127.0.0.1:0 and
reads the port from its ``listening on HOST:PORT`` line.  Waiting is always
polling with a deadline, on the log or on what a sink received.  The
helpers here are used by ``test_signals.py`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailforward.config import DatabaseSettings
from mailforward.delivery.base import Message, new_queue_id
from mailforward.delivery.spool import Spool

from conftest import seed_reference_data
from smtp_harness import Sink as HarnessSink

T = TypeVar("T")
HOSTNAME = "mail.example.com"
DEADLINE = 30.0


# ---------------------------------------------------------------- helpers


def wait_until(check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``check`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class Sink(HarnessSink):
    """The shared test sink (port 0), counting what reaches DATA.

    With ``gated`` set, DATA is answered only after :meth:`release` (the
    message is complete at the sink, the answer is held back).
    """

    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self.data_started = 0
        self.start()
        assert self._loops is not None
        self._gate: asyncio.Event = self._loops.run(_new_event())

    @property
    def envelopes(self) -> list[tuple[str, list[str], bytes]]:
        return [(a.mail_from, a.rcpt_tos, a.content) for a in list(self.arrivals)]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_started += 1
        if self.gated:
            await self._gate.wait()
        return await super().handle_DATA(server, session, envelope)

    def release(self) -> None:
        if self._loops is not None:
            self._loops.loop.call_soon_threadsafe(self._gate.set)

    def stop(self) -> None:
        self.release()
        super().stop()


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


class Client:
    """SMTP by hand over one socket."""

    def __init__(self, port: int, timeout: float = DEADLINE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """The last line of the next reply, or "(closed)"."""
        while True:
            line = self.file.readline()
            if not line:
                return "(closed)"
            text = line.decode("latin-1").rstrip("\r\n")
            if len(text) < 4 or text[3] != "-":
                return text

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def message(tag: str) -> bytes:
    return (f"From: Sender <sender@ext.test>\r\nTo: alice@example.org\r\nSubject: {tag}\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@ext.test>\r\n"
            f"\r\nbody of {tag}\r\n").encode()


def send(port: int, tag: str, rcpt: str = "alice@example.org") -> str:
    """One message through the server; the reply to its final dot."""
    client = Client(port)
    try:
        assert client.reply().startswith("220")
        assert client.command("EHLO client.ext.test").startswith("250")
        assert client.command("MAIL FROM:<sender@ext.test>").startswith("250")
        assert client.command(f"RCPT TO:<{rcpt}>").startswith("250")
        assert client.command("DATA").startswith("354")
        client.sock.sendall(message(tag) + b".\r\n")
        answer = client.reply()
        client.command("QUIT")
        return answer
    finally:
        client.close()


class Serve:
    """``mailforward serve`` as a subprocess, its log in a file."""

    def __init__(self, config: Path) -> None:
        self.log = config.with_suffix(".log")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        found = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.port = int(found[0].group(1))

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def find(self, pattern: str) -> list[re.Match[str]]:
        return list(re.finditer(pattern, self.text()))

    def wait_for(self, pattern: str, count: int = 1,
                 timeout: float = DEADLINE) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the log (fails if serve exits first)."""
        def found() -> list[re.Match[str]] | None:
            matches = self.find(pattern)
            if len(matches) >= count:
                return matches[:count]
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.text()}")
            return None
        try:
            return wait_until(found, f"{count} x {pattern!r} in the log", timeout)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; the log:\n{self.text()[-4000:]}") from None

    def workers(self) -> dict[int, int]:
        """Worker index -> pid, as last started."""
        return {int(m.group(1)): int(m.group(2))
                for m in self.find(r"worker (\d+) started \(pid (\d+)\)")}

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.workers().values():  # never leave a worker behind, even on failure
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def write_config(directory: Path, database: DatabaseSettings, sink_port: int,
                 extra_server: str = "", extra: str = "", extra_database: str = "") -> Path:
    config = directory / "mf.toml"
    config.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:0"]
{extra_server}
[database]
url = "{database.url}"
{extra_database}
[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
spool_directory = "{directory / 'spool'}"
[auth]
verify = false
{extra}
""")
    return config


def spooled_files(directory: Path) -> list[str]:
    spool = directory / "spool"
    return [p.name for p in spool.iterdir() if p.is_file() and re.fullmatch(r"[0-9A-F]+", p.name)]


@pytest.fixture
def database(tmp_path: Path) -> DatabaseSettings:
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path / 'mf.db'}")
    asyncio.run(seed_reference_data(settings))
    return settings


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    sink.stop()


def start(tmp_path: Path, database: DatabaseSettings, sink: Sink, server: str) -> Serve:
    return Serve(write_config(tmp_path, database, sink.port, server))


# ---------------------------------------------------------------- tests


def test_a_killed_worker_is_replaced_and_sigterm_stops_everything(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:
    served = start(tmp_path, database, sink, "workers = 2")
    try:
        first = served.workers()
        assert sorted(first) == [0, 1] and served.pid not in first.values()
        os.kill(first[0], signal.SIGKILL)  # worker 0 also owns the retry scheduler
        served.wait_for(rf"worker 0 \(pid {first[0]}\) killed by SIGKILL; restarting it")
        replacement = int(served.wait_for(r"worker 0 started \(pid (\d+)\)", count=2)[1].group(1))
        assert replacement != first[0]
        served.wait_for(rf"worker 0 \(pid {replacement}\) ready")
        served.wait_for(rf"\[{replacement}\]: .*retry scheduler started")
        for n in range(6):  # whichever worker accepts, the server answers
            assert send(served.port, f"after-kill-{n}").startswith("250")
        assert len(sink.envelopes) == 6

        served.signal(signal.SIGTERM)
        assert served.proc.wait(DEADLINE) == 0
        for pid in (*first.values(), replacement):
            assert not alive(pid), f"worker pid {pid} left behind"
        assert served.find(rf"\[{served.pid}\]: .*stopped")
    finally:
        served.close()


def test_connection_limits_hold_across_workers(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:
    served = start(tmp_path, database, sink,
                   "workers = 2\nclient_connection_count_limit = 3")
    admitted: list[Client] = []
    try:
        for _ in range(3):
            admitted.append(Client(served.port))
            assert admitted[-1].reply().startswith("220 ")
        # With per-worker counting some of these would land on a worker holding fewer than 3.
        for _ in range(6):
            extra = Client(served.port)
            assert extra.reply() == (f"421 4.7.0 {HOSTNAME} Error: too many connections "
                                     "from 127.0.0.1")
            extra.close()
        admitted.pop().close()

        def one_more() -> Client | None:  # the disconnect reaches the supervisor soon after
            client = Client(served.port)
            if client.reply().startswith("220 "):
                return client
            client.close()
            return None
        admitted.append(wait_until(one_more, "a connection admitted after one closed"))
    finally:
        for client in admitted:
            client.close()
        served.close()


def test_a_dead_workers_connections_are_released(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:
    served = start(tmp_path, database, sink,
                   "workers = 2\nclient_connection_count_limit = 3")
    held = [Client(served.port) for _ in range(3)]
    try:
        assert all(client.reply().startswith("220 ") for client in held)
        before = served.workers()
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: all(pid not in before.values() for pid in served.workers().values()),
                   "both workers replaced")
        for pid in served.workers().values():
            served.wait_for(rf"\(pid {pid}\) ready")
        assert all(client.reply() == "(closed)" for client in held)
        fresh = [Client(served.port) for _ in range(3)]
        try:
            assert all(client.reply().startswith("220 ") for client in fresh)
        finally:
            for client in fresh:
                client.close()
    finally:
        for client in held:
            client.close()
        served.close()


def test_spooled_mail_is_retried_by_one_process_only(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:
    spool = Spool(tmp_path / "spool")
    now = time.time()
    ids = []
    for n in range(5):
        queue_id = new_queue_id()
        ids.append(queue_id)
        spool.put(Message(queue_id, "sender@ext.test", ("dest@sink.test",), message(f"due-{n}")),
                  ["dest@sink.test"], now - 600, next_attempt=now)
    served = start(tmp_path, database, sink, "workers = 2")
    try:
        wait_until(lambda: len(sink.envelopes) >= 5 and not spooled_files(tmp_path),
                   "the 5 due messages delivered and removed from the spool")
        served.signal(signal.SIGTERM)
        assert served.proc.wait(DEADLINE) == 0  # every process gone: nothing more can arrive
    finally:
        served.close()
    subjects = sorted(re.search(rb"Subject: (\S+)", content)[1]  # type: ignore[index]
                      for _, _, content in sink.envelopes)
    assert subjects == [f"due-{n}".encode() for n in range(5)]  # each exactly once
    assert len(served.find(r"retry scheduler started")) == 1
    removed = served.find(r"\[(\d+)\]: .*?([0-9A-F]+): removed")
    assert sorted(m.group(2) for m in removed) == sorted(ids)
    assert {m.group(1) for m in removed} == {str(served.workers()[0])}


# ---------------------------------------------------------------- [limits] across workers


@contextlib.contextmanager
def only_worker(served: Serve, index: int) -> Iterator[int]:
    """Every connection meanwhile goes to worker ``index`` (its pid is yielded): the others
    are stopped (SIGSTOP) and accept nothing; the one accept queue is theirs again after."""
    pids = served.workers()
    others = [pid for i, pid in pids.items() if i != index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        for pid in others:
            wait_until(lambda pid=pid: state(pid) == "T", f"worker pid {pid} stopped")
        yield pids[index]
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def attempt(port: int, tag: str) -> str:
    """One message over a new connection: the refusal of MAIL, else the reply to the dot."""
    client = Client(port)
    try:
        assert client.reply().startswith("220")
        assert client.command("EHLO client.ext.test").startswith("250")
        answer = client.command("MAIL FROM:<sender@ext.test>")
        if answer.startswith("250"):
            assert client.command("RCPT TO:<alice@example.org>").startswith("250")
            assert client.command("DATA").startswith("354")
            client.sock.sendall(message(tag) + b".\r\n")
            answer = client.reply()
        client.command("QUIT")
        return answer
    finally:
        client.close()


def test_sender_rate_limit_is_exact_across_workers(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:
    served = Serve(write_config(tmp_path, database, sink.port, "workers = 2",
                                "[limits]\nsender_message_rate_limit = 5\ntime_unit = 3600"))
    try:
        answers: dict[str, list[str]] = {}
        with only_worker(served, 0) as first:  # 3 of the sender's messages through worker 0
            answers[str(first)] = [attempt(served.port, f"rate-{n}") for n in range(3)]
        with only_worker(served, 1) as second:  # then 5 through worker 1, which saw none
            answers[str(second)] = [attempt(served.port, f"rate-{n}") for n in range(3, 8)]
        replies = [*answers[str(first)], *answers[str(second)]]
        assert [r[:3] for r in replies] == ["250"] * 5 + ["450"] * 3, replies
        assert replies[-1].startswith("450 4.7.1 <sender@ext.test>: Sender address rejected")
        assert len(sink.envelopes) == 5
        # each worker answered the ones sent while it was the only one accepting
        for pid, count in ((first, 3), (second, 5)):
            assert len(served.find(rf"\[{pid}\]: .*client=unknown\[127\.0\.0\.1\]")) \
                + len(served.find(rf"\[{pid}\]: NOQUEUE: reject: MAIL")) == count
        assert len(served.find(r"limits: counters in the supervisor \(shared by this node.s workers\), "
                               r"duplicate cache in memory shared")) == 2
    finally:
        served.close()


def test_a_retry_through_the_other_worker_is_suppressed(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:
    served = start(tmp_path, database, sink, "workers = 2")
    try:
        with only_worker(served, 0):
            assert send(served.port, "retried").startswith("250")
        assert len(sink.envelopes) == 1
        with only_worker(served, 1) as second:  # the sender's retry, after our 250 was lost
            assert send(served.port, "retried").startswith("250")
            served.wait_for(rf"\[{second}\]: .*duplicate of a message already delivered")
            assert send(served.port, "another").startswith("250")  # worker 1 does forward
        assert len(sink.envelopes) == 2
        subjects = [re.search(rb"Subject: (\S+)", content)[1]  # type: ignore[index]
                    for _, _, content in sink.envelopes]
        assert subjects == [b"retried", b"another"]
    finally:
        served.close()
