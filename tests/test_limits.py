"""``[limits]`` rates over real sockets: the exact replies, mynetworks exempt, every refusal
logged and counted; with the in-process store and with the real Redis; and what a Redis
that goes away and comes back does under ``fail_open`` and ``fail_closed``.

Helpers here (:func:`attach_abuse`, :func:`session`, :func:`message`) serve the other
issue-15 test modules too.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mailforward.config import DatabaseSettings, LimitsSettings
from mailforward.smtpd.abuse import AbuseChecks, BanCache
from mailforward.state import Store
from mailforward.state.memory import MemoryStore
from mailforward.state.redis import RETRY_INTERVAL, RedisStore

from smtp_harness import RawClient, ServerThread, wait_until
from test_state import REDIS_URL, delete_prefix, redis_prefix

SENDER = "sender@ext.test"


# ---------------------------------------------------------------- helpers (shared)


def attach_abuse(server: ServerThread, limits: LimitsSettings, store: Store | None = None,
                 bans: BanCache | None = None) -> AbuseChecks:
    """Give ``server``'s handler the checks, made in the server's own event loop."""
    async def make() -> AbuseChecks:
        checks = AbuseChecks(limits, store if store is not None else MemoryStore(), bans,
                             delimiter=server.settings.server.recipient_delimiter)
        await checks.start()
        return checks
    checks = server.loops.run(make())
    server.server.handler.abuse = checks
    return checks


def detach_abuse(server: ServerThread) -> None:
    checks = server.server.handler.abuse
    if checks is not None:
        server.server.handler.abuse = None
        server.loops.run(checks.close())


def message(message_id: str | None = "<m1@ext.test>", body: str = "probe body") -> str:
    """A message (DATA text, no final dot) with a From header and optionally a Message-ID."""
    head = f"From: <{SENDER}>\r\nTo: <alice@example.org>\r\nSubject: probe\r\n"
    if message_id is not None:
        head += f"Message-ID: {message_id}\r\n"
    return f"{head}\r\n{body}\r\n"


class session:  # noqa: N801  (used like a function: ``with session(server) as c``)
    """A greeted RawClient; ``source`` picks the client address (127.0.0.x)."""

    def __init__(self, server: ServerThread | Any, source: str | None = None) -> None:
        self.client = RawClient(server.host, server.port, source=source)
        self.greeting = self.client.read_reply()
        if self.greeting.startswith("220"):
            self.client.command("EHLO client.test")

    def __enter__(self) -> RawClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.command("QUIT")
        except OSError:
            pass
        self.client.close()


def send_data(client: RawClient, content: str) -> str:
    assert client.command("DATA").startswith("354")
    return client.command(content + ".")


def refusals(stage: str, reason: str) -> float:
    return REGISTRY.get_sample_value("mailforward_refusals_total",
                                     {"stage": stage, "reason": reason}) or 0.0


def store_errors(check: str) -> float:
    return REGISTRY.get_sample_value("mailforward_limits_store_errors_total",
                                     {"check": check}) or 0.0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    prefix = redis_prefix()
    yield RedisStore.from_url(REDIS_URL, prefix, 2.0)
    delete_prefix(prefix)


@pytest.fixture
def server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    running = ServerThread(seeded_database, recipient_delimiter="+",
                           client_connection_rate_limit=100_000)  # tests poll by connecting
    yield running
    detach_abuse(running)
    running.close()


# ---------------------------------------------------------------- the four rates


def test_client_message_rate_limit(server: ServerThread, store: Store,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    attach_abuse(server, LimitsSettings(client_message_rate_limit=3), store)
    before = refusals("MAIL", "client_message_rate")
    with session(server) as c:
        for _ in range(3):
            assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
            assert c.command("RSET").startswith("250")
        assert c.command(f"MAIL FROM:<{SENDER}>") == "450 4.7.1 Error: too much mail from 127.0.0.1"
        assert c.command("MAIL FROM:<>") == "450 4.7.1 Error: too much mail from 127.0.0.1"
    with session(server, source="127.0.0.2") as c:  # another client has its own count
        assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert refusals("MAIL", "client_message_rate") == before + 2
    assert "reason=client_message_rate" in caplog.text
    assert "NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 450 4.7.1" in caplog.text


def test_client_recipient_rate_limit(server: ServerThread, store: Store) -> None:
    attach_abuse(server, LimitsSettings(client_recipient_rate_limit=2), store)
    before = refusals("RCPT", "client_recipient_rate")
    with session(server) as c:
        c.command(f"MAIL FROM:<{SENDER}>")
        assert c.command("RCPT TO:<alice@example.org>").startswith("250")
        assert c.command("RCPT TO:<multi@example.org>").startswith("250")
        assert (c.command("RCPT TO:<bob@forward.test>")
                == "450 4.7.1 Error: too many recipients from 127.0.0.1")
        assert c.command("DATA").startswith("354")  # the two accepted ones still go
        assert c.command(message() + ".").startswith("250")
    assert refusals("RCPT", "client_recipient_rate") == before + 1
    assert server.messages[-1].recipients == ("alice.dest@sink.test", "a@sink.test", "b@sink2.test")


def test_sender_message_rate_limit_counts_across_clients(server: ServerThread, store: Store) -> None:
    attach_abuse(server, LimitsSettings(sender_message_rate_limit=2), store)
    before = refusals("MAIL", "sender_message_rate")
    for source in ("127.0.0.1", "127.0.0.2"):
        with session(server, source=source) as c:
            assert c.command("MAIL FROM:<Sender@EXT.test>").startswith("250")
    with session(server, source="127.0.0.3") as c:
        assert c.command(f"MAIL FROM:<{SENDER}>") == (
            "450 4.7.1 <sender@ext.test>: Sender address rejected: too much mail from this sender")
        assert c.command("MAIL FROM:<other@ext.test>").startswith("250")  # others are not
        c.command("RSET")
        for _ in range(3):  # the null sender (bounces) is never limited by sender
            assert c.command("MAIL FROM:<>").startswith("250")
            c.command("RSET")
    assert refusals("MAIL", "sender_message_rate") == before + 1


def test_alias_message_rate_limit(server: ServerThread, store: Store) -> None:
    attach_abuse(server, LimitsSettings(alias_message_rate_limit=2), store)
    before = refusals("RCPT", "alias_message_rate")
    with session(server) as c:
        c.command(f"MAIL FROM:<{SENDER}>")
        assert c.command("RCPT TO:<alice@example.org>").startswith("250")
        c.command("RSET")
        c.command(f"MAIL FROM:<{SENDER}>")
        assert c.command("RCPT TO:<alice+news@example.org>").startswith("250")  # the same alias
        c.command("RSET")
        c.command(f"MAIL FROM:<{SENDER}>")
        assert c.command("RCPT TO:<Alice@example.org>") == (
            "452 4.7.1 <Alice@example.org>: Recipient address rejected: too much mail for this "
            "recipient, try again later")
        assert c.command("RCPT TO:<multi@example.org>").startswith("250")  # other aliases go on
        assert send_data(c, message()).startswith("250")
    assert refusals("RCPT", "alias_message_rate") == before + 1
    assert server.messages[-1].recipients == ("a@sink.test", "b@sink2.test")


def test_windows_of_one_command_are_admitted_together(server: ServerThread, store: Store) -> None:
    """A MAIL refused for its sender's rate does not use up the client's."""
    attach_abuse(server, LimitsSettings(client_message_rate_limit=3, sender_message_rate_limit=1),
                 store)
    with session(server) as c:
        assert c.command("MAIL FROM:<a@ext.test>").startswith("250")
        c.command("RSET")
        for _ in range(3):
            assert c.command("MAIL FROM:<a@ext.test>").startswith("450 4.7.1 <a@ext.test>")
        for sender in ("b@ext.test", "c@ext.test"):
            assert c.command(f"MAIL FROM:<{sender}>").startswith("250")
            c.command("RSET")
        assert c.command("MAIL FROM:<d@ext.test>") == "450 4.7.1 Error: too much mail from 127.0.0.1"


def test_limits_apply_again_when_the_window_has_slid(server: ServerThread) -> None:
    attach_abuse(server, LimitsSettings(client_message_rate_limit=1, time_unit=0.5))
    with session(server) as c:
        assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        c.command("RSET")
        assert c.command(f"MAIL FROM:<{SENDER}>").startswith("450")
    started = time.monotonic()

    def admitted() -> bool:
        with session(server) as c:
            return c.command(f"MAIL FROM:<{SENDER}>").startswith("250")

    wait_until(admitted, 5, interval=0.05)
    assert 0.2 < time.monotonic() - started < 1.5


def test_mynetworks_clients_are_exempt_from_every_rate(seeded_database: DatabaseSettings) -> None:
    running = ServerThread(seeded_database, mynetworks=("127.0.0.0/8",))
    try:
        attach_abuse(running, LimitsSettings(client_message_rate_limit=1,
                                             client_recipient_rate_limit=1,
                                             sender_message_rate_limit=1,
                                             alias_message_rate_limit=1))
        with session(running) as c:
            for _ in range(4):
                assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
                assert c.command("RCPT TO:<alice@example.org>").startswith("250")
                assert c.command("RCPT TO:<multi@example.org>").startswith("250")
                c.command("RSET")
    finally:
        detach_abuse(running)
        running.close()


def test_no_limit_by_default(server: ServerThread) -> None:
    attach_abuse(server, LimitsSettings())
    with session(server) as c:
        for _ in range(30):
            assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
            assert c.command("RCPT TO:<alice@example.org>").startswith("250")
            c.command("RSET")


# ---------------------------------------------------------------- an unreachable store


def unreachable_redis(**limits: Any) -> tuple[LimitsSettings, RedisStore]:
    settings = LimitsSettings(redis_url="unix:///nonexistent/mf.sock", redis_timeout=0.3,
                              **limits)
    return settings, RedisStore.from_url(settings.redis_url, "p:", settings.redis_timeout)


def test_fail_open_accepts_and_forwards_when_redis_is_unreachable(
        server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    limits, redis_store = unreachable_redis(client_message_rate_limit=1)
    attach_abuse(server, limits, redis_store)
    before = store_errors("rate")
    for _ in range(3):
        with session(server) as c:
            started = time.monotonic()
            assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
            assert time.monotonic() - started < 0.5
            c.command("RCPT TO:<alice@example.org>")
            assert send_data(c, message()).startswith("250")  # no duplicate check either
    assert len(server.messages) == 3
    assert store_errors("rate") >= before + 3
    assert caplog.text.count("limits store unavailable") == 1  # once per outage


def test_fail_closed_answers_451_when_redis_is_unreachable(server: ServerThread) -> None:
    limits, redis_store = unreachable_redis(client_message_rate_limit=1,
                                            redis_failure="fail_closed")
    attach_abuse(server, limits, redis_store)
    before = refusals("MAIL", "limits_unavailable")
    with session(server) as c:
        assert c.command(f"MAIL FROM:<{SENDER}>") == "451 4.3.0 Temporary lookup failure"
    assert refusals("MAIL", "limits_unavailable") == before + 1


def test_fail_closed_duplicate_check_answers_451_at_end_of_data(server: ServerThread) -> None:
    limits, redis_store = unreachable_redis(redis_failure="fail_closed")  # no rates: MAIL goes
    attach_abuse(server, limits, redis_store)
    with session(server) as c:
        assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert c.command("RCPT TO:<alice@example.org>").startswith("250")
        assert send_data(c, message()) == "451 4.3.0 Temporary lookup failure"
    assert server.messages == []


# ---------------------------------------------------------------- Redis stopped mid-test


class OwnRedis:
    """A redis-server of this test's own on a Unix socket (no TCP), stopped by its PID."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / f"redis-{uuid.uuid4().hex[:8]}.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._answers(), 10, what="redis-server answering on its socket")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        result = subprocess.run(["redis-cli", "-s", str(self.socket), "ping"],
                                capture_output=True, text=True, timeout=5)
        return result.stdout.strip() == "PONG"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by PID
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    # A short directory: a Unix socket path must fit in 107 bytes.
    directory = Path(f"/tmp/mf-redis-{uuid.uuid4().hex[:8]}")
    directory.mkdir()
    running = OwnRedis(directory)
    running.start()
    yield running
    running.kill()
    running.socket.unlink(missing_ok=True)
    directory.rmdir()


