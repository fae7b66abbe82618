"""Listeners and the serving process: one :class:`MailServer` per process.

A :class:`Service` is one process that serves: the lookup table, delivery,
the listeners and, in the process that owns it, the retry scheduler.  With
``[server] workers = 1`` it is all of ``mailforward serve``; with more, the
supervisor (``supervisor.py``) forks one per worker on the sockets it bound.

Signals, as for Postfix, are the interface:

* SIGTERM (or SIGINT) drains: no new connections; a session waiting for its
  next command gets ``421 4.3.2``; a command or DATA/BDAT transaction in
  progress finishes and gets its reply, up to ``[server] drain_timeout``;
  then the process exits 0.
* SIGHUP re-reads the configuration file and replaces what can change
  without a restart (:meth:`Components.reload`): lookup caches are flushed,
  DKIM/ARC keys and tables, the TLS certificate and the SRS secrets are
  loaded again, each kept as it was when its new version does not load.
  New sessions use the new parts; sessions in progress finish with theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..addresses import normalize_domain
from ..auth.pipeline import MessageAuthenticator, authenticator_from_settings
from ..config import Settings, load_settings
from ..delivery import build_delivery
from ..delivery.base import Delivery
from ..delivery.retry import RetryScheduler
from ..delivery.spool import SpoolError
from ..errors import ConfigError, TemporaryLookupError
from ..hostport import parse_host_port
from ..ops.logs import configure_logging
from ..srs import SrsRewriter, rewriter_from_settings
from ..tables import LookupTable, open_table
from ..tables.cache import CachedTable
from .abuse import AbuseChecks, abuse_from_settings
from .anvil import AnvilClient, SharedLimits
from .engine import EngineSettings, SmtpConnection, Wire
from .handler import SmtpHandler
from .limits import ClientLimits

log = logging.getLogger("mailforward.smtpd")

if TYPE_CHECKING:
    from ..ops.health import HealthServer
    from ..state.duplicates import SharedDuplicateTable

RETRY_INTERVAL = 10.0  # seconds between looks at the spool for due messages
READY_TIMEOUT = 5.0  # seconds /readyz waits for the lookup table
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SERVICE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CUT_GRACE = 5.0  # seconds for cancelled sessions to close after the drain deadline

# Keys whose new value SIGHUP applies, besides the [srs], [dkim], [arc] and [auth]
# sections and [server] tls_cert/tls_key.
RELOADED_SERVER_KEYS = ("client_connection_count_limit", "client_connection_rate_limit",
                        "client_connection_rate_time_unit", "client_limit_exceptions")
RELOADED_DATABASE_KEYS = ("cache_ttl", "negative_cache_ttl")


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def signing_domains(settings: Settings) -> frozenset[str]:
    """The domains our DKIM signature and ARC seal speak for (the SRS domain is added by the handler)."""
    names = (settings.dkim.sign_forwarded_as, settings.arc.domain)
    return frozenset(normalize_domain(name) for name in names if name)


def cached_table(table: LookupTable, settings: Settings) -> CachedTable:
    """A fresh (empty) cache in front of ``table``: how SIGHUP flushes the lookup caches."""
    return CachedTable(table, settings.database.cache_ttl, settings.database.negative_cache_ttl)


def _why(error: BaseException) -> str:
    return str(error) or type(error).__name__


# ---------------------------------------------------------------- what SIGHUP replaces


@dataclass(frozen=True)
class Components:
    """The parts of a running server that SIGHUP may replace, and the settings they came from.

    ``settings`` is what the process runs with: the start-up configuration
    plus whatever a reload applied.  Other changes ([server] listen, workers,
    [delivery], the database URL...) wait for a restart, and the reload says so.
    """

    settings: Settings
    srs: SrsRewriter | None
    auth: MessageAuthenticator
    tls: ssl.SSLContext | None

    @classmethod
    def load(cls, settings: Settings) -> Components:
        """At start-up: keys, secrets and certificates are checked before we listen; errors stop us."""
        srs = rewriter_from_settings(settings.srs)
        if srs is None:
            log.warning("SRS is off ([srs] domain unset): forwarded mail will fail SPF at its "
                        "destination")
        auth = authenticator_from_settings(settings)
        return cls(settings, srs, auth, tls_context(settings.server.tls_cert,
                                                    settings.server.tls_key))

    def reload(self, new: Settings) -> tuple[Components, list[str]]:
        """The parts of ``new`` that load, the old ones where they do not; and what happened.

        Any error keeps the old part: a reload never stops a running server.
        """
        old = self.settings
        applied = old
        notes: list[str] = []
        try:
            srs = rewriter_from_settings(new.srs)
        except Exception as error:  # noqa: BLE001  (kept and logged, whatever it was)
            srs = self.srs
            notes.append(f"SRS kept the old secrets ({_why(error)})")
        else:
            applied = replace(applied, srs=new.srs)
            notes.append("SRS secrets reloaded" if srs is not None else "SRS off")
        try:  # against the running [server] and [delivery]: those need a restart
            auth = authenticator_from_settings(replace(new, server=old.server,
                                                       delivery=old.delivery))
        except Exception as error:  # noqa: BLE001
            auth = self.auth
            notes.append(f"DKIM/ARC kept the old keys ({_why(error)})")
        else:
            applied = replace(applied, dkim=new.dkim, arc=new.arc, auth=new.auth)
            notes.append("DKIM/ARC keys and tables reloaded")
        try:
            tls = tls_context(new.server.tls_cert, new.server.tls_key)
        except (OSError, ssl.SSLError, ValueError) as error:
            tls = self.tls
            notes.append(f"TLS kept the old certificate ({_why(error)})")
            server = replace(applied.server, tls_cert=old.server.tls_cert,
                             tls_key=old.server.tls_key)
        else:
            notes.append("TLS certificate reloaded" if tls is not None else "TLS off")
            server = replace(applied.server, tls_cert=new.server.tls_cert,
                             tls_key=new.server.tls_key)
        server = replace(server, **{key: getattr(new.server, key)
                                    for key in RELOADED_SERVER_KEYS})
        database = replace(applied.database, **{key: getattr(new.database, key)
                                                for key in RELOADED_DATABASE_KEYS})
        applied = replace(applied, server=server, database=database)
        waiting = restart_needed(applied, new)
        if waiting:
            notes.append("a restart is needed for " + ", ".join(waiting))
        return Components(applied, srs, auth, tls), notes


def restart_needed(running: Settings, new: Settings) -> list[str]:
    """``[section] key`` for each change in ``new`` a reload did not apply."""
    changed = []
    for section in ("server", "database", "delivery"):
        now, then = getattr(running, section), getattr(new, section)
        for f in dataclasses.fields(now):
            if getattr(now, f.name) != getattr(then, f.name):
                changed.append(f"[{section}] {f.name}")
    return changed


def apply_log_level(settings: Settings) -> str:
    """``[log]`` again for this process (level, destination, format; a log file reopened
    after rotation); a note for the reload line."""
    configure_logging(settings.log)
    return f"log {settings.log.destination}, level {settings.log.level}"


# ---------------------------------------------------------------- the listeners


class _FromSettings:
    """Build the TLS context from ``[server] tls_cert``/``tls_key`` (the default)."""


FROM_SETTINGS = _FromSettings()


class MailServer:
    """The inbound side: listeners sharing one handler (so client limits are global)."""

    def __init__(self, settings: Settings, table: LookupTable, delivery: Delivery,
                 srs: SrsRewriter | None = None, auth: MessageAuthenticator | None = None, *,
                 tls: ssl.SSLContext | None | _FromSettings = FROM_SETTINGS,
                 limits: ClientLimits | None = None) -> None:
        self.settings = settings
        self.delivery = delivery
        self.handler = SmtpHandler(settings.server, table, delivery, srs, auth,
                                   own_domains=signing_domains(settings))
        server = settings.server
        if limits is not None:
            self.handler.limits = limits
        self.tls = (tls_context(server.tls_cert, server.tls_key)
                    if isinstance(tls, _FromSettings) else tls)
        self.engine = EngineSettings(server.hostname, server.message_size_limit,
                                     server.command_timeout, server.hard_error_limit,
                                     server.forbid_bare_newline)
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[asyncio.Task[None], SmtpConnection] = {}

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def _wire(self) -> Wire:
        return Wire(self._start_session)

    def _start_session(self, wire: Wire) -> None:
        handler = self.handler
        connection = SmtpConnection(handler, self.engine, self.tls, wire)
        if self.closing:  # accepted just before the listeners closed
            connection.close_when_idle()
        task = asyncio.get_running_loop().create_task(self._session(handler, connection))
        self._sessions[task] = connection
        task.add_done_callback(self._session_done)

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self._sessions.pop(task, None)

    async def _session(self, handler: SmtpHandler, connection: SmtpConnection) -> None:
        limits = handler.limits
        if isinstance(limits, SharedLimits):
            ip = connection.wire.peer("peername")[0]
            # no round trip for an exempt client; run() asks limits.connect() before it yields
            await limits.admit(ip)
        await connection.run()

    async def start(self, sockets: Sequence[socket.socket] = ()) -> list[tuple[str, int]]:
        """Listen on ``sockets`` (bound by the supervisor), else bind every listen address;
        return the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        backlog = self.settings.server.listen_backlog
        servers = ([await loop.create_server(self._wire, sock=sock, backlog=backlog)
                    for sock in sockets] if sockets else
                   [await loop.create_server(self._wire, host, port, backlog=backlog)
                    for host, port in self.settings.server.listen_addresses()])
        self._servers.extend(servers)
        return [server.sockets[0].getsockname()[:2] for server in servers]

    def reload(self, components: Components, table: LookupTable | None = None) -> None:
        """New sessions get the new parts (and ``table``, a fresh cache); sessions in
        progress keep the handler they started with.  Connection counts carry over."""
        settings = components.settings
        limits = self.handler.limits
        server = settings.server
        limits.reconfigure(server.client_connection_count_limit,
                           server.client_connection_rate_limit,
                           server.client_connection_rate_time_unit,
                           exceptions=server.limit_exceptions)
        handler = SmtpHandler(server, table if table is not None else self.handler.table,
                              self.delivery, components.srs, components.auth,
                              own_domains=signing_domains(settings))
        handler.limits = limits
        handler.abuse = self.handler.abuse  # issue 15: the [limits] checks carry over
        self.handler = handler
        self.settings = settings
        self.tls = components.tls

    async def drain(self, timeout: float) -> None:
        """Stop accepting; let sessions finish what they are doing, up to ``timeout`` seconds."""
        self.closing = True
        for server in self._servers:
            server.close()
        log.info("draining %d sessions", len(self._sessions))
        for connection in self._sessions.values():
            connection.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._sessions and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._sessions), timeout=left)
        if self._sessions:
            log.warning("drain_timeout (%g s) reached: cutting %d sessions", timeout,
                        len(self._sessions))
        await self.stop()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=CUT_GRACE)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


