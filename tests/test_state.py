"""The limits store (``state/``): sliding windows, atomic multi-window admission and the
TTL set, for the in-process store and for the real Redis at 127.0.0.1:6379 (under a key
prefix of each test's own, deleted afterwards)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from mailforward.config import LimitsSettings
from mailforward.state import Store, StoreUnavailable, Window, open_store
from mailforward.state.memory import PRUNE_INTERVAL, MemoryStore
from mailforward.state.redis import RedisStore
from mailforward.state.shared import SocketStore, StoreChannel, StoreService

from smtp_harness import Clock, async_wait_until, held_port, wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"
STORES = ["memory", "redis", "shared"]


class Supervisor:
    """:class:`StoreService` driven by a selector in a thread, as a supervisor drives it,
    with one channel per worker made up front; :meth:`worker` hands out their ends."""

    def __init__(self, workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = StoreService(clock=clock)
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.ends: list[socket.socket] = []
        for index in range(workers):
            ours, theirs = socket.socketpair()
            self.selector.register(StoreChannel(ours, index), selectors.EVENT_READ, "channel")
            self.ends.append(theirs)
        self._stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stopped:
            for key, mask in self.selector.select(0.5):
                if key.data is None:
                    return
                channel = key.fileobj
                assert isinstance(channel, StoreChannel)
                if mask & selectors.EVENT_READ and not self.service.serve(channel):
                    self.selector.unregister(channel)
                    channel.close()
                    continue
                if mask & selectors.EVENT_WRITE:
                    channel.flush()
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.wants_write
                                                 else 0)
                if key.events != wanted:
                    self.selector.modify(channel, wanted, "channel")

    def worker(self, index: int = 0) -> SocketStore:
        return SocketStore(self.ends[index])

    def stop(self) -> None:
        self._stopped = True
        self._wake_w.send(b"x")
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            if isinstance(key.fileobj, StoreChannel):
                key.fileobj.close()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


def redis_prefix() -> str:
    return f"mftest:{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    name = redis_prefix()
    yield name
    delete_prefix(name)


@pytest.fixture(params=STORES)
async def clocked(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[tuple[Store, Clock]]:
    """A store whose time is a settable clock: memory, or Redis told the time by us."""
    clock = Clock(1_000_000.0)
    store: Store
    supervisor = None
    if request.param == "memory":
        store = MemoryStore(clock)
    elif request.param == "shared":
        supervisor = Supervisor(clock=clock)
        store = supervisor.worker()
    else:
        store = RedisStore.from_url(REDIS_URL, prefix, 2.0, clock=clock)
    yield store, clock
    await store.close()
    if supervisor is not None:
        supervisor.stop()


@pytest.fixture(params=STORES)
async def real_time(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Store]:
    """A store on its own clock (Redis: the server's TIME)."""
    supervisor = None
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "shared":
        supervisor = Supervisor()
        store = supervisor.worker()
    else:
        store = RedisStore.from_url(REDIS_URL, prefix, 2.0)
    yield store
    await store.close()
    if supervisor is not None:
        supervisor.stop()


# ---------------------------------------------------------------- sliding windows


async def test_window_admits_exactly_limit_events_per_interval(clocked: tuple[Store, Clock]) -> None:
    store, clock = clocked
    window = Window("w", 3, 10.0)
    assert [await store.admit([window]) for _ in range(4)] == [None, None, None, 0]
    clock.advance(9.999)  # still inside: the first event is 9.999 s old
    assert await store.admit([window]) == 0
    clock.advance(0.001)  # exactly 10 s: the first three leave together
    assert [await store.admit([window]) for _ in range(4)] == [None, None, None, 0]


async def test_window_slides_one_event_at_a_time(clocked: tuple[Store, Clock]) -> None:
    store, clock = clocked
    window = Window("slide", 2, 10.0)
    assert await store.admit([window]) is None  # t=0
    clock.advance(4)
    assert await store.admit([window]) is None  # t=4
    clock.advance(4)
    assert await store.admit([window]) == 0  # t=8: both still in the window
    clock.advance(2)
    assert await store.admit([window]) is None  # t=10: the t=0 event left, one place free
    assert await store.admit([window]) == 0
    clock.advance(4)
    assert await store.admit([window]) is None  # t=14: the t=4 event left


async def test_refused_attempts_are_not_counted(clocked: tuple[Store, Clock]) -> None:
    store, clock = clocked
    window = Window("retry", 1, 10.0)
    assert await store.admit([window]) is None
    for _ in range(20):  # hammering does not push the reopening back
        clock.advance(0.4)
        assert await store.admit([window]) == 0
    clock.advance(2.0)
    assert await store.admit([window]) is None


async def test_several_windows_are_admitted_all_or_nothing(clocked: tuple[Store, Clock]) -> None:
    store, _ = clocked
    client, sender = Window("client", 5, 60.0), Window("sender", 2, 60.0)
    assert await store.admit([client, sender]) is None
    assert await store.admit([client, sender]) is None
    assert await store.admit([client, sender]) == 1  # the sender's is full ...
    other = Window("sender2", 10, 60.0)
    # ... so the client's window counted 2 events, not 3: 3 more fit, then it is full.
    assert [await store.admit([client, other]) for _ in range(4)] == [None, None, None, 0]


async def test_first_full_window_is_named(clocked: tuple[Store, Clock]) -> None:
    store, _ = clocked
    a, b = Window("a", 1, 60.0), Window("b", 1, 60.0)
    assert await store.admit([b]) is None
    assert await store.admit([a, b]) == 1
    assert await store.admit([a]) is None
    assert await store.admit([a, b]) == 0
    assert await store.admit([]) is None


async def test_windows_of_different_keys_are_independent(clocked: tuple[Store, Clock]) -> None:
    store, _ = clocked
    assert await store.admit([Window("x", 1, 60.0)]) is None
    assert await store.admit([Window("y", 1, 60.0)]) is None
    assert await store.admit([Window("x", 1, 60.0)]) == 0


async def test_window_on_the_stores_own_clock(real_time: Store) -> None:
    window = Window("own-clock", 2, 0.5)
    assert await real_time.admit([window]) is None
    assert await real_time.admit([window]) is None
    assert await real_time.admit([window]) == 0
    started = time.monotonic()

    async def admitted() -> bool:
        return await real_time.admit([window]) is None

    while not await admitted():
        assert time.monotonic() - started < 5, "the window never slid"
        await asyncio.sleep(0.02)
    assert time.monotonic() - started < 0.6  # not before it should, and not much later


# ---------------------------------------------------------------- atomicity


async def test_concurrent_admissions_never_exceed_the_limit(real_time: Store) -> None:
    window = Window("race", 10, 60.0)
    results = await asyncio.gather(*(real_time.admit([window]) for _ in range(200)))
    assert results.count(None) == 10


async def test_redis_is_exact_across_independent_clients(prefix: str) -> None:
    """Three clients (as three nodes would be), each with its own connections, at once."""
    stores = [RedisStore.from_url(REDIS_URL, prefix, 2.0) for _ in range(3)]
    window = Window("nodes", 25, 60.0)
    try:
        results = await asyncio.gather(*(stores[i % 3].admit([window]) for i in range(150)))
    finally:
        for store in stores:
            await store.close()
    assert results.count(None) == 25


def test_redis_is_exact_across_threads_with_their_own_event_loops(prefix: str) -> None:
    window = Window("threads", 40, 60.0)
    admitted: list[int] = []
    lock = threading.Lock()

    def node() -> None:
        async def run() -> int:
            store = RedisStore.from_url(REDIS_URL, prefix, 5.0)
            try:
                results = await asyncio.gather(*(store.admit([window]) for _ in range(50)))
            finally:
                await store.close()
            return results.count(None)
        count = asyncio.run(run())
        with lock:
            admitted.append(count)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(admitted) == 4 and sum(admitted) == 40


def test_the_supervisors_store_is_exact_across_workers() -> None:
    """Worker processes, each with its own event loop, asking one supervisor at once."""
    supervisor = Supervisor(workers=4)
    window = Window("workers", 40, 60.0)
    admitted: list[int] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        async def run() -> int:
            store = supervisor.worker(index)
            try:
                results = await asyncio.gather(*(store.admit([window]) for _ in range(50)))
            finally:
                await store.close()
            return results.count(None)
        count = asyncio.run(run())
        with lock:
            admitted.append(count)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        supervisor.stop()
    assert len(admitted) == 4 and sum(admitted) == 40


async def test_a_silent_or_gone_supervisor_is_an_unavailable_store() -> None:
    ours, theirs = socket.socketpair()
    silent = SocketStore(theirs, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no answer within 0.2 s"):
        await silent.admit([Window("x", 1, 1.0)])
    assert time.monotonic() - started < 0.5
    ours.close()  # the supervisor died
    await async_wait_until(lambda: silent._lost, 2)
    with pytest.raises(StoreUnavailable, match="channel closed"):
        await silent.seen(["x"])
    await silent.close()


def test_the_store_service_refuses_a_bad_request_without_dying() -> None:
    service = StoreService(clock=Clock())
    assert "error" in service.answer(b"not json")
    assert "error" in service.answer(b'{"op": "drop"}')
    assert service.answer(b'{"op": "admit", "windows": [["k", 1, 5]]}') == {"full": None}
    assert service.answer(b'{"op": "admit", "windows": [["k", 1, 5]]}') == {"full": 0}


# ---------------------------------------------------------------- the TTL set


async def test_memory_ttl_set_remembers_until_expiry() -> None:
    clock = Clock()
    store = MemoryStore(clock)  # Redis expires keys on its own clock: the real-time test
    await store.remember(["a", "b"], 10.0)
    assert await store.seen(["a", "b", "c"]) == {"a", "b"}
    clock.advance(9.9)
    assert await store.seen(["a", "c"]) == {"a"}
    await store.remember(["a"], 10.0)  # renewed
    clock.advance(0.2)
    assert await store.seen(["a", "b"]) == {"a"}


async def test_ttl_set_expires_on_the_stores_clock(real_time: Store) -> None:
    await real_time.remember(["short"], 0.3)
    await real_time.remember(["long"], 60.0)
    assert await real_time.seen(["short", "long", "never"]) == {"short", "long"}

    async def expired() -> bool:
        return await real_time.seen(["short", "long"]) == {"long"}

    deadline = time.monotonic() + 5
    while not await expired():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await real_time.seen([]) == set()


async def test_redis_keys_carry_the_prefix_and_expire(prefix: str) -> None:
    store = RedisStore.from_url(REDIS_URL, prefix, 2.0)
    try:
        await store.admit([Window("rate:x", 5, 30.0)])
        await store.remember(["dup:y"], 100.0)
    finally:
        await store.close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert sorted(client.scan_iter(match=prefix + "*")) == [(prefix + "dup:y").encode(),
                                                               (prefix + "rate:x").encode()]
        assert 0 < client.pttl(prefix + "rate:x") <= 31_000  # nothing stays for ever
        assert 0 < client.pttl(prefix + "dup:y") <= 100_000
    finally:
        client.close()


# ---------------------------------------------------------------- memory bounds


async def test_memory_store_forgets_idle_windows_and_expired_keys() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(100):
        await store.admit([Window(f"k{i}", 1, 10.0)])
    await store.remember([f"d{i}" for i in range(100)], 10.0)
    clock.advance(PRUNE_INTERVAL + 1)
    await store.admit([Window("fresh", 1, 10.0)])
    assert list(store._events) == ["fresh"]
    assert store._expiry == {}


async def test_memory_ttl_set_keeps_at_most_max_keys_oldest_out_first() -> None:
    store = MemoryStore(Clock(), max_keys=3)
    await store.remember(["a", "b", "c"], 60.0)
    await store.remember(["a"], 60.0)  # renewed: now the youngest
    await store.remember(["d"], 60.0)
    assert await store.seen(["a", "b", "c", "d"]) == {"a", "c", "d"}


# ---------------------------------------------------------------- failures: no wrong answer, no hang


async def test_unreachable_redis_raises_at_once_and_pauses_retries() -> None:
    store = RedisStore.from_url("unix:///nonexistent/mailforward-test.sock", "p:", 1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="ConnectionError"):
        await store.admit([Window("x", 1, 1.0)])
    with pytest.raises(StoreUnavailable, match="not retried yet"):
        await store.seen(["y"])
    with pytest.raises(StoreUnavailable):
        await store.remember(["y"], 1.0)
    assert time.monotonic() - started < 0.5
    await store.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join(2)
    listener.close()
    for sock in accepted:
        sock.close()


async def test_a_hung_redis_costs_at_most_the_timeout(silent_server: int) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{silent_server}/0", "p:", 0.3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="timed out|Timeout"):
        await store.admit([Window("x", 1, 1.0)])
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):  # paused: answered at once
        await store.seen(["x"])
    assert time.monotonic() - started < 0.1
    await store.close()


async def test_redis_store_recovers_after_the_pause(prefix: str) -> None:
    store = RedisStore.from_url(REDIS_URL, prefix, 1.0)
    store._down_until = time.monotonic() + 0.2  # as after a failure
    store._last_error = "ConnectionError: simulated"
    with pytest.raises(StoreUnavailable):
        await store.admit([Window("x", 1, 1.0)])
    await async_wait_until(lambda: time.monotonic() > store._down_until, 2)
    assert await store.admit([Window("x", 1, 1.0)]) is None
    await store.close()


# ---------------------------------------------------------------- Sentinel


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[int]:
    """A Redis Sentinel of this test's own, watching the machine's Redis as "mfmaster"."""
    with held_port() as port:  # handed over: redis-server binds it with SO_REUSEADDR
        config = tmp_path / "sentinel.conf"  # Sentinel rewrites it: a file of its own
        config.write_text(f"port {port}\nbind 127.0.0.1\n"
                          "sentinel monitor mfmaster 127.0.0.1 6379 1\n"
                          "sentinel down-after-milliseconds mfmaster 600000\n")
        proc = subprocess.Popen(["redis-server", str(config), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(
            ["redis-cli", "-p", str(port), "sentinel", "get-master-addr-by-name", "mfmaster"],
            capture_output=True, text=True, timeout=5).stdout.split() == ["127.0.0.1", "6379"],
            10, what="the sentinel naming its master")
        yield port
    finally:
        proc.kill()  # by PID
        proc.wait(10)


async def test_redis_through_sentinel(sentinel: int, prefix: str) -> None:
    store = open_store(LimitsSettings(redis_sentinels=(f"127.0.0.1:{sentinel}",),
                                      redis_sentinel_master="mfmaster", redis_prefix=prefix))
    try:
        window = Window("via-sentinel", 2, 60.0)
        assert [await store.admit([window]) for _ in range(3)] == [None, None, 0]
        await store.remember(["k"], 60.0)
        assert await store.seen(["k", "other"]) == {"k"}
    finally:
        await store.close()


# ---------------------------------------------------------------- which store


def test_open_store_follows_the_settings() -> None:
    assert isinstance(open_store(LimitsSettings()), MemoryStore)
    store = open_store(LimitsSettings(redis_url=REDIS_URL, redis_prefix="p:"))
    assert isinstance(store, RedisStore) and store.description == f"redis {REDIS_URL}"
    secret = open_store(LimitsSettings(redis_url="redis://:hunter2@127.0.0.1:6379/3"))
    assert isinstance(secret, RedisStore) and "hunter2" not in secret.description
    sentinel = open_store(LimitsSettings(redis_sentinels=("127.0.0.1:26379",),
                                         redis_sentinel_master="mymaster"))
    assert isinstance(sentinel, RedisStore) and "mymaster" in sentinel.description
