"""Bans: added, listed and removed with ``mailforward ban`` (click's CliRunner), enforced by
a running server within ``[limits] ban_cache_ttl``, expiry honoured, all three kinds, on
SQLite and MariaDB; the ban table as an additive migration of the seed's database."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mailforward.config import DatabaseSettings, LimitsSettings
from mailforward.smtpd.abuse import BanCache
from mailforward.tables.bans import Ban, BanReader, BanSet, normalize_ban
from mailforward.tables.schema import MARIADB_DDL, SQLITE_DDL

from conftest import mariadb_execute, raw_sql
from smtp_harness import ServerThread, wait_until
from test_limits import attach_abuse, detach_abuse, refusals, session

TTL = 0.5  # [limits] ban_cache_ttl in these tests
SLACK = 1.5  # scheduling and query time on a busy machine

Cli = Callable[..., Result]


@pytest.fixture
def banning(seeded_database: DatabaseSettings, backend: str) -> DatabaseSettings:
    """The seeded database with no bans (MariaDB's test database outlives one test)."""
    raw_sql(seeded_database, backend, "DELETE FROM ban")
    return seeded_database


@pytest.fixture
def cli(banning: DatabaseSettings) -> Cli:
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(_main(), list(args),
                             env={"MAILFORWARD_DATABASE__URL": banning.url})
    return run


def _main() -> Any:
    from mailforward.cli import main
    return main


@pytest.fixture
def server(banning: DatabaseSettings) -> Iterator[ServerThread]:
    running = ServerThread(banning, recipient_delimiter="+", client_connection_rate_limit=100_000)
    attach_abuse(running, LimitsSettings(ban_cache_ttl=TTL),
                 bans=BanCache(BanReader(banning), TTL))
    yield running
    detach_abuse(running)
    running.close()


def _greeting(server: ServerThread, source: str) -> str:
    """The first reply a client at ``source`` gets: the banner, or a refusal."""
    opened = session(server, source=source)
    try:
        return opened.greeting
    finally:
        opened.__exit__()


def within_ttl(condition: Callable[[], bool], what: str) -> float:
    """Seconds until ``condition`` held; fails unless within the TTL (plus slack)."""
    started = time.monotonic()
    wait_until(condition, TTL + SLACK, what=what, interval=0.05)
    return time.monotonic() - started


# ---------------------------------------------------------------- the three kinds, live


def test_client_ban_added_by_cli_is_enforced_within_the_ttl(server: ServerThread, cli: Cli) -> None:
    assert _greeting(server, "127.0.0.2").startswith("220")
    before = refusals("CONNECT", "banned_client")
    result = cli("ban", "add", "client", "127.0.0.2", "--reason", "flooding aliases")
    assert result.exit_code == 0, result.output
    assert result.output == "added client ban 127.0.0.2 (expires never)\n"
    within_ttl(lambda: _greeting(server, "127.0.0.2") ==
               "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied",
               "the client ban in force")
    assert _greeting(server, "127.0.0.1").startswith("220")  # others are not banned
    assert refusals("CONNECT", "banned_client") > before

    assert cli("ban", "remove", "client", "127.0.0.2").exit_code == 0
    within_ttl(lambda: _greeting(server, "127.0.0.2").startswith("220"), "the ban lifted")


def test_client_network_ban(server: ServerThread, cli: Cli) -> None:
    assert cli("ban", "add", "client", "127.0.0.5/30").exit_code == 0  # 127.0.0.4 - 127.0.0.7
    within_ttl(lambda: _greeting(server, "127.0.0.6").startswith("554 5.7.1"), "network ban")
    assert _greeting(server, "127.0.0.4").startswith("554 5.7.1")
    assert _greeting(server, "127.0.0.8").startswith("220")
    assert json.loads(cli("ban", "list", "--json").output)[0]["value"] == "127.0.0.4/30"


def test_sender_bans_address_and_subdomains(server: ServerThread, cli: Cli) -> None:
    assert cli("ban", "add", "sender", "Spammer@EXT.test").exit_code == 0
    assert cli("ban", "add", "sender", ".bad.test", "--reason", "snowshoe").exit_code == 0
    assert cli("ban", "add", "sender", "@worse.test").exit_code == 0
    before = refusals("MAIL", "banned_sender")

    def mail(sender: str) -> str:
        with session(server) as c:
            return c.command(f"MAIL FROM:<{sender}>")

    within_ttl(lambda: mail("spammer@ext.test").startswith("554"), "the sender ban in force")
    assert mail("spammer@ext.test") == ("554 5.7.1 <spammer@ext.test>: Sender address rejected: "
                                        "Access denied")
    assert mail("x@mx.bad.test").startswith("554 5.7.1 <x@mx.bad.test>")
    assert mail("x@bad.test").startswith("250")  # .bad.test: the subdomains only
    assert mail("x@worse.test").startswith("554 5.7.1")
    assert mail("x@sub.worse.test").startswith("250")  # a domain: itself only
    assert mail("sender@ext.test").startswith("250")
    assert mail("").startswith("250")
    assert refusals("MAIL", "banned_sender") >= before + 3


def test_alias_ban_refuses_at_rcpt(server: ServerThread, cli: Cli) -> None:
    assert cli("ban", "add", "alias", "alice@example.org", "--reason", "spam trap").exit_code == 0
    before = refusals("RCPT", "banned_alias")

    def rcpt(recipient: str) -> str:
        with session(server) as c:
            c.command("MAIL FROM:<sender@ext.test>")
            return c.command(f"RCPT TO:<{recipient}>")

    within_ttl(lambda: rcpt("alice@example.org").startswith("554"), "the alias ban in force")
    assert rcpt("Alice+list@example.org") == ("554 5.7.1 <Alice+list@example.org>: Recipient "
                                              "address rejected: Access denied")
    assert rcpt("multi@example.org").startswith("250")
    assert refusals("RCPT", "banned_alias") >= before + 2


def test_expiry_is_honoured_without_a_refresh(server: ServerThread, cli: Cli) -> None:
    assert cli("ban", "add", "sender", "temp@ext.test", "--expires", "2s").exit_code == 0

    def mail() -> str:
        with session(server) as c:
            return c.command("MAIL FROM:<temp@ext.test>")

    within_ttl(lambda: mail().startswith("554"), "the temporary ban in force")
    started = time.monotonic()
    wait_until(lambda: mail().startswith("250"), 5, what="the ban expired", interval=0.05)
    assert time.monotonic() - started <= 2.5
    listed = cli("ban", "list", "--all", "--json")
    assert [b["in_force"] for b in json.loads(listed.output)] == [False]
    assert cli("ban", "list").output.count("temp@ext.test") == 0  # expired: not in force


def test_bans_are_kept_while_the_table_cannot_be_read(banning: DatabaseSettings, backend: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """No ban table (a database from before this feature): mail flows, one warning; once
    ``db init`` adds the table, bans apply without a restart."""
    raw_sql(banning, backend, "DROP TABLE ban")
    caplog.set_level(logging.INFO)
    running = ServerThread(banning, client_connection_rate_limit=100_000)
    try:
        attach_abuse(running, LimitsSettings(ban_cache_ttl=TTL),
                     bans=BanCache(BanReader(banning), TTL))
        with session(running) as c:
            assert c.command("MAIL FROM:<sender@ext.test>").startswith("250")
        runner = CliRunner()
        env = {"MAILFORWARD_DATABASE__URL": banning.url}
        missing = runner.invoke(_main(), ["ban", "list"], env=env)
        assert missing.exit_code == 2 and "mailforward db init" in missing.output
        assert runner.invoke(_main(), ["db", "init"], env=env).exit_code == 0
        assert runner.invoke(_main(), ["ban", "add", "sender", "sender@ext.test"],
                             env=env).exit_code == 0

        def refused() -> bool:
            with session(running) as c:
                return c.command("MAIL FROM:<sender@ext.test>").startswith("554")
        wait_until(refused, TTL + SLACK, interval=0.05)
    finally:
        detach_abuse(running)
        running.close()
    assert caplog.text.count("cannot read the ban table") == 1
    assert "the ban table can be read again" in caplog.text


# ---------------------------------------------------------------- the CLI itself


def test_ban_cli_add_list_update_remove(cli: Cli) -> None:
    assert cli("ban", "add", "client", "2001:DB8::1/48", "--expires", "2030-01-31").exit_code == 0
    assert cli("ban", "add", "alias", "example.org").exit_code == 0
    listed = json.loads(cli("ban", "list", "--json").output)
    assert [(b["kind"], b["value"], b["expires"]) for b in listed] == [
        ("alias", "example.org", None), ("client", "2001:db8::/48", "2030-01-31T00:00:00Z")]
    updated = cli("ban", "add", "alias", "@Example.ORG", "--reason", "abuse desk ticket 7")
    assert updated.output == "updated alias ban example.org (expires never)\n"
    table = cli("ban", "list", "alias").output.splitlines()
    assert table[0].split() == ["KIND", "VALUE", "EXPIRES", "REASON"]
    assert table[1].split() == ["alias", "example.org", "never", "abuse", "desk", "ticket", "7"]
    assert cli("ban", "remove", "alias", "example.org").output == "removed alias ban example.org\n"
    assert json.loads(cli("ban", "list", "alias", "--json").output) == []


@pytest.mark.parametrize("args, message", [
    (["ban", "add", "client", "300.1.1.1"], "not an IP address or CIDR network"),
    (["ban", "add", "sender", "a@@b"], "invalid sender"),
    (["ban", "add", "client", "192.0.2.1", "--expires", "soon"], "--expires 'soon'"),
    (["ban", "add", "client", "192.0.2.1", "--expires", "2001-01-01"], "in the past"),
    (["ban", "remove", "sender", "nobody@ext.test"], "no sender ban for nobody@ext.test"),
])
def test_ban_cli_refuses_bad_input_with_exit_2(cli: Cli, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_ban_cli_wrong_kind_is_a_usage_error(cli: Cli) -> None:
    assert cli("ban", "add", "helo", "x.test").exit_code == 2


# ---------------------------------------------------------------- the migration


def test_db_init_adds_the_ban_table_and_leaves_the_seed_tables_alone(database_url: str,
                                                                     backend: str) -> None:
    settings = DatabaseSettings(url=database_url)
    if backend == "mariadb":
        dbname = database_url.rsplit("/", 1)[1]
        mariadb_execute(dbname, "DROP TABLE IF EXISTS ban",
                        *[s.replace("IF NOT EXISTS ", "") for s in MARIADB_DDL],
                        "INSERT INTO domain (id, name, active) VALUES (1, 'example.org', 1)",
                        "INSERT INTO alias (id, address, goto, active, domain_id) "
                        "VALUES (1, 'a@example.org', 'a@dest.test', 1, 1)")
    else:
        path = database_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path)
        for statement in SQLITE_DDL:
            conn.execute(statement)
        conn.execute("INSERT INTO domain (id, name, active) VALUES (1, 'example.org', 1)")
        conn.execute("INSERT INTO alias (id, address, goto, active, domain_id) "
                     "VALUES (1, 'a@example.org', 'a@dest.test', 1, 1)")
        conn.commit()
        conn.close()
    before = _seed_tables(backend, database_url)
    runner = CliRunner()
    env = {"MAILFORWARD_DATABASE__URL": settings.url}
    assert runner.invoke(_main(), ["db", "init"], env=env).exit_code == 0
    assert runner.invoke(_main(), ["db", "init"], env=env).exit_code == 0  # twice: harmless
    assert _seed_tables(backend, database_url) == before
    assert runner.invoke(_main(), ["ban", "add", "client", "192.0.2.1"], env=env).exit_code == 0
    assert json.loads(runner.invoke(_main(), ["alias", "list", "--json"], env=env).output)[0][
        "address"] == "a@example.org"


def _seed_tables(backend: str, database_url: str) -> list[Any]:
    """The seed tables' definitions and rows."""
    if backend == "mariadb":
        import pymysql
        dbname = database_url.rsplit("/", 1)[1]
        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database=dbname)
        try:
            with conn.cursor() as cur:
                out: list[Any] = []
                for table in ("domain", "alias"):
                    cur.execute(f"SHOW CREATE TABLE `{table}`")
                    out.append(cur.fetchone())
                    cur.execute(f"SELECT * FROM `{table}` ORDER BY id")
                    out.append(cur.fetchall())
                return out
        finally:
            conn.close()
    lite = sqlite3.connect(database_url.removeprefix("sqlite:///"))
    try:
        out = list(lite.execute("SELECT name, sql FROM sqlite_master WHERE tbl_name IN "
                                "('domain', 'alias') ORDER BY name"))
        out += list(lite.execute("SELECT * FROM domain")) + list(lite.execute("SELECT * FROM alias"))
        return out
    finally:
        lite.close()


# ---------------------------------------------------------------- matching


def test_ban_matching() -> None:
    now = 1_000_000.0
    bans = BanSet([
        Ban("client", "192.0.2.7"), Ban("client", "198.51.100.0/24"),
        Ban("client", "2001:db8::/32"), Ban("client", "203.0.113.9", expires=int(now) - 1),
        Ban("sender", "spam@ext.test"), Ban("sender", ".bad.test"), Ban("sender", "worse.test"),
        Ban("alias", "alice@example.org"), Ban("alias", "closed.example"),
    ])
    assert bans.client("192.0.2.7", now) is not None
    assert bans.client("::ffff:192.0.2.7", now) is not None  # IPv4-mapped, as a dual stack gives it
    assert bans.client("198.51.100.200", now) is not None
    assert bans.client("2001:db8:1::5", now) is not None
    assert bans.client("203.0.113.9", now) is None  # expired
    assert bans.client("192.0.2.8", now) is None
    assert bans.client("not an ip", now) is None
    assert bans.address("sender", ["spam@ext.test"], "ext.test", now) is not None
    assert bans.address("sender", ["x@a.b.bad.test"], "a.b.bad.test", now) is not None
    assert bans.address("sender", ["x@bad.test"], "bad.test", now) is None
    assert bans.address("sender", ["x@worse.test"], "worse.test", now) is not None
    assert bans.address("alias", ["alice@example.org"], "example.org", now) is not None
    assert bans.address("alias", ["x@closed.example"], "closed.example", now) is not None
    assert bans.address("sender", ["alice@example.org"], "example.org", now) is None  # per kind


@pytest.mark.parametrize("kind, text, stored", [
    ("client", " 192.0.2.7 ", "192.0.2.7"),
    ("client", "192.0.2.7/24", "192.0.2.0/24"),
    ("client", "2001:DB8:0::1/128", "2001:db8::1"),
    ("sender", "Who@Bücher.example", "who@xn--bcher-kva.example"),
    ("sender", "@EXAMPLE.net.", "example.net"),
    ("alias", ".Example.NET", ".example.net"),
])
def test_ban_values_are_stored_normalised(kind: str, text: str, stored: str) -> None:
    assert normalize_ban(kind, text) == stored
