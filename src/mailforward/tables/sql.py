"""A lookup table answered by SQL queries, shared by the SQLite and MariaDB backends."""

from __future__ import annotations

from typing import Any

from ..addresses import normalize_domain
from ..config import DatabaseSettings
from ..errors import AddressError
from ..ops.metrics import lookup_timer
from .base import QueryRunner, split_destinations


def prepare_query(query: str, placeholder: str) -> str:
    """Turn the configured query (``%s`` or ``%d``, optionally quoted as Postfix writes it)
    into the driver's placeholder, so the key is always bound, never interpolated."""
    for token in ("'%s'", "'%d'", "%s", "%d"):
        query = query.replace(token, placeholder)
    return query


def stored_key(value: str) -> str:
    """Normalise an address as stored in the table, for comparison with a lookup key."""
    local, at, domain = value.strip().rpartition("@")
    if not at:
        return value.strip().lower()
    try:
        domain = normalize_domain(domain)
    except AddressError:
        domain = domain.lower()
    return f"{local.lower()}@{domain}"


class SqlTable:
    """The three seed lookups over any :class:`QueryRunner`.

    The alias query may return the stored address as a second column; when it
    does, a row whose address is not exactly the key is ignored.  That keeps a
    case- and accent-insensitive collation (MariaDB's utf8mb4 default) from
    letting ``ålice@example.org`` reach ``alice@example.org``.
    """

    def __init__(self, runner: QueryRunner, settings: DatabaseSettings, placeholder: str) -> None:
        self._runner = runner
        self._domain_query = prepare_query(settings.domain_query, placeholder)
        self._alias_query = prepare_query(settings.alias_query, placeholder)
        self._sender_query = prepare_query(settings.sender_domain_query, placeholder)

    async def _fetch(self, kind: str, query: str, key: str) -> list[tuple[Any, ...]]:
        """One query, timed and counted per kind (``ops.metrics``)."""
        with lookup_timer(kind):
            return await self._runner.fetch(query, key)

    async def domain_is_hosted(self, domain: str) -> bool:
        return bool(await self._fetch("domain", self._domain_query, domain))

    async def alias_destinations(self, address: str) -> tuple[str, ...] | None:
        rows = await self._fetch("alias", self._alias_query, address)
        destinations: list[str] = []
        for row in rows:
            if len(row) > 1 and stored_key(_text(row[1])) != address:
                continue
            destinations.extend(split_destinations(_text(row[0])))
        return tuple(destinations) if destinations else None

    async def sender_domain_is_hosted(self, domain: str) -> bool:
        return bool(await self._fetch("sender_domain", self._sender_query, domain))

    async def close(self) -> None:
        await self._runner.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
