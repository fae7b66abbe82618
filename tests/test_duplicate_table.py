"""The duplicate cache of a node's workers: a table in shared memory (``state/duplicates.py``).

The table alone (remember, expiry, eviction of the oldest, no collisions, written in a
forked child and read in the parent), the worker's store built on it, and ``mailforward
serve`` with two workers: a retry through the other worker is suppressed, and nothing
about duplicates reaches the supervisor (it is stopped with SIGSTOP meanwhile).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from mailforward.config import DatabaseSettings, LimitsSettings, Settings
from mailforward.smtpd.abuse import abuse_from_settings
from mailforward.state import Store, Window
from mailforward.state.duplicates import PROBE, SLOT, SharedDuplicateTable, TableBackedStore
from mailforward.state.memory import MemoryStore
from mailforward.state.redis import RedisStore
from mailforward.state.shared import SocketStore

from smtp_harness import Clock
from test_workers import Serve, Sink, database, only_worker, send, sink, wait_until, write_config  # noqa: F401

TTL = 100.0


def same_home(table: SharedDuplicateTable, count: int) -> list[str]:
    """``count`` keys whose probe windows start at the same slot (they compete for it)."""
    by_home: dict[int, list[str]] = {}
    for n in itertools.count():
        key = f"dup:{n}"
        keys = by_home.setdefault(table.home(key), [])
        keys.append(key)
        if len(keys) == count:
            return keys
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the table


def test_a_remembered_key_is_seen_and_the_others_are_not() -> None:
    table = SharedDuplicateTable(1024)
    assert table.seen_at(["dup:a", "dup:b"], 10.0) == set()
    table.remember_at(["dup:a"], TTL, 10.0)
    assert table.seen_at(["dup:a", "dup:b"], 11.0) == {"dup:a"}


def test_a_key_is_forgotten_when_its_time_is_over() -> None:
    clock = Clock()
    store = TableBackedStore(SharedDuplicateTable(1024), MemoryStore(), clock=clock)

    async def seen() -> set[str]:
        return await store.ask_seen(["dup:a"])
    asyncio.run(store.remember(["dup:a"], 60.0))
    clock.advance(59.9)
    assert asyncio.run(seen()) == {"dup:a"}
    asyncio.run(store.remember(["dup:a"], 60.0))  # renewed: 60 s from now
    clock.advance(59.9)
    assert asyncio.run(store.seen(["dup:a"])) == {"dup:a"}
    clock.advance(0.1)
    assert asyncio.run(store.seen(["dup:a"])) == set()


def test_a_full_window_evicts_the_oldest_entry() -> None:
    table = SharedDuplicateTable(64)
    keys = same_home(table, PROBE + 2)
    for n, key in enumerate(keys[:PROBE]):  # the window is full: one key a second
        table.remember_at([key], TTL, float(n))
    assert table.seen_at(keys, PROBE) == set(keys[:PROBE])
    table.remember_at([keys[0]], TTL, PROBE)  # renewed: keys[1] is the oldest now
    table.remember_at([keys[PROBE]], TTL, PROBE + 1)
    assert table.seen_at(keys, PROBE + 1) == set(keys[:PROBE + 1]) - {keys[1]}
    table.remember_at([keys[PROBE + 1]], TTL, PROBE + 2)  # then keys[2]
    assert table.seen_at(keys, PROBE + 2) == set(keys) - {keys[1], keys[2]}


def test_an_expired_entry_is_reused_before_the_oldest_live_one_is_evicted() -> None:
    table = SharedDuplicateTable(64)
    keys = same_home(table, PROBE + 1)
    table.remember_at(keys[:1], 1.0, 0.0)  # short-lived
    table.remember_at(keys[1:PROBE], TTL, 0.0)
    table.remember_at([keys[PROBE]], TTL, 5.0)  # keys[0] expired: its slot is taken
    assert table.seen_at(keys, 5.0) == set(keys[1:])


def test_distinct_keys_do_not_collide() -> None:
    table = SharedDuplicateTable(1 << 15)
    remembered = [f"dup:remembered-{n}" for n in range(3000)]
    others = [f"dup:other-{n}" for n in range(3000)]
    table.remember_at(remembered, TTL, 0.0)
    assert table.seen_at(remembered + others, 1.0) == set(remembered)
    crowded = same_home(table, PROBE)  # same window, different keys
    table.remember_at(crowded[:PROBE // 2], TTL, 0.0)
    assert table.seen_at(crowded, 1.0) == set(crowded[:PROBE // 2])


def test_a_slot_is_24_bytes_and_the_size_a_power_of_two() -> None:
    assert SLOT.size == 24
    with pytest.raises(ValueError, match="power of two"):
        SharedDuplicateTable(1000)


def test_a_table_written_in_a_forked_child_is_read_by_the_parent_and_back() -> None:
    table = SharedDuplicateTable(1024)
    now = time.monotonic()
    table.remember_at(["dup:from-parent"], TTL, now)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it sees the parent's key
        code = 1
        try:
            table.remember_at(["dup:from-child"], TTL, time.monotonic())
            code = 0 if table.seen_at(["dup:from-parent"], time.monotonic()) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.seen_at(["dup:from-child", "dup:from-parent", "dup:never"],
                         time.monotonic()) == {"dup:from-child", "dup:from-parent"}


# ---------------------------------------------------------------- the worker's store


class Counters(Store):
    """A supervisor's store that notes what it is asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def admit(self, windows: Sequence[Window]) -> int | None:
        self.calls.append("admit")
        return 0

    async def seen(self, keys: Sequence[str]) -> set[str]:
        self.calls.append("seen")
        return set()

    async def remember(self, keys: Sequence[str], ttl: float) -> None:
        self.calls.append("remember")

    async def close(self) -> None:
        self.calls.append("close")