@pytest.mark.parametrize("failure", ["fail_open", "fail_closed"])
def test_redis_stopped_mid_test_then_back(server: ServerThread, own_redis: OwnRedis,
                                          failure: str) -> None:
    limits = LimitsSettings(redis_url=own_redis.url, redis_failure=failure, redis_timeout=0.5,
                            client_message_rate_limit=100)
    attach_abuse(server, limits, RedisStore.from_url(own_redis.url, "t:", limits.redis_timeout))

    def deliver(message_id: str) -> str:
        with session(server) as c:
            reply = c.command(f"MAIL FROM:<{SENDER}>")
            if not reply.startswith("250"):
                return reply
            c.command("RCPT TO:<alice@example.org>")
            return send_data(c, message(message_id))

    assert deliver("<before@ext.test>").startswith("250")
    assert deliver("<before@ext.test>").startswith("250")  # a retry: suppressed
    assert len(server.messages) == 1

    own_redis.kill()
    started = time.monotonic()
    reply = deliver("<during@ext.test>")
    assert time.monotonic() - started < 2  # never a hang
    if failure == "fail_open":
        assert reply.startswith("250")
        assert deliver("<during@ext.test>").startswith("250")  # no duplicate cache: forwarded
        assert len(server.messages) == 3
    else:
        assert reply == "451 4.3.0 Temporary lookup failure"
        assert len(server.messages) == 1

    own_redis.start()

    def recovered() -> bool:
        """A message and its retry: forwarded once (the store answers again)."""
        count, message_id = len(server.messages), f"<after-{uuid.uuid4().hex}@ext.test>"
        replies = [deliver(message_id), deliver(message_id)]
        return replies[1].startswith("250") and len(server.messages) == count + 1

    wait_until(recovered, 10 + RETRY_INTERVAL, what="recovery once Redis is back",
               interval=0.1)