# ---------------------------------------------------------------- one serving process


class Service:
    """One process that serves: until SIGTERM/SIGINT (drain), reloading on SIGHUP.

    ``sockets`` are the listening sockets bound before (by the supervisor, or
    by ``serve`` before it dropped privileges); without them the process
    binds ``[server] listen`` itself.  ``anvil`` and ``store`` are a worker's
    channels to its supervisor: the shared client connection limits, and
    the shared ``[limits]`` store (``state/shared.py``); without them the
    process counts alone.  ``duplicates``: the duplicate table the supervisor
    mapped for its workers (``state/duplicates.py``).  ``runs_retries``:
    this process runs the spool's retry scheduler (exactly one process per
    spool may).
    """

    def __init__(self, components: Components, config_path: str | None = None, *,
                 sockets: Sequence[socket.socket] = (), anvil: socket.socket | None = None,
                 store: socket.socket | None = None,
                 duplicates: SharedDuplicateTable | None = None,
                 runs_retries: bool = True) -> None:
        self.components = components
        self.config_path = config_path
        self.sockets = sockets
        self.anvil = AnvilClient(anvil) if anvil is not None else None
        self.store_socket = store
        self.duplicates = duplicates
        self.runs_retries = runs_retries
        self.server: MailServer | None = None
        self.abuse: AbuseChecks | None = None  # issue 15: set in run()
        self._table: LookupTable | None = None  # uncached: the caches are put in front of it
        self._stop = asyncio.Event()
        self._reload_pending = False
        self._watcher: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop_requested, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVICE_SIGNALS)  # a worker starts blocked
        settings = self.components.settings
        delivery, scheduler = build_delivery(settings)  # before the table: nothing to close
        self._table = table = await open_table(settings.database, cached=False)
        self.abuse = await abuse_from_settings(settings, self.store_socket,  # [limits], bans
                                               self.duplicates)
        retries: asyncio.Task[None] | None = None
        health = None
        try:
            await self._serve(delivery, table)
            if self.runs_retries:  # one process per spool: retries, and /metrics for all
                retries = loop.create_task(self._retry_loop(scheduler))
                health = await self._start_health(settings)
            await self._stop.wait()
            assert self.server is not None
            deadline = loop.time() + self.components.settings.server.drain_timeout
            await self.server.drain(self.components.settings.server.drain_timeout)
            if retries is not None:
                retries.cancel()
            # attempts in progress and late answers to a final dot get what is left
            await scheduler.close(max(deadline - loop.time(), 0.1))
            await delivery.close(max(deadline - loop.time(), 0.1))
        finally:
            if retries is not None:
                retries.cancel()
            if health is not None:
                await health.stop()
            if self.server is not None:
                await self.server.stop()
            if self._watcher is not None:
                self._watcher.cancel()
            if self.anvil is not None:
                await self.anvil.close()
            await self.abuse.close()  # issue 15
            await table.close()
        log.info("stopped")

    async def _serve(self, delivery: Delivery, table: LookupTable) -> None:
        c = self.components
        limits = None
        if self.anvil is not None:
            await self.anvil.start()
            limits = SharedLimits.for_worker(self.anvil, c.settings.server)
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_supervisor(self.anvil))
        self.server = MailServer(c.settings, cached_table(table, c.settings), delivery, c.srs,
                                 c.auth, tls=c.tls, limits=limits)
        self.server.handler.abuse = self.abuse  # issue 15
        bound = await self.server.start(self.sockets)
        if self.anvil is not None:
            self.anvil.ready()  # the supervisor says "listening" once every worker is
        else:
            for host, port in bound:
                log.info("listening on %s:%d as %s", host, port, c.settings.server.hostname)
        if self._reload_pending:
            self._reload_requested()

    async def _watch_supervisor(self, anvil: AnvilClient) -> None:
        await anvil.lost.wait()
        if not self._stop.is_set():
            log.warning("the supervisor is gone: stopping")
            self._stop.set()

    async def _start_health(self, settings: Settings) -> HealthServer | None:
        """``[metrics] listen``: /metrics, /healthz, /readyz (this process serves them)."""
        if not settings.metrics.listen:
            return None
        from ..ops.health import HealthServer

        health = HealthServer(self._readiness)
        await health.start(*parse_host_port(settings.metrics.listen, "[metrics] listen"))
        return health

    async def _readiness(self) -> list[str]:
        """What keeps us from taking mail: a table that does not answer, a spool we cannot write."""
        problems = []
        if self._stop.is_set():
            problems.append("draining")
        try:
            assert self._table is not None
            await asyncio.wait_for(self._table.domain_is_hosted("readyz.invalid"), READY_TIMEOUT)
        except TimeoutError:
            problems.append("lookup table: no answer in time")
        except TemporaryLookupError as error:
            problems.append(f"lookup table: {error}")
        spool = Path(self.components.settings.delivery.spool_directory)
        if not (spool.is_dir() and os.access(spool, os.W_OK | os.X_OK)):
            problems.append(f"spool {spool}: not writable")
        return problems

    async def _retry_loop(self, scheduler: RetryScheduler) -> None:
        """Start due messages every RETRY_INTERVAL without waiting for slow ones (qmgr)."""
        log.info("retry scheduler started")
        while not self._stop.is_set():
            try:
                await scheduler.dispatch(scheduler.clock())
            except SpoolError as error:  # e.g. the directory became unreadable: keep trying
                log.error("spool scan failed: %s", error)
            try:
                await asyncio.wait_for(self._stop.wait(), RETRY_INTERVAL)
            except TimeoutError:
                pass

    def _stop_requested(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping", sig.name)
            self._stop.set()

    def _reload_requested(self) -> None:
        try:
            self._reload()
        except Exception:  # a reload must never take the server down
            log.exception("reload failed; what was not reloaded yet is kept")

    def _reload(self) -> None:
        if self._stop.is_set():
            log.info("SIGHUP: stopping, nothing reloaded")
            return
        if self.server is None or self._table is None:
            self._reload_pending = True  # still starting: reload once listening
            return
        self._reload_pending = False
        try:
            new = load_settings(self.config_path)
        except (ConfigError, OSError) as error:
            log.error("reload: configuration not loaded, everything kept: %s", error)
            return
        components, notes = self.components.reload(new)
        self.components = components
        self.server.reload(components, cached_table(self._table, components.settings))
        level = apply_log_level(new)
        log.info("reload: %s", "; ".join(["lookup caches flushed", *notes,
                                          *([level] if level else [])]))


async def wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT: how every long-running command stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
