"""Listeners: one asyncio server per ``[server] listen`` address, TLS when configured."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from ..auth.pipeline import MessageAuthenticator, authenticator_from_settings
from ..addresses import normalize_domain
from ..config import Settings
from ..delivery import build_delivery
from ..delivery.base import Delivery
from ..srs import SrsRewriter, rewriter_from_settings
from ..tables import LookupTable, open_table
from .handler import SmtpHandler
from .protocol import SmtpProtocol

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
        self._servers: list[asyncio.Server] = []

    def _protocol(self) -> SmtpProtocol:
        server = self.settings.server
        return SmtpProtocol(self.handler, hostname=server.hostname,
                            message_size_limit=server.message_size_limit,
                            timeout=server.command_timeout,
                            hard_error_limit=server.hard_error_limit, tls_context=self.tls,
                            bare_newline=server.forbid_bare_newline)

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listen address; return the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        bound = []
        for host, port in self.settings.server.listen_addresses():
            server = await loop.create_server(self._protocol, host, port)
            self._servers.append(server)
            bound.append(server.sockets[0].getsockname()[:2])
        return bound

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
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
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter, never content
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