# ---------------------------------------------------------------- settings


def test_limits_settings_from_toml_and_environment(tmp_path: Path) -> None:
    from mailforward.config import load_settings

    config = tmp_path / "mailforward.toml"
    config.write_text('[limits]\nclient_message_rate_limit = 30\nredis_url = "redis://r:6379/1"\n')
    settings = load_settings(config, {"MAILFORWARD_LIMITS__REDIS_FAILURE": "fail_closed",
                                      "MAILFORWARD_LIMITS__REDIS_SENTINELS": "a:26379, b",
                                      "MAILFORWARD_LIMITS__REDIS_SENTINEL_MASTER": "m"})
    limits = settings.limits
    assert (limits.client_message_rate_limit, limits.redis_failure) == (30, "fail_closed")
    assert limits.sentinel_addresses() == [("a", 26379), ("b", 26379)]
    assert limits.shared and not LimitsSettings().shared
    assert (LimitsSettings().time_unit, LimitsSettings().duplicate_window) == (60.0, 86400.0)


@pytest.mark.parametrize("values, message", [
    ({"client_message_rate_limit": -1}, "[limits] client_message_rate_limit: must not be negative"),
    ({"time_unit": 0}, "[limits] time_unit: must be greater than zero"),
    ({"redis_failure": "retry"}, '[limits] redis_failure: "fail_open" or "fail_closed"'),
    ({"redis_url": "http://x"}, "[limits] redis_url: write redis://"),
    ({"redis_sentinels": ["a:1"]}, "set both or neither"),
    ({"redis_timeout": 0}, "[limits] redis_timeout: must be greater than zero"),
    ({"sender_limit": 1}, "[limits] sender_limit: unknown key"),
])
def test_limits_settings_are_validated(values: dict[str, Any], message: str) -> None:
    from mailforward.config import build_settings
    from mailforward.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        build_settings({"limits": values})
    assert message in str(raised.value)
