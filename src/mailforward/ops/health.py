"""``[metrics] listen``: Prometheus text at ``/metrics``, ``/healthz`` and ``/readyz``.

A deliberately tiny HTTP/1.0 server on the event loop (GET only, one request
per connection, bounded request size and time): a load balancer or
Kubernetes asks ``/readyz`` (tables reachable, spool writable) before sending
mail our way, and ``/healthz`` only says the process is up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from .metrics import instruments

log = logging.getLogger("mailforward.ops")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0

Readiness = Callable[[], Awaitable[list[str]]]
"""Returns what is not ready (empty: ready)."""


def metrics_text() -> bytes:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    instruments()  # every series is listed, at zero, from the first scrape
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


class HealthServer:
    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port)
        bound = self.server.sockets[0].getsockname()
        log.info("metrics and health on http://%s:%d/", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._answer(head[:MAX_REQUEST])
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError,
                ConnectionError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, metrics_text()
        if path == b"/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == b"/readyz":
            problems = await self.readiness()
            if problems:
                return ("503 Service Unavailable", "text/plain",
                        ("not ready: " + "; ".join(problems) + "\n").encode())
            return "200 OK", "text/plain", b"ready\n"
        return "404 Not Found", "text/plain", b"not found\n"
