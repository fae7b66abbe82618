"""The embedded default backend: one SQLite file, no server to run.

Lookups open the file read-only (the server needs only SELECT) through
aiosqlite, which keeps sqlite3's blocking calls off the event loop.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import TemporaryLookupError
from .schema import SQLITE_DDL


class SqliteDatabase:
    """One aiosqlite connection; used for lookups (read-only) and by the admin CLI."""

    placeholder = "?"
    ddl: tuple[str, ...] = SQLITE_DDL

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: str, *, read_only: bool, timeout: float = 5.0) -> SqliteDatabase:
        uri = f"file:{Path(path).absolute()}?mode={'ro' if read_only else 'rwc'}"
        try:
            conn = await aiosqlite.connect(uri, uri=True, timeout=timeout)
            await conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise TemporaryLookupError(f"sqlite {path}: {e}") from e
        return cls(conn)

    async def fetch(self, sql: str, param: Any) -> list[tuple[Any, ...]]:
        params = param if isinstance(param, tuple) else (param,)
        try:
            async with self._conn.execute(sql, params) as cursor:
                return [tuple(row) for row in await cursor.fetchall()]
        except sqlite3.Error as e:
            raise TemporaryLookupError(f"sqlite: {e}") from e

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        await self._conn.execute(sql, params)

    async def commit(self) -> None:
        await self._conn.commit()

    async def rollback(self) -> None:
        await self._conn.rollback()

    async def close(self) -> None:
        await self._conn.close()

    @staticmethod
    def is_duplicate(error: Exception) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error)
