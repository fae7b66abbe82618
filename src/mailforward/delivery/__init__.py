"""Delivery: what happens to a message once the inbound side has accepted its recipients."""

from __future__ import annotations

from ..config import Settings
from .base import Delivery
from .relay import RelayDelivery, UnroutedDelivery


def build_delivery(settings: Settings) -> Delivery:
    d = settings.delivery
    if d.relay_host:
        host, port = d.relay_address()
        return RelayDelivery(host, port, settings.server.hostname, d.connect_timeout,
                             d.command_timeout)
    return UnroutedDelivery()
