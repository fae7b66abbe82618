"""Delivery: what happens to a message once the inbound side has accepted its recipients."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from .base import domain_of
from .client import ClientSettings
from .connections import ConnectionCache
from .passthrough import PassThroughDelivery, Router
from .retry import RetryPolicy, RetryScheduler
from .routing import MxRouter
from .spool import Spool

# The scheduler's backstop beyond [delivery] attempt_timeout: a transaction past its final
# dot at the deadline still gets its answer (one command timeout), and a little more.
BACKSTOP_MARGIN = 10.0


def retry_policy(settings: Settings) -> RetryPolicy:
    d = settings.delivery
    return RetryPolicy(d.retry_first, d.retry_max_backoff, d.max_lifetime)


def build_delivery(settings: Settings) -> tuple[PassThroughDelivery, RetryScheduler]:
    """Pass-through delivery by MX (or through ``relay_host``), its spool and retry scheduler.

    The client TLS context is built here, once, for every outbound session.
    On shutdown, after the listeners drained: ``await scheduler.close(grace)``
    then ``await delivery.close(grace)`` (late answers, then the cached sessions).
    """
    d = settings.delivery
    router = Router(MxRouter(d.nameservers, port=d.port, timeout=d.dns_timeout), d.relay_host)
    client = ClientSettings(settings.server.hostname, d.connect_timeout, d.command_timeout)
    spool = Spool(Path(d.spool_directory))
    connections = ConnectionCache(d.connection_cache_size, d.connection_cache_hop_limit,
                                  d.connection_idle_time, d.connection_reuse_time)
    delivery = PassThroughDelivery(router, spool, client, retry_policy(settings),
                                   settings.server.hostname, d.passthrough_timeout,
                                   connections=connections, attempt_timeout=d.attempt_timeout)
    relay = d.relay_host

    def destination_of(recipient: str) -> str:
        return f"[relay] {relay}" if relay else domain_of(recipient)

    scheduler = RetryScheduler(
        spool, retry_policy(settings), delivery.attempt_spooled, delivery.bounce,
        destination_of=destination_of,
        destination_concurrency=d.destination_concurrency_limit,
        total_concurrency=d.total_concurrency_limit,
        attempt_timeout=d.attempt_timeout + d.command_timeout + BACKSTOP_MARGIN)
    return delivery, scheduler
