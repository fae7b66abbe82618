"""The duplicate question asked early: put to the store as soon as the message is complete,
answered right before delivery (``AbuseChecks.ask_duplicates`` / ``deliver_once``).

Over real loopback SMTP: a retry is still suppressed (in-process store, Redis, the
supervisor's shared store, and ``mailforward serve`` with DKIM signing and ARC sealing);
a message refused with the question outstanding leaves nothing pending; a store that goes
down mid-question is ``fail_open`` / ``fail_closed`` as before.  And the key itself: the
same whether made of the message as received or as we deliver it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence

import pytest

from mailforward.auth.verify import strip_forged_results
from mailforward.config import DatabaseSettings, LimitsSettings
from mailforward.delivery.base import Message
from mailforward.smtpd import replies
from mailforward.smtpd.abuse import AbuseChecks, duplicate_keys
from mailforward.state import Store, StoreUnavailable, Window
from mailforward.state.memory import MemoryStore
from mailforward.state.redis import RedisStore
from mailforward.state.shared import SocketStore

from smtp_harness import HOSTNAME, ServerThread, wait_until
from test_auth_e2e import World, world  # noqa: F401  (the fixture)
from test_auth_e2e import message as signed_message
from test_limits import attach_abuse, detach_abuse, message, send_data, session, store_errors
from test_state import REDIS_URL, Supervisor, delete_prefix, redis_prefix

SENDER = "sender@ext.test"
ALIAS, DESTINATION = "alice@example.org", "alice.dest@sink.test"
BIG_BODY = "x" * 300_000  # above HASH_IN_THREAD: hashed off the loop before the question


def unique_id() -> str:
    return f"<{uuid.uuid4().hex}@ext.test>"


def send(server: ServerThread, content: str) -> str:
    with session(server) as c:
        assert c.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert c.command(f"RCPT TO:<{ALIAS}>").startswith("250")
        return send_data(c, content)


class Recording(MemoryStore):
    """The in-process store, noting the keys it is asked about and told to remember."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []
        self.remembered: list[list[str]] = []

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        self.asked.append(list(keys))
        return super().ask_seen(keys)

    async def seen(self, keys: Sequence[str]) -> set[str]:  # a big body's question
        self.asked.append(list(keys))
        return await super().seen(keys)

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        self.remembered.append(list(keys))
        await super().remember(keys, ttl)


@pytest.fixture
def server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    running = ServerThread(seeded_database, client_connection_rate_limit=100_000)
    yield running
    detach_abuse(running)
    running.close()


# ---------------------------------------------------------------- a retry is still suppressed


@pytest.fixture(params=["memory", "redis", "shared"])
def any_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each store, the supervisor's reached over a real channel (``state/shared.py``)."""
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "redis":
        prefix = redis_prefix()
        yield RedisStore.from_url(REDIS_URL, prefix, 2.0)
        delete_prefix(prefix)
    else:
        supervisor = Supervisor()
        yield supervisor.worker()
        supervisor.stop()


@pytest.mark.parametrize("body", ["probe body", BIG_BODY], ids=["small", "big"])
def test_a_retry_is_suppressed_with_the_early_question(server: ServerThread, any_store: Store,
                                                       body: str) -> None:
    attach_abuse(server, LimitsSettings(), any_store)
    content = message(unique_id(), body)
    for _ in range(3):  # the first question of a SocketStore connects it; the others do not
        assert send(server, content).startswith("250 2.0.0 Ok: queued as ")
    assert len(server.messages) == 1
    assert send(server, message(unique_id(), body)).startswith("250")  # another message
    assert len(server.messages) == 2


@pytest.mark.parametrize("body", ["probe body", BIG_BODY], ids=["small", "big"])
def test_the_key_asked_early_is_the_key_remembered_and_that_of_the_delivered_message(
        server: ServerThread, body: str) -> None:
    recording = Recording()
    attach_abuse(server, LimitsSettings(), recording)
    assert send(server, message(unique_id(), body)).startswith("250")
    (delivered,) = server.messages
    assert delivered.content.startswith(b"Received: ")  # ours, added after the question
    keys = server.loops.run(duplicate_keys(delivered))
    assert recording.asked == recording.remembered == [list(keys.values())]


async def test_a_connected_socket_store_writes_the_question_at_once() -> None:
    supervisor = Supervisor()
    store = supervisor.worker()
    try:
        first = store.ask_seen(["k"])
        assert isinstance(first, asyncio.Task)  # connecting first: a coroutine, so a task
        assert await first == set()
        await store.remember(["k"], 60.0)
        answer = store.ask_seen(["k", "other"])
        assert not isinstance(answer, asyncio.Task)  # written: the future of its answer
        assert await answer == {"k"}
    finally:
        await store.close()
        supervisor.stop()


# ---------------------------------------------------------------- refused with the question out


