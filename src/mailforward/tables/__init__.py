"""Lookup tables: open the configured backend behind the one interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..config import DatabaseSettings, parse_database_url
from ..errors import DatabaseMissing
from .base import LookupTable, TemporaryLookupError
from .cache import CachedTable
from .mysql import MysqlDatabase, MysqlPool
from .sql import SqlTable
from .sqlite import SqliteDatabase

__all__ = ["AdminDatabase", "LookupTable", "TemporaryLookupError", "open_admin_database",
           "open_table"]


class AdminDatabase(Protocol):
    """What the admin CLI needs from a backend: a transactional connection."""

    placeholder: str
    ddl: tuple[str, ...]

    async def fetch(self, sql: str, param: Any) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...
    async def close(self) -> None: ...
    def is_duplicate(self, error: Exception) -> bool: ...


async def open_table(settings: DatabaseSettings, *, cached: bool = True) -> LookupTable:
    """The server's read-only lookup table for ``[database] url``, cached unless told not to."""
    url = parse_database_url(settings.url)
    table: LookupTable
    if url.scheme == "sqlite":
        db = await SqliteDatabase.open(url.path, read_only=True, timeout=settings.query_timeout)
        table = SqlTable(db, settings, db.placeholder)
    else:
        pool = MysqlPool(url, settings.connect_timeout, settings.query_timeout, settings.pool_size)
        table = SqlTable(pool, settings, pool.placeholder)
    if cached:
        table = CachedTable(table, settings.cache_ttl, settings.negative_cache_ttl)
    return table


async def open_admin_database(settings: DatabaseSettings, *,
                              read_only: bool = False) -> AdminDatabase:
    """The admin CLI's connection.  ``read_only``: the listing commands, which must not
    create an empty SQLite file where none was."""
    url = parse_database_url(settings.url)
    if url.scheme == "sqlite":
        if read_only and not Path(url.path).exists():
            raise DatabaseMissing(f"no database at {url.path}: run 'mailforward db init' first")
        return await SqliteDatabase.open(url.path, read_only=read_only,
                                         timeout=settings.query_timeout)
    return await MysqlDatabase.open(url, settings.connect_timeout)