async def test_the_store_answers_duplicates_itself_and_passes_on_rates_and_close() -> None:
    counters = Counters()
    store = TableBackedStore(SharedDuplicateTable(1024), counters)
    answer = store.ask_seen(["dup:a"])
    assert answer.done() and answer.result() == set()  # already answered: no task
    await store.remember(["dup:a"], TTL)
    assert store.ask_seen(["dup:a", "dup:b"]).result() == {"dup:a"}
    assert await store.seen(["dup:b", "dup:a"]) == {"dup:a"}
    assert await store.admit([Window("rate:x", 1, 60.0)]) == 0
    await store.close()
    assert counters.calls == ["admit", "close"]


async def test_only_a_worker_without_redis_gets_the_table(database: DatabaseSettings) -> None:  # noqa: F811
    settings = Settings(database=database)
    table = SharedDuplicateTable(64)

    async def store(end: socket.socket | None, duplicates: SharedDuplicateTable | None,
                    limits: LimitsSettings = settings.limits) -> Store:
        checks = await abuse_from_settings(dataclasses.replace(settings, limits=limits), end,
                                           duplicates)
        await checks.close()
        return checks.store

    worker = await store(socket.socketpair()[1], table)
    assert isinstance(worker, TableBackedStore) and worker.table is table
    assert isinstance(worker.counters, SocketStore)
    assert isinstance(await store(socket.socketpair()[1], None), SocketStore)
    assert isinstance(await store(None, None), MemoryStore)  # one process
    end = socket.socketpair()[1]
    assert isinstance(await store(end, table, LimitsSettings(redis_url="redis://127.0.0.1:1/0")),
                      RedisStore)
    assert end.fileno() == -1  # closed unused


# ---------------------------------------------------------------- mailforward serve, 2 workers


def duplicates_logged(served: Serve, pid: int) -> int:
    return len(served.find(rf"\[{pid}\]: .*duplicate of a message already delivered"))


def test_a_retry_through_either_worker_is_suppressed_and_outlives_a_worker(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:  # noqa: F811
    served = Serve(write_config(tmp_path, database, sink.port, "workers = 2"))
    try:
        assert len(served.find(r"limits: counters in the supervisor .*, duplicate cache in "
                               r"memory shared by this node's workers")) == 2
        with only_worker(served, 0):
            assert send(served.port, "once").startswith("250")
        with only_worker(served, 1) as second:
            for _ in range(3):
                assert send(served.port, "once").startswith("250")
            wait_until(lambda: duplicates_logged(served, second) == 3, "3 retries on worker 1")
        os.kill(served.workers()[0], signal.SIGKILL)  # the one that delivered it
        replacement = int(served.wait_for(r"worker 0 started \(pid (\d+)\)", count=2)[1].group(1))
        served.wait_for(rf"worker 0 \(pid {replacement}\) ready")
        with only_worker(served, 0):
            assert send(served.port, "once").startswith("250")
            wait_until(lambda: duplicates_logged(served, replacement) == 1,
                       "the retry on the replacement")
        assert len(sink.envelopes) == 1
    finally:
        served.close()


def test_no_duplicate_question_reaches_the_supervisor(
        tmp_path: Path, database: DatabaseSettings, sink: Sink) -> None:  # noqa: F811
    """With the supervisor stopped, a question to it would go unanswered for 2 s and then
    fail open: the retry would be forwarded and a warning logged.  127.0.0.1 is exempt from
    the connection limits, so nothing else asks the supervisor either."""
    served = Serve(write_config(tmp_path, database, sink.port,
                                'workers = 2\nclient_limit_exceptions = ["127.0.0.1"]'))
    try:
        os.kill(served.pid, signal.SIGSTOP)
        try:
            replies = [send(served.port, tag) for tag in ("first", "first", "second", "first",
                                                          "second", "first")]
        finally:
            os.kill(served.pid, signal.SIGCONT)
        assert all(reply.startswith("250 2.0.0 Ok: queued as ") for reply in replies), replies
        wait_until(lambda: len(served.find("duplicate of a message already delivered")) == 4,
                   "the 4 retries logged as duplicates")
        assert sorted(content.split(b"Subject: ")[1].split(b"\r\n")[0]
                      for _, _, content in sink.envelopes) == [b"first", b"second"]
        assert "limits store unavailable" not in served.text()
    finally:
        served.close()
