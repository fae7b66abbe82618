"""The lookup seam: the same behaviour on SQLite and on the real MariaDB."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailforward.addresses import parse_mailbox
from mailforward.aliases import lookup_alias
from mailforward.config import DatabaseSettings
from mailforward.errors import TemporaryLookupError
from mailforward.tables import open_table
from mailforward.tables.cache import CachedTable

from conftest import raw_sql
from smtp_harness import Clock, held_port


async def test_active_domain_is_hosted(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await table.domain_is_hosted("example.org")
    await table.close()


async def test_inactive_and_unknown_domains_are_not_hosted(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert not await table.domain_is_hosted("inactive.test")
    assert not await table.domain_is_hosted("victim.test")
    await table.close()


async def test_alias_destinations_are_split(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await table.alias_destinations("multi@example.org") == ("a@sink.test", "b@sink2.test")
    await table.close()


async def test_inactive_alias_is_not_found(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await table.alias_destinations("off@example.org") is None
    await table.close()


async def test_sender_domain_lookup(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await table.sender_domain_is_hosted("example.org")
    assert not await table.sender_domain_is_hosted("inactive.test")
    assert not await table.sender_domain_is_hosted("ext.test")
    await table.close()


async def test_upper_case_address_finds_alias_after_normalisation(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await lookup_alias(table, parse_mailbox("ALICE@EXAMPLE.ORG")) == ("alice.dest@sink.test",)
    await table.close()


async def test_lookalike_address_never_matches_another_alias(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await lookup_alias(table, parse_mailbox("ålice@example.org")) is None
    assert await lookup_alias(table, parse_mailbox("ALÍCE@example.org")) is None
    await table.close()


async def test_catch_all_answers_after_exact_miss(seeded_settings: DatabaseSettings, backend: str) -> None:
    from mailforward.admin import Admin
    from mailforward.tables import open_admin_database
    db = await open_admin_database(seeded_settings)
    await Admin(db).add_alias("@forward.test", "catchall@sink.test")
    await db.close()
    table = await open_table(seeded_settings)
    assert await lookup_alias(table, parse_mailbox("bob@forward.test")) == ("bob@sink.test",)
    assert await lookup_alias(table, parse_mailbox("who@forward.test")) == ("catchall@sink.test",)
    await table.close()


async def test_recipient_delimiter_falls_back_to_base_address(seeded_settings: DatabaseSettings) -> None:
    table = await open_table(seeded_settings)
    assert await lookup_alias(table, parse_mailbox("alice+news@example.org"), "+") == ("alice.dest@sink.test",)
    assert await lookup_alias(table, parse_mailbox("alice+news@example.org"), "") is None
    await table.close()


async def test_goto_with_spaces_is_tolerated(seeded_settings: DatabaseSettings, backend: str) -> None:
    sql = "UPDATE alias SET goto=' x@sink.test ,  y@sink.test ' WHERE address='alice@example.org'"
    raw_sql(seeded_settings, backend, sql)
    table = await open_table(seeded_settings)
    assert await table.alias_destinations("alice@example.org") == ("x@sink.test", "y@sink.test")
    await table.close()


async def test_goto_separated_by_white_space_only_is_two_destinations(
        seeded_settings: DatabaseSettings, backend: str) -> None:
    sql = "UPDATE alias SET goto='c@sink.test d@sink.test' WHERE address='alice@example.org'"
    raw_sql(seeded_settings, backend, sql)
    table = await open_table(seeded_settings)
    assert await table.alias_destinations("alice@example.org") == ("c@sink.test", "d@sink.test")
    await table.close()


async def test_legacy_mixed_case_row_still_matches(seeded_settings: DatabaseSettings, backend: str) -> None:
    raw_sql(seeded_settings, backend, "UPDATE alias SET address='Alice@Example.org' WHERE id=1")
    table = await open_table(seeded_settings)
    assert await table.alias_destinations("alice@example.org") == ("alice.dest@sink.test",)
    await table.close()


async def test_postfixadmin_style_query_works_by_configuration(seeded_settings: DatabaseSettings) -> None:
    from dataclasses import replace
    settings = replace(seeded_settings,
                       alias_query="SELECT goto FROM alias WHERE address='%s' AND active = '1'")
    table = await open_table(settings)
    assert await table.alias_destinations("alice@example.org") == ("alice.dest@sink.test",)
    await table.close()


async def test_broken_query_is_a_temporary_error(seeded_settings: DatabaseSettings) -> None:
    from dataclasses import replace
    table = await open_table(replace(seeded_settings, domain_query="SELECT 1 FROM nowhere WHERE x=%s"))
    with pytest.raises(TemporaryLookupError):
        await table.domain_is_hosted("example.org")
    await table.close()


async def test_dead_mariadb_port_is_a_temporary_error_within_the_timeout() -> None:
    with held_port() as nothing_listens:
        settings = DatabaseSettings(url=f"mysql://root@127.0.0.1:{nothing_listens}/maildb",
                                    connect_timeout=1, query_timeout=1)
        table = await open_table(settings)
        started = time.monotonic()
        with pytest.raises(TemporaryLookupError):
            await table.domain_is_hosted("example.org")
        assert time.monotonic() - started < 3
        await table.close()


async def test_unresponsive_mariadb_times_out_as_a_temporary_error() -> None:
    # A listener that accepts and never speaks: the MariaDB handshake hangs.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = DatabaseSettings(url=f"mysql://root@127.0.0.1:{port}/maildb", connect_timeout=0.5,
                                query_timeout=0.5)
    table = await open_table(settings)
    started = time.monotonic()
    with pytest.raises(TemporaryLookupError):
        await table.alias_destinations("alice@example.org")
    assert time.monotonic() - started < 2.5
    await table.close()
    server.close()


@pytest.mark.parametrize("backend", ["mariadb"])
async def test_failover_uses_the_second_host(mariadb_database: str, seeded_settings: DatabaseSettings,
                                             backend: str) -> None:
    with held_port() as dead:
        url = f"mysql://root@127.0.0.1:{dead},127.0.0.1:3306/{mariadb_database}"
        table = await open_table(DatabaseSettings(url=url, connect_timeout=1, query_timeout=1))
        assert await table.domain_is_hosted("example.org")
        await table.close()


async def test_missing_sqlite_file_is_a_temporary_error(tmp_path: object) -> None:
    with pytest.raises(TemporaryLookupError):
        await open_table(DatabaseSettings(url=f"sqlite:///{tmp_path}/absent.db"))


class _CountingTable:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def domain_is_hosted(self, domain: str) -> bool:
        self.calls += 1
        if self.fail:
            raise TemporaryLookupError("down")
        return domain == "example.org"

    async def alias_destinations(self, address: str) -> tuple[str, ...] | None:
        return None

    async def sender_domain_is_hosted(self, domain: str) -> bool:
        return False

    async def close(self) -> None:
        pass


async def test_cache_answers_repeat_lookups_until_ttl() -> None:
    clock = Clock(0.0)
    inner = _CountingTable()
    table = CachedTable(inner, ttl=60, negative_ttl=10, clock=clock)
    assert await table.domain_is_hosted("example.org")
    assert await table.domain_is_hosted("example.org")
    assert inner.calls == 1
    clock.now = 61
    assert await table.domain_is_hosted("example.org")
    assert inner.calls == 2


async def test_negative_answers_use_the_negative_ttl() -> None:
    clock = Clock(0.0)
    inner = _CountingTable()
    table = CachedTable(inner, ttl=60, negative_ttl=10, clock=clock)
    assert not await table.domain_is_hosted("other.test")
    clock.now = 11
    assert not await table.domain_is_hosted("other.test")
    assert inner.calls == 2


async def test_temporary_failures_are_never_cached() -> None:
    inner = _CountingTable()
    table = CachedTable(inner, ttl=60, negative_ttl=60)
    inner.fail = True
    with pytest.raises(TemporaryLookupError):
        await table.domain_is_hosted("example.org")
    inner.fail = False
    assert await table.domain_is_hosted("example.org")
