"""Shared fixtures: a fresh database on each backend (SQLite file, real MariaDB); the
loopback DNS fixtures come from ``smtp_harness``, the tests' one support module."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pymysql
import pytest

from mailforward.admin import Admin
from mailforward.config import DatabaseSettings
from mailforward.tables import open_admin_database

from smtp_harness import ServerThread, dns_zone, loopback_dns, nameserver

__all__ = ["dns_zone", "loopback_dns", "nameserver"]  # the loopback DNS fixtures, for every module

MARIADB_HOST = "127.0.0.1"
MARIADB_PORT = 3306
BACKENDS = ["sqlite", "mariadb"]


def _mariadb_root() -> pymysql.connections.Connection:
    return pymysql.connect(host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="",
                           connect_timeout=3, autocommit=True)


@pytest.fixture(scope="session")
def mariadb_database() -> Iterator[str]:
    """A throw-away database for this test run, dropped at the end."""
    try:
        conn = _mariadb_root()
    except pymysql.err.Error as e:
        if os.environ.get("CI"):
            raise RuntimeError(f"MariaDB at {MARIADB_HOST}:{MARIADB_PORT} is required in CI: {e}") from e
        pytest.skip(f"no MariaDB reachable at {MARIADB_HOST}:{MARIADB_PORT} ({e}); CI is unset")
    name = f"mf_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def mariadb_url(dbname: str) -> str:
    return f"mysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{dbname}"


def reset_mariadb(dbname: str) -> None:
    conn = _mariadb_root()
    with conn.cursor() as cur:
        cur.execute(f"USE `{dbname}`")
        cur.execute("DROP TABLE IF EXISTS alias")
        cur.execute("DROP TABLE IF EXISTS domain")
    conn.close()


def mariadb_execute(dbname: str, *statements: str) -> None:
    conn = _mariadb_root()
    with conn.cursor() as cur:
        cur.execute(f"USE `{dbname}`")
        for statement in statements:
            cur.execute(statement)
    conn.close()


def raw_sql(settings: DatabaseSettings, backend: str, sql: str) -> None:
    """Write a row directly, bypassing the admin layer's validation."""
    if backend == "mariadb":
        mariadb_execute(settings.url.rsplit("/", 1)[1], sql)
        return
    import sqlite3
    conn = sqlite3.connect(settings.url.removeprefix("sqlite:///"))
    conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database (no tables) on the backend under test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/mailforward.db"
    dbname = request.getfixturevalue("mariadb_database")
    reset_mariadb(dbname)
    return mariadb_url(dbname)


@pytest.fixture
def db_settings(database_url: str) -> DatabaseSettings:
    return DatabaseSettings(url=database_url, connect_timeout=2, query_timeout=2,
                            cache_ttl=0, negative_cache_ttl=0)


async def seed_reference_data(settings: DatabaseSettings) -> None:
    """The reference stack's test rows (shared/peer/schema.sql), through the admin layer."""
    db = await open_admin_database(settings)
    admin = Admin(db)
    try:
        await admin.init_schema()
        for name in ("example.org", "inactive.test", "forward.test"):
            await admin.add_domain(name)
        await admin.set_domain_active("inactive.test", False)
        await admin.add_alias("alice@example.org", "alice.dest@sink.test")
        await admin.add_alias("multi@example.org", "a@sink.test,b@sink2.test")
        await admin.add_alias("off@example.org", "off.dest@sink.test")
        await admin.set_alias_active("off@example.org", False)
        await admin.add_alias("bob@forward.test", "bob@sink.test")
        await admin.add_alias("chain@example.org", "alice@example.org")
        await admin.add_alias("ghost@inactive.test", "ghost@sink.test")
    finally:
        await db.close()


@pytest.fixture
async def seeded_settings(db_settings: DatabaseSettings) -> AsyncIterator[DatabaseSettings]:
    await seed_reference_data(db_settings)
    yield db_settings


@pytest.fixture
def seeded_database(db_settings: DatabaseSettings) -> DatabaseSettings:
    """The reference rows, seeded synchronously (for tests that run servers in threads)."""
    import asyncio
    asyncio.run(seed_reference_data(db_settings))
    return db_settings


@pytest.fixture
def smtp_server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    server = ServerThread(seeded_database)
    yield server
    server.close()
