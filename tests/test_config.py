"""Configuration: TOML file, environment overrides, validation naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailforward.config import SEED_ALIAS_QUERY, build_settings, load_settings, parse_database_url
from mailforward.errors import ConfigError


def test_defaults_are_sqlite_on_loopback_2525() -> None:
    settings = load_settings(environ={})
    assert settings.database.url == "sqlite:///mailforward.db"
    assert settings.server.listen == ("127.0.0.1:2525",)
    assert settings.server.mynetworks == ()
    assert settings.server.message_size_limit == 10_240_000


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "mf.toml"
    path.write_text('[server]\nhostname = "mx.example.net"\nmynetworks = ["10.0.0.0/8"]\n')
    settings = load_settings(path, environ={})
    assert settings.server.hostname == "mx.example.net"
    assert settings.server.mynetworks == ("10.0.0.0/8",)


def test_mailforward_toml_in_working_directory_is_used(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mailforward.toml").write_text('[server]\nhostname = "cwd.example"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).server.hostname == "cwd.example"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "mf.toml"
    path.write_text('[database]\nurl = "sqlite:///a.db"\n')
    settings = load_settings(path, environ={"MAILFORWARD_DATABASE__URL": "mysql://u:p@db1,db2:3307/maildb",
                                            "MAILFORWARD_SERVER__LISTEN": "127.0.0.1:25, [::1]:25",
                                            "MAILFORWARD_DATABASE__CACHE_TTL": "5"})
    assert settings.database.url.startswith("mysql://")
    assert settings.server.listen == ("127.0.0.1:25", "[::1]:25")
    assert settings.database.cache_ttl == 5.0


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\[server\] hostnme: unknown key"):
        build_settings({"server": {"hostnme": "x"}})


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\[srv\]: unknown section"):
        build_settings({"srv": {}})


def test_unknown_environment_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"MAILFORWARD_DATABASE__URI \(environment\): unknown key"):
        load_settings(environ={"MAILFORWARD_DATABASE__URI": "x"})


@pytest.mark.parametrize("raw, key", [
    ({"server": {"message_size_limit": "big"}}, r"\[server\] message_size_limit"),
    ({"server": {"message_size_limit": 0}}, r"\[server\] message_size_limit"),
    ({"server": {"mynetworks": ["not-a-net"]}}, r"\[server\] mynetworks"),
    ({"server": {"listen": ["127.0.0.1"]}}, r"\[server\] listen"),
    ({"database": {"url": "postgres://x/y"}}, r"\[database\] url"),
    ({"database": {"alias_query": "SELECT goto FROM alias"}}, r"\[database\] alias_query"),
    ({"database": {"cache_ttl": True}}, r"\[database\] cache_ttl"),
])
def test_bad_value_is_named(raw: dict[str, dict[str, object]], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_settings(raw)


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"MAILFORWARD_DATABASE__POOL_SIZE \(environment\)"):
        load_settings(environ={"MAILFORWARD_DATABASE__POOL_SIZE": "ten"})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_mysql_url_with_failover_hosts() -> None:
    url = parse_database_url("mariadb://maildb:s%40cret@db1:3306,db2/maildb")
    assert url.scheme == "mysql"
    assert url.user == "maildb" and url.password == "s@cret"
    assert url.hosts == (("db1", 3306), ("db2", 3306))
    assert url.dbname == "maildb"


def test_sqlite_url_relative_and_absolute() -> None:
    assert parse_database_url("sqlite:///mailforward.db").path == "mailforward.db"
    assert parse_database_url("sqlite:////var/lib/mf.db").path == "/var/lib/mf.db"


def test_default_alias_query_is_the_seeds_with_the_key_returned() -> None:
    assert "FROM alias WHERE address=%s AND active=1" in SEED_ALIAS_QUERY


def test_annotated_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "mailforward.example.toml"
    settings = load_settings(example, environ={})
    assert settings.server.listen == ("0.0.0.0:25",)
    assert settings.srs.domain == "fwd.example.net"  # dedicated, never a hosted domain


def test_error_about_an_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^MAILFORWARD_SERVER__MESSAGE_SIZE_LIMIT \(environment\): "):
        load_settings(None, environ={"MAILFORWARD_SERVER__MESSAGE_SIZE_LIMIT": "-5"})


def test_type_error_about_an_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^MAILFORWARD_SERVER__RECIPIENT_LIMIT \(environment\): 'abc'"):
        load_settings(None, environ={"MAILFORWARD_SERVER__RECIPIENT_LIMIT": "abc"})