class Unanswered(Store):
    """A store that never answers ``seen``: its question stays outstanding (a task)."""

    def __init__(self) -> None:
        self.answers: list[asyncio.Future[set[str]]] = []

    async def admit(self, windows: Sequence[Window]) -> int | None:
        return None

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        self.answers.append(super().ask_seen(keys))
        return self.answers[-1]

    async def seen(self, keys: Sequence[str]) -> set[str]:
        await asyncio.Event().wait()
        return set()

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        pass

    async def close(self) -> None:
        pass


class Failed(Unanswered):
    """A store whose answer is already a failure when the message is refused (and that
    keeps no reference to it: an exception never retrieved is logged when it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def ask_seen(self, keys: Sequence[str]) -> asyncio.Future[set[str]]:
        self.asked += 1
        answer: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        answer.set_exception(StoreUnavailable("gone"))
        return answer


class Silent:
    """A supervisor end that reads the worker's questions and never answers."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.questions: list[dict[str, object]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self.ours.makefile("rb") as lines:
            for line in lines:
                self.questions.append(json.loads(line))

    def close(self) -> None:
        self.ours.shutdown(socket.SHUT_RDWR)
        self.ours.close()
        self.thread.join(5)


def outstanding_store_tasks(server: ServerThread) -> list[str]:
    """The server loop's tasks still running a store's ``seen`` (after a turn of the loop)."""
    async def tasks() -> list[str]:
        await asyncio.sleep(0.05)
        return [repr(t) for t in asyncio.all_tasks() if "seen" in repr(t.get_coro())]
    return server.loops.run(tasks())


