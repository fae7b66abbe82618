"""Listeners: one asyncio server per ``[server] listen`` address, TLS when configured."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from ..addresses import normalize_domain
from ..auth.pipeline import MessageAuthenticator, authenticator_from_settings
from ..config import Settings
from ..delivery import build_delivery
from ..delivery.base import Delivery
from ..srs import SrsRewriter, rewriter_from_settings
from ..tables import LookupTable, open_table
from .engine import EngineSettings, SmtpConnection, Wire
from .handler import SmtpHandler

log = logging.getLogger("mailforward.smtpd")

RETRY_INTERVAL = 10.0  # seconds between looks at the spool for due messages


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


class MailServer:
    """The inbound side: listeners sharing one handler (so client limits are global)."""

    def __init__(self, settings: Settings, table: LookupTable, delivery: Delivery,
                 srs: SrsRewriter | None = None, auth: MessageAuthenticator | None = None) -> None:
        self.settings = settings
        self.handler = SmtpHandler(settings.server, table, delivery, srs, auth,
                                   own_domains=signing_domains(settings))
        self.tls = tls_context(settings.server.tls_cert, settings.server.tls_key)
        server = settings.server
        self.engine = EngineSettings(server.hostname, server.message_size_limit,
                                     server.command_timeout, server.hard_error_limit,
                                     server.forbid_bare_newline)
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()

    def _wire(self) -> Wire:
        return Wire(self._start_session)

    def _start_session(self, wire: Wire) -> None:
        connection = SmtpConnection(self.handler, self.engine, self.tls, wire)
        task = asyncio.get_running_loop().create_task(connection.run())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listen address; return the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        bound = []
        for host, port in self.settings.server.listen_addresses():
            server = await loop.create_server(self._wire, host, port,
                                              backlog=self.settings.server.listen_backlog)
            self._servers.append(server)
            bound.append(server.sockets[0].getsockname()[:2])
        return bound

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=5)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


async def wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT: how every long-running command stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run(settings: Settings) -> None:
    """``mailforward serve``: listen until SIGTERM or SIGINT."""
    srs = rewriter_from_settings(settings.srs)
    if srs is None:
        log.warning("SRS is off ([srs] domain unset): forwarded mail will fail SPF at its destination")
    auth = authenticator_from_settings(settings)  # keys and tables are checked before we listen
    delivery, scheduler = build_delivery(settings)  # before the table: nothing to close if it fails
    table = await open_table(settings.database)
    retries = asyncio.create_task(scheduler.run_forever(RETRY_INTERVAL))
    server = MailServer(settings, table, delivery, srs, auth)
    try:
        for host, port in await server.start():
            log.info("listening on %s:%d as %s", host, port, settings.server.hostname)
        await wait_for_signal()
        log.info("stopping")
    finally:
        await server.stop()
        retries.cancel()
        await table.close()
