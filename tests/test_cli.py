"""The admin CLI, on both backends, through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mailforward.cli import main
from mailforward.tables.schema import MARIADB_DDL

from conftest import mariadb_execute


@pytest.fixture
def cli(database_url: str):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def run(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(main, list(args), env={"MAILFORWARD_DATABASE__URL": database_url},
                             catch_exceptions=False)
    return run


def test_quick_start_sequence(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("db", "init").exit_code == 0
    assert cli("domain", "add", "example.org").exit_code == 0
    assert cli("alias", "add", "alice@example.org", "alice@dest.test").exit_code == 0
    result = cli("alias", "list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == [
        {"address": "alice@example.org", "destinations": ["alice@dest.test"], "active": True,
         "unusable": []}]


def test_db_init_twice_is_harmless(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("db", "init").exit_code == 0
    assert cli("db", "init").exit_code == 0


@pytest.mark.parametrize("backend", ["mariadb"])
def test_seed_ddl_created_by_hand_works(cli, backend: str, database_url: str) -> None:  # type: ignore[no-untyped-def]
    seed = [s.replace("IF NOT EXISTS ", "") for s in MARIADB_DDL]
    mariadb_execute(database_url.rsplit("/", 1)[1], *seed)
    assert cli("domain", "add", "example.org").exit_code == 0
    assert cli("alias", "add", "alice@example.org", "alice@dest.test").exit_code == 0
    assert cli("alias", "add", "bob@example.org", "bob@dest.test").exit_code == 0
    assert len(json.loads(cli("alias", "list", "--json").output)) == 2


def test_domain_add_is_normalised(cli) -> None:  # type: ignore[no-untyped-def]
    cli("db", "init")
    assert cli("domain", "add", "Example.ORG.").exit_code == 0
    assert json.loads(cli("domain", "list", "--json").output)[0]["name"] == "example.org"


def test_domain_disable_and_enable(cli) -> None:  # type: ignore[no-untyped-def]
    cli("db", "init")
    cli("domain", "add", "example.org")
    assert cli("domain", "disable", "example.org").exit_code == 0
    assert json.loads(cli("domain", "list", "--json").output)[0]["active"] is False
    assert cli("domain", "enable", "example.org").exit_code == 0
    assert json.loads(cli("domain", "list", "--json").output)[0]["active"] is True


def test_alias_disable_enable_remove(cli) -> None:  # type: ignore[no-untyped-def]
    cli("db", "init")
    cli("domain", "add", "example.org")
    cli("alias", "add", "alice@example.org", "a@dest.test")
    assert cli("alias", "disable", "alice@example.org").exit_code == 0
    assert json.loads(cli("alias", "list", "--json").output)[0]["active"] is False
    assert cli("alias", "enable", "ALICE@example.org").exit_code == 0
    assert cli("alias", "remove", "alice@example.org").exit_code == 0
    assert json.loads(cli("alias", "list", "--json").output) == []


def test_alias_list_filters_by_domain(cli) -> None:  # type: ignore[no-untyped-def]
    cli("db", "init")
    cli("domain", "add", "example.org")
    cli("domain", "add", "other.test")
    cli("alias", "add", "alice@example.org", "a@dest.test")
    cli("alias", "add", "bob@other.test", "b@dest.test")
    rows = json.loads(cli("alias", "list", "other.test", "--json").output)
    assert [r["address"] for r in rows] == ["bob@other.test"]


def test_table_output_has_headers(cli) -> None:  # type: ignore[no-untyped-def]
    cli("db", "init")
    cli("domain", "add", "example.org")
    assert "DOMAIN" in cli("domain", "list").output


@pytest.mark.parametrize("args, message", [
    (("domain", "add", "not a domain"), "invalid domain"),
    (("domain", "add", "localhost"), "not a fully qualified"),
    (("alias", "add", "alice@nothere.test", "a@dest.test"), "not hosted"),
    (("alias", "add", "not-an-address", "a@dest.test"), "invalid alias address"),
    (("alias", "add", "bob@example.org", "bad dest"), "invalid destination"),
    (("alias", "add", "bob@example.org", "BOB@example.org"), "point at itself"),
    (("alias", "add", "alice@example.org", "x@dest.test"), "already exists"),
    (("domain", "add", "example.org"), "already exists"),
    (("alias", "remove", "ghost@example.org"), "does not exist"),
    (("domain", "remove", "example.org"), "still has 1 alias"),
    (("domain", "disable", "nothere.test"), "not hosted"),
])
def test_bad_input_exits_2_with_a_reason(cli, args: tuple[str, ...], message: str) -> None:  # type: ignore[no-untyped-def]
    cli("db", "init")
    cli("domain", "add", "example.org")
    cli("alias", "add", "alice@example.org", "a@dest.test")
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    result = CliRunner().invoke(main, ["domain", "list"], env={"MAILFORWARD_SERVER__NOPE": "1"})
    assert result.exit_code == 2
    assert "MAILFORWARD_SERVER__NOPE" in result.output


def test_unreachable_database_exits_1() -> None:
    result = CliRunner().invoke(main, ["domain", "list"],
                                env={"MAILFORWARD_DATABASE__URL": "mysql://root@127.0.0.1:1/x",
                                     "MAILFORWARD_DATABASE__CONNECT_TIMEOUT": "1"})
    assert result.exit_code == 1
    assert "no host answered" in result.output


def test_alias_list_splits_a_goto_on_white_space_as_postfix_does(cli, backend: str,  # type: ignore[no-untyped-def]
                                                                database_url: str) -> None:
    from mailforward.config import DatabaseSettings

    from conftest import raw_sql
    cli("db", "init")
    cli("domain", "add", "example.org")
    raw_sql(DatabaseSettings(url=database_url), backend,
            "INSERT INTO alias (id, address, goto, domain_id, active) "
            "VALUES (901, 'w@example.org', 'c@sink.test d@sink.test', 1, 1)")
    row, = json.loads(cli("alias", "list", "--json").output)
    assert row["destinations"] == ["c@sink.test", "d@sink.test"] and row["unusable"] == []


def test_alias_list_flags_a_destination_it_cannot_use(cli, backend: str,  # type: ignore[no-untyped-def]
                                                      database_url: str) -> None:
    from mailforward.config import DatabaseSettings

    from conftest import raw_sql
    cli("db", "init")
    cli("domain", "add", "example.org")
    raw_sql(DatabaseSettings(url=database_url), backend,
            "INSERT INTO alias (id, address, goto, domain_id, active) "
            "VALUES (902, 'x@example.org', 'ok@sink.test,not-an-address', 1, 1)")
    result = CliRunner().invoke(
        main, ["alias", "list"], env={"MAILFORWARD_DATABASE__URL": database_url})
    assert "x@example.org: destination 'not-an-address' is not an address" in result.stderr


def test_read_only_commands_create_no_database_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "none.db"
    result = CliRunner().invoke(main, ["alias", "list"],
                                env={"MAILFORWARD_DATABASE__URL": f"sqlite:///{path}"})
    assert result.exit_code != 0 and "mailforward db init" in result.output
    assert not path.exists()


@pytest.mark.parametrize("backend", ["mariadb"])
def test_missing_privilege_is_one_line_naming_it(cli, backend: str,  # type: ignore[no-untyped-def]
                                                 database_url: str) -> None:
    """The seed grants the maildb user SELECT and INSERT only: UPDATE must be named, not traced."""
    import uuid
    cli("db", "init")
    cli("domain", "add", "example.org")
    cli("alias", "add", "alice@example.org", "a@dest.test")
    dbname = database_url.rsplit("/", 1)[1]
    user = f"mf_{uuid.uuid4().hex[:8]}"
    mariadb_execute(dbname, f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'",
                    f"GRANT SELECT, INSERT ON `{dbname}`.* TO '{user}'@'%'")
    try:
        result = CliRunner().invoke(main, ["alias", "disable", "alice@example.org"], env={
            "MAILFORWARD_DATABASE__URL": f"mysql://{user}:pw@127.0.0.1:3306/{dbname}"})
    finally:
        mariadb_execute(dbname, f"DROP USER '{user}'@'%'")
    assert result.exit_code != 0
    assert "UPDATE command denied" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
