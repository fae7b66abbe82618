"""``mailforward serve``: one process, or a supervisor and ``[server] workers`` workers.

With more than one worker the supervisor binds the listening sockets once
(so a privileged port can be bound before privileges are dropped) and forks
the workers, which inherit them: all workers accept from the one socket,
so there is one accept queue and port 0 means one port (no SO_REUSEPORT).
The supervisor serves no mail itself.  It

* restarts a worker that dies, after a backoff (0.5 s, doubling while
  replacements keep dying within 30 s, at most 30 s), logged;
* plays anvil(8): one count of connections per client for all workers
  (``anvil.py``), released when a worker dies with its clients;
* keeps the ``[limits]`` store when no Redis is configured: one
  ``MemoryStore`` for the rate windows of every worker
  (``state/shared.py``), so rate limits are exact across workers and
  outlive a worker's death; and maps, before the first fork, the
  duplicate cache: a table in shared memory that every worker reads and
  writes directly, never asking the supervisor (``state/duplicates.py``);
* forwards SIGTERM, SIGINT and SIGHUP to every worker.  On SIGTERM/SIGINT
  it closes its own copy of the listening sockets, waits while the workers
  drain (killing any still there ``drain_timeout`` + 10 s later), and exits
  0.  On SIGHUP it reloads what it owns (the client limits, the log level,
  and the parts new workers will start with, keeping the old ones where new
  ones do not load); a configuration that does not load at all changes
  nothing and is not forwarded.

Worker 0 runs the retry scheduler, as exactly one process per spool must;
its replacement takes it over when it dies.  Every worker delivers into the
same spool (one file per message).

Started as root with ``[server] user`` set, the supervisor drops to that
user after binding and before the first fork (``privilege.py``): no worker
ever has root.  With one worker the serving process does the same before
its event loop runs.

Each worker has two channels to the supervisor, Unix socket pairs made
before its fork: the anvil's and the store's (``channel.py``); one selector
serves both.  The duplicate table needs none: it is memory, not a service.

The supervisor runs no event loop and no threads: it forks from a plain
selector loop, with the forwarded signals blocked around the fork, so a
worker starts clean, builds its own event loop, database connections and
thread pools, and receives any signal sent meanwhile once its handlers
are in place.  When the supervisor dies (``kill -9``), the kernel kills its
workers too on Linux (``PR_SET_PDEATHSIG``): that is a crash of the service,
which the spool is built to survive, not a drain.  Elsewhere a worker sees
its channel close, drains and exits; it never serves on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..channel import LineChannel
from ..config import Settings, load_settings
from ..errors import ConfigError, MailforwardError
from ..state.duplicates import SharedDuplicateTable
from ..state.shared import StoreChannel, StoreService
from .anvil import AnvilChannel, AnvilService
from .limits import ClientLimits
from .privilege import ServiceUser, become, service_user
from .server import SERVICE_SIGNALS, Components, Service, apply_log_level

log = logging.getLogger("mailforward.smtpd")

RESTART_FIRST = 0.5  # seconds before a dead worker is replaced
RESTART_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long is replaced after RESTART_FIRST again
STOP_GRACE = 10.0  # seconds beyond drain_timeout before workers still running are killed
HANDLED_SIGNALS = (*SERVICE_SIGNALS, signal.SIGCHLD)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def serve(settings: Settings, config_path: str | None = None) -> None:
    """``mailforward serve``: until SIGTERM or SIGINT, reloading on SIGHUP."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no death by SIGHUP before the handlers exist
    user = service_user(settings.server)  # refused before anything is bound
    if settings.server.workers == 1:
        serve_alone(settings, config_path, user)
        return
    with shared_metrics(settings, user):
        Supervisor(settings, config_path, user).run()


def serve_alone(settings: Settings, config_path: str | None, user: ServiceUser | None) -> None:
    """``[server] workers = 1``: this process binds, drops privileges, then serves."""
    components = Components.load(settings)  # a bad key stops us before anything is bound
    listeners = bind_listeners(settings)
    try:
        become(user, settings, config_path)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    asyncio.run(Service(components, config_path, sockets=listeners).run())