@pytest.mark.parametrize("kind", ["task", "failed", "socket"])
def test_a_message_refused_with_the_question_outstanding_leaves_nothing_pending(
        server: ServerThread, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    silent = Silent() if kind == "socket" else None
    store: Store = (Unanswered() if kind == "task" else Failed() if kind == "failed"
                    else SocketStore(silent.theirs, timeout=0.3) if silent is not None
                    else MemoryStore())
    attach_abuse(server, LimitsSettings(), store)
    if isinstance(store, SocketStore):  # connected, so its question is written at once
        server.loops.run(store.remember(["warm-up"], 1.0))
    spoofed = message(unique_id()).replace(f"From: <{SENDER}>", "From: <postmaster@example.org>")
    try:
        for _ in range(3):
            assert send(server, spoofed) == str(replies.own_domain_unauthenticated("example.org"))
        assert server.messages == []
        assert outstanding_store_tasks(server) == []
        if isinstance(store, Failed):
            assert store.asked == 3
        elif isinstance(store, Unanswered):  # asked early, then the answer was not wanted
            assert [answer.cancelled() for answer in store.answers] == [True] * 3
        if silent is not None:
            wait_until(lambda: len(silent.questions) == 4, 5, what="the three questions")
            assert [q["op"] for q in silent.questions] == ["remember"] + ["seen"] * 3
            assert isinstance(store, SocketStore)  # each answer's future was cancelled
            assert [answer.cancelled() for answer, _ in store._waiting] == [True] * 3
        server.loops.run(asyncio.sleep(0.5))  # past the SocketStore's timeout
        gc.collect()
        assert "never retrieved" not in caplog.text
        assert "destroyed but it is pending" not in caplog.text
    finally:
        if silent is not None:
            silent.close()


# ---------------------------------------------------------------- store down mid-question


class Dying(Silent):
    """A supervisor end that answers until :attr:`dead`, then closes at the next question
    (it died with the question unanswered); ``silent`` instead never answers again."""

    def __init__(self, silent: bool) -> None:
        self.dead = False
        self.silent = silent
        super().__init__()

    def _read(self) -> None:
        with self.ours.makefile("rb") as lines:
            for line in lines:
                self.questions.append(json.loads(line))
                if self.questions[-1]["op"] == "remember":  # told, not asked
                    continue
                if not self.dead:
                    self.ours.sendall(b'{"seen":[]}\n')
                elif not self.silent:
                    self.ours.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        try:
            self.ours.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ours.close()
        self.thread.join(5)


@pytest.mark.parametrize("how", ["dies", "silent"])
@pytest.mark.parametrize("failure", ["fail_open", "fail_closed"])
def test_the_store_going_down_mid_question(server: ServerThread, failure: str, how: str) -> None:
    supervisor = Dying(silent=how == "silent")
    store = SocketStore(supervisor.theirs, timeout=0.5)
    attach_abuse(server, LimitsSettings(redis_failure=failure), store)
    try:
        assert send(server, message(unique_id())).startswith("250")  # connects the channel
        assert len(server.messages) == 1
        supervisor.dead = True
        before = store_errors("duplicates")
        reply = send(server, message(unique_id()))
        ops = [q["op"] for q in supervisor.questions]
        assert ops == ["seen", "remember", "seen"]  # the last one asked, never answered
        assert store_errors("duplicates") == before + 1
        if failure == "fail_open":
            assert reply.startswith("250 2.0.0 Ok: queued as ")
            assert len(server.messages) == 2
        else:
            assert reply == "451 4.3.0 Temporary lookup failure"
            assert len(server.messages) == 1
    finally:
        supervisor.close()


# ---------------------------------------------------------------- the key


RECEIVED = (f"Received: from client.test ([127.0.0.1])\r\n\tby {HOSTNAME} (mailforward) "
            "with ESMTP id 0123456789;\r\n\tTue, 24 Nov 2026 10:00:00 +0000\r\n").encode()
OURS = (RECEIVED,
        f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=ext.test\r\n".encode(),
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=fwd;\r\n"
        b"\th=from:to:subject:message-id; bh=AAAA; b=BBBB\r\n",
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.org; s=fwd; b=CCCC\r\n",
        b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\r\n"
        b"\ts=fwd; h=from:message-id; bh=AAAA; b=DDDD\r\n",
        f"ARC-Authentication-Results: i=1; {HOSTNAME}; spf=pass\r\n".encode())
"""The fields we add above a message, in the order we add them (each goes on top)."""


@pytest.mark.parametrize("received", [
    b"From: a@ext.test\r\nMessage-ID: <k@ext.test>\r\n\r\nbody\r\n",
    b"From: a@ext.test\nMessage-ID: <k@ext.test>\n\nbody with LF only\n",
    b"Message-ID:\r\n <folded@ext.test>\r\nFrom: a@ext.test\r\n\r\nbody\r\n",
    b"Message-ID  :  <obsolete@ext.test>\r\n\r\nbody\r\n",
    b"Message-ID: <first@ext.test>\r\nMessage-ID: <second@ext.test>\r\n\r\nbody\r\n",
    b" continued\r\nMessage-ID: <k@ext.test>\r\n\r\nbody\r\n",  # joins our field above it
    b"Message-ID: <no-body@ext.test>\r\n",
    b"Message-ID: <k@ext.test>\r\n\r\n",
    b"Message-ID: <k@ext.test>\r\n\r\n\r\nMessage-ID: <in-body@ext.test>\r\n",
    b"\r\nMessage-ID: <only-in-body@ext.test>\r\n",  # no header: no Message-ID
    f"Authentication-Results: {HOSTNAME}; dmarc=pass\r\n"  # forged: verification removes it
    "Message-ID: <forged-ar@ext.test>\r\n\r\nbody\r\n".encode(),
    b"Message-ID: <big@ext.test>\r\n\r\n" + b"y" * 300_000,
], ids=["crlf", "lf", "folded", "obsolete", "two-ids", "continuation", "no-body", "empty-body",
        "id-in-body", "no-header", "forged-results", "big"])
async def test_the_key_does_not_change_when_our_fields_are_prepended(received: bytes) -> None:
    recipients = ("a@dest.test", "B@Dest.test")
    original = await duplicate_keys(Message("Q", SENDER, recipients, received))
    delivered = RECEIVED + received
    delivered = strip_forged_results(delivered, HOSTNAME)
    for field in OURS[1:]:
        delivered = field + delivered
    assert await duplicate_keys(Message("Q2", "srs@fwd.test", recipients, delivered)) == original
    early = AbuseChecks(LimitsSettings(), Recording()).ask_duplicates(bytearray(received),
                                                                     recipients)
    if early is None:
        assert original == {}
    else:
        await early.delivered()
        assert early.keys == original != {}


def test_signed_sealed_and_verified_the_key_is_that_of_the_message_received(
        world: World) -> None:  # noqa: F811
    """``mailforward serve`` (a supervisor and its workers) adding Received,
    Authentication-Results, DKIM-Signature and the ARC set, and removing a forged result."""
    forged = f"Authentication-Results: {HOSTNAME}; dmarc=pass header.from=bank.test\r\n"
    sent = signed_message("Sender <sender@ext.test>", extra=forged).replace(
        b"<e2e@ext.test>", unique_id().encode())
    assert world.send("sender@ext.test", sent) == {}
    arrived = world.arrived()
    assert arrived.startswith(b"ARC-Seal: ") and b"DKIM-Signature: " in arrived
    assert b"header.from=bank.test" not in arrived

    async def keys(content: bytes) -> dict[str, str]:
        return await duplicate_keys(Message("Q", SENDER, ("alice.dest@sink.test",), content))
    assert asyncio.run(keys(arrived)) == asyncio.run(keys(sent)) != {}
    assert world.send("sender@ext.test", sent) == {}  # the retry: answered 250 ...
    assert len(world.sink.arrivals) == 1  # ... not forwarded again
    wait_until(lambda: "duplicate of a message already delivered" in world.log.read_text(), 10,
               what="the retry logged as a duplicate")
