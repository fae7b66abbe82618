"""Delivery: what happens to a message once the inbound side has accepted its recipients."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from .client import ClientSettings
from .passthrough import PassThroughDelivery, Router
from .retry import RetryPolicy, RetryScheduler
from .routing import MxRouter
from .spool import Spool


def retry_policy(settings: Settings) -> RetryPolicy:
    d = settings.delivery
    return RetryPolicy(d.retry_first, d.retry_max_backoff, d.max_lifetime)


def build_delivery(settings: Settings) -> tuple[PassThroughDelivery, RetryScheduler]:
    """Pass-through delivery by MX (or through ``relay_host``), its spool and retry scheduler."""
    d = settings.delivery
    router = Router(MxRouter(d.nameservers, port=d.port, timeout=d.dns_timeout), d.relay_host)
    client = ClientSettings(settings.server.hostname, d.connect_timeout, d.command_timeout)
    spool = Spool(Path(d.spool_directory))
    delivery = PassThroughDelivery(router, spool, client, retry_policy(settings),
                                   settings.server.hostname, d.passthrough_timeout)
    scheduler = RetryScheduler(spool, retry_policy(settings), delivery.attempt_spooled, delivery.bounce)
    return delivery, scheduler