@contextlib.contextmanager
def shared_metrics(settings: Settings, user: ServiceUser | None = None) -> Iterator[None]:
    """Workers count into one directory, so the worker serving /metrics reports them all.

    prometheus-client picks its storage when first imported, which happens in
    the workers after this (``ops/metrics`` creates the instruments lazily).
    The directory is the service ``user``'s: the workers write in it.
    """
    if not settings.metrics.listen or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="mailforward-metrics-") as directory:
        if user is not None:
            os.chown(directory, user.uid, user.gid)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def bind_listeners(settings: Settings) -> list[socket.socket]:
    """Listening sockets for ``[server] listen``, as asyncio would bind them."""
    sockets: list[socket.socket] = []
    try:
        for host, port in settings.server.listen_addresses():
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as error:
                    raise OSError(error.errno, f"{host}:{port}: {error.strerror}") from None
                sock.listen(settings.server.listen_backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_worker(components: Components, config_path: str | None,
               listeners: list[socket.socket], anvil: socket.socket,
               store: socket.socket | None, index: int,
               duplicates: SharedDuplicateTable | None = None) -> int:
    """A worker's life, in the forked child; its exit code."""
    try:
        asyncio.run(Service(components, config_path, sockets=listeners, anvil=anvil,
                            store=store, duplicates=duplicates,
                            runs_retries=index == 0).run())
    except (MailforwardError, OSError) as error:
        log.error("worker %d cannot serve: %s", index, error)
        return 1
    except Exception:
        log.exception("worker %d failed", index)
        return 1
    return 0


@dataclass
class Link:
    """One of a worker's channels, as the selector hands it back."""

    worker: Worker
    channel: LineChannel
    serve: Callable[[], bool]  # answer what arrived; False when the worker's end closed
    release: Callable[[], None]  # what the worker held through it is gone with it


@dataclass
class Worker:
    index: int
    pid: int = 0  # 0: not running
    started: float = 0.0
    ready: bool = False
    anvil: AnvilChannel | None = None
    links: list[Link] = field(default_factory=list)  # its open channels, the anvil's first
    restart_at: float | None = None
    backoff: float = RESTART_FIRST


class Supervisor:
    def __init__(self, settings: Settings, config_path: str | None = None,
                 user: ServiceUser | None = None) -> None:
        self.config_path = config_path
        self.user = user
        self.components = Components.load(settings)  # a bad key stops us before anything runs
        server = settings.server
        # no exceptions here: a worker never asks about a client it exempts
        self.anvil = AnvilService(ClientLimits(server.client_connection_count_limit,
                                               server.client_connection_rate_limit,
                                               server.client_connection_rate_time_unit))
        # [limits] without Redis: one store for every worker's rates, and one duplicate
        # table they share, mapped now so that every fork inherits it (fixed until a restart)
        self.store = StoreService() if not settings.limits.shared else None
        self.duplicates = SharedDuplicateTable() if self.store is not None else None
        self.workers = [Worker(index) for index in range(server.workers)]
        self.listeners: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.stop_deadline: float | None = None
        self.serving = False  # every worker reported ready once
        self.failure = ""
        self.pid = os.getpid()
        self._wake_r = self._wake_w = -1

    @property
    def settings(self) -> Settings:
        return self.components.settings

    def run(self) -> None:
        self.listeners = bind_listeners(self.settings)
        try:
            become(self.user, self.settings, self.config_path)  # before the first fork
        except BaseException:
            for sock in self.listeners:
                sock.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(self._wake_w)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _note_signal)
        try:
            for worker in self.workers:
                self._spawn(worker)
            self._loop()
        except BaseException:
            for worker in self.workers:
                if worker.pid:
                    _kill(worker.pid, signal.SIGKILL)
                    os.waitpid(worker.pid, 0)
            raise
        finally:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sock in self.listeners:
                sock.close()
            if self.duplicates is not None:  # no worker left to use it
                self.duplicates.close()
        if self.failure:
            raise MailforwardError(self.failure)
        log.info("stopped")

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not (self.stopping and not any(w.pid for w in self.workers)):
            for key, mask in self.selector.select(self._timeout()):
                if key.data is None:
                    self._signals()
                else:
                    self._channel_event(key.data, mask)
            self._due(time.monotonic())

    def _timeout(self) -> float | None:
        times = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self.stop_deadline is not None:
            times.append(self.stop_deadline)
        return max(min(times) - time.monotonic(), 0.0) if times else None

    def _due(self, now: float) -> None:
        for worker in self.workers:
            if worker.restart_at is not None and worker.restart_at <= now and not self.stopping:
                self._spawn(worker)
        if self.stop_deadline is not None and now >= self.stop_deadline:
            self.stop_deadline = None
            for worker in self.workers:
                if worker.pid:
                    log.error("worker %d (pid %d) still running %g s after the stop: killed",
                              worker.index, worker.pid,
                              self.settings.server.drain_timeout + STOP_GRACE)
                    _kill(worker.pid, signal.SIGKILL)

    def _signals(self) -> None:
        try:
            received = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for number in received:
            if number in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(number))
            elif number == signal.SIGHUP:
                try:
                    self._reload()
                except Exception:  # a reload must never take the service down
                    log.exception("supervisor reload failed; everything kept")
            elif number == signal.SIGCHLD:
                self._reap()

    def _channel_event(self, link: Link, mask: int) -> None:
        channel, worker = link.channel, link.worker
        if mask & selectors.EVENT_READ and not link.serve():
            self._close_link(link)
            return
        if mask & selectors.EVENT_WRITE:
            channel.flush()
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.wants_write else 0)
        if self.selector.get_key(channel).events != wanted:
            self.selector.modify(channel, wanted, link)
        anvil = worker.anvil
        if anvil is not None and channel is anvil and anvil.ready and not worker.ready:
            worker.ready = True
            log.info("worker %d (pid %d) ready", worker.index, worker.pid)
            self._announce()

    def _announce(self) -> None:
        if self.serving or not all(w.ready for w in self.workers):
            return
        self.serving = True
        for sock in self.listeners:
            host, port = sock.getsockname()[:2]
            log.info("listening on %s:%d as %s (%d workers)", host, port,
                     self.settings.server.hostname, len(self.workers))

    # ------------------------------------------------------------ workers

    def _spawn(self, worker: Worker) -> None:
        worker.restart_at = None
        anvil_ours, anvil_theirs = socket.socketpair()
        store_ours, store_theirs = socket.socketpair() if self.store is not None else (None, None)
        ours = [end for end in (anvil_ours, store_ours) if end is not None]
        theirs = [end for end in (anvil_theirs, store_theirs) if end is not None]
        signal.pthread_sigmask(signal.SIG_BLOCK, SERVICE_SIGNALS)  # held for the child
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVICE_SIGNALS)
            for end in (*ours, *theirs):
                end.close()
            if not self.serving:
                raise
            log.error("worker %d: cannot fork (%s); trying again in %.1f s", worker.index,
                      error, RESTART_MAX)
            worker.restart_at = time.monotonic() + RESTART_MAX
            return
        if pid == 0:
            self._become_worker(worker, anvil_theirs, store_theirs, ours)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVICE_SIGNALS)
        for end in theirs:
            end.close()
        worker.pid, worker.started, worker.ready = pid, time.monotonic(), False
        anvil = worker.anvil = AnvilChannel(anvil_ours, worker.index)
        self._link(worker, anvil, lambda: self.anvil.serve(anvil),
                   lambda: self.anvil.release(anvil))  # its clients' connections are gone
        if self.store is not None and store_ours is not None:
            store, service = StoreChannel(store_ours, worker.index), self.store
            self._link(worker, store, lambda: service.serve(store), lambda: None)
        log.info("worker %d started (pid %d)", worker.index, pid)

    def _link(self, worker: Worker, channel: LineChannel, serve: Callable[[], bool],
              release: Callable[[], None]) -> None:
        link = Link(worker, channel, serve, release)
        worker.links.append(link)
        self.selector.register(channel, selectors.EVENT_READ, link)

    def _become_worker(self, worker: Worker, anvil: socket.socket, store: socket.socket | None,
                       supervisor_ends: list[socket.socket]) -> None:
        """In the child: drop the supervisor's state and serve; exits the process."""
        code = 1
        try:
            _die_with(self.pid)
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:  # the forwarded ones stay blocked until Service.run
                signal.signal(sig, signal.SIG_DFL)
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for end in supervisor_ends:
                end.close()
            for other in self.workers:  # their channels must close when they (or we) die
                for link in other.links:
                    link.channel.close()
            code = run_worker(self.components, self.config_path, self.listeners, anvil, store,
                              worker.index, self.duplicates)
        except BaseException:  # noqa: BLE001  (nothing may return into the supervisor's code)
            log.exception("worker %d failed", worker.index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _close_link(self, link: Link) -> None:
        worker = link.worker
        if link not in worker.links:
            return
        worker.links.remove(link)
        self.selector.unregister(link.channel)
        link.release()
        link.channel.close()
        if link.channel is worker.anvil:
            worker.anvil = None

    def _close_channels(self, worker: Worker) -> None:
        for link in list(worker.links):
            self._close_link(link)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for worker in self.workers:
                if worker.pid == pid:
                    self._exited(worker, status)

    def _exited(self, worker: Worker, status: int) -> None:
        self._close_channels(worker)
        pid, worker.pid, worker.ready = worker.pid, 0, False
        how = describe_exit(status)
        if self.stopping:
            level = logging.INFO if os.waitstatus_to_exitcode(status) == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", worker.index, pid, how)
            return
        if not self.serving:
            self.failure = (f"worker {worker.index} (pid {pid}) {how} before it was serving "
                            "(see its error above)")
            log.error("%s", self.failure)
            self._stop(signal.SIGTERM)
            return
        now = time.monotonic()
        delay = worker.backoff if now - worker.started < STABLE_AFTER else RESTART_FIRST
        worker.backoff = min(delay * 2, RESTART_MAX)
        worker.restart_at = now + delay
        log.warning("worker %d (pid %d) %s; restarting it in %.1f s", worker.index, pid, how,
                    delay)

    def _signal_workers(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.pid:
                _kill(worker.pid, sig)

    # ------------------------------------------------------------ signals

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("%s: stopping %d workers", sig.name, sum(1 for w in self.workers if w.pid))
            for sock in self.listeners:  # the workers' copies close as they drain
                sock.close()
            self.listeners = []
            for worker in self.workers:
                worker.restart_at = None
            self.stop_deadline = (time.monotonic() + self.settings.server.drain_timeout
                                  + STOP_GRACE)
        self._signal_workers(sig)

    def _reload(self) -> None:
        if self.stopping:
            return
        try:
            new = load_settings(self.config_path)
        except (ConfigError, OSError) as error:
            log.error("supervisor reload: configuration not loaded, everything kept and the "
                      "workers not signalled: %s", error)
            return
        self.components, _ = self.components.reload(new)  # for workers started from now on
        server = self.settings.server
        self.anvil.limits.reconfigure(server.client_connection_count_limit,
                                      server.client_connection_rate_limit,
                                      server.client_connection_rate_time_unit,
                                      exceptions=())  # the workers apply their own
        level = apply_log_level(new)
        workers = sum(1 for w in self.workers if w.pid)
        log.info("supervisor reload: client limits %d connections, %d per %d s%s; "
                 "signalling %d workers", server.client_connection_count_limit,
                 server.client_connection_rate_limit, server.client_connection_rate_time_unit,
                 f"; {level}" if level else "", workers)
        self._signal_workers(signal.SIGHUP)


def _die_with(supervisor: int) -> None:
    """On Linux the kernel kills a worker whose supervisor died: ``kill -9`` of the
    service's main process is a crash of all of it, not a drain.  Elsewhere the worker
    sees its anvil channel close and drains (``Service._watch_supervisor``)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != supervisor:  # it died before the line above took effect
        os._exit(1)


def _note_signal(signum: int, frame: object) -> None:
    """The wakeup fd carries the signal to the loop; nothing to do here."""


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
