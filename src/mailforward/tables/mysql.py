"""MariaDB / MySQL backend for the seed's ``maildb`` schema, unchanged.

Several hosts fail over in the order given, like Postfix's ``hosts =``.
Every way a lookup can go wrong (refused, timed out, connection lost, even a
broken configured query) becomes ``TemporaryLookupError``, so the SMTP layer
answers 451 and nothing bounces during an outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import aiomysql  # type: ignore[import-untyped]
import pymysql

from ..config import DatabaseUrl
from ..errors import DatabasePermissionError, TemporaryLookupError
from .schema import MARIADB_DDL

log = logging.getLogger(__name__)

_DRIVER_ERRORS = (pymysql.err.Error, OSError, asyncio.TimeoutError, EOFError, RuntimeError)


async def connect(url: DatabaseUrl, timeout: float, *, autocommit: bool = True) -> aiomysql.Connection:
    """Connect to the first host that answers; raise TemporaryLookupError when none does."""
    reasons = []
    for host, port in url.hosts:
        try:
            async with asyncio.timeout(timeout):
                return await aiomysql.connect(
                    host=host, port=port, user=url.user, password=url.password, db=url.dbname,
                    connect_timeout=timeout, autocommit=autocommit, charset="utf8mb4")
        except _DRIVER_ERRORS as e:
            reasons.append(f"{host}:{port}: {type(e).__name__}: {e}")
    raise TemporaryLookupError("mysql: no host answered (" + "; ".join(reasons) + ")")


class MysqlPool:
    """A small connection pool running single-parameter SELECTs with a timeout."""

    placeholder = "%s"

    def __init__(self, url: DatabaseUrl, connect_timeout: float, query_timeout: float,
                 size: int) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._slots = asyncio.Semaphore(size)
        self._idle: list[aiomysql.Connection] = []

    async def fetch(self, sql: str, param: str) -> list[tuple[Any, ...]]:
        async with self._slots:
            if self._idle:
                try:
                    return await self._run(self._idle.pop(), sql, param)
                except TemporaryLookupError as e:
                    # An idle connection may have been closed by the server
                    # (wait_timeout); one fresh attempt before giving up.
                    if isinstance(e.__cause__, asyncio.TimeoutError):
                        raise
            conn = await connect(self._url, self._connect_timeout)
            return await self._run(conn, sql, param)

    async def _run(self, conn: aiomysql.Connection, sql: str, param: str) -> list[tuple[Any, ...]]:
        try:
            async with asyncio.timeout(self._query_timeout):
                async with conn.cursor() as cursor:
                    await cursor.execute(sql, (param,))
                    rows = await cursor.fetchall()
        except _DRIVER_ERRORS as e:
            conn.close()
            raise TemporaryLookupError(f"mysql query failed: {type(e).__name__}: {e}") from e
        self._idle.append(conn)
        return [tuple(row) for row in rows]

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class MysqlDatabase:
    """One transactional connection, for the admin CLI."""

    placeholder = "%s"
    ddl: tuple[str, ...] = MARIADB_DDL

    def __init__(self, conn: aiomysql.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, url: DatabaseUrl, timeout: float) -> MysqlDatabase:
        return cls(await connect(url, timeout, autocommit=False))

    async def fetch(self, sql: str, param: Any) -> list[tuple[Any, ...]]:
        params = param if isinstance(param, tuple) else (param,)
        async with self._conn.cursor() as cursor:
            await _checked(cursor.execute(sql, params))
            return [tuple(row) for row in await cursor.fetchall()]

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        async with self._conn.cursor() as cursor:
            await _checked(cursor.execute(sql, params))

    async def commit(self) -> None:
        await self._conn.commit()

    async def rollback(self) -> None:
        await self._conn.rollback()

    async def close(self) -> None:
        self._conn.close()

    @staticmethod
    def is_duplicate(error: Exception) -> bool:
        return isinstance(error, pymysql.err.IntegrityError) and error.args[0] == 1062


# Privilege errors (ER_TABLEACCESS_DENIED, ER_DBACCESS_DENIED, ER_ACCESS_DENIED,
# ER_COLUMNACCESS_DENIED, ER_SPECIFIC_ACCESS_DENIED): the server's own text names
# the command and table, which is what the operator needs to GRANT.
_PRIVILEGE_ERRORS = frozenset({1142, 1044, 1045, 1143, 1227})


async def _checked(statement: Awaitable[Any]) -> Any:
    """Run a statement; a missing privilege becomes one line naming it, not a traceback."""
    try:
        return await statement
    except pymysql.err.MySQLError as e:
        code = e.args[0] if e.args else None
        if code in _PRIVILEGE_ERRORS:
            raise DatabasePermissionError(
                f"the database refused: {e.args[1]} (MariaDB error {code}); "
                "grant that privilege to the database user") from None
        raise
