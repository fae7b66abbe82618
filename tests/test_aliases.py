"""Alias lookup and expansion against the real tables, on SQLite and on MariaDB."""

from __future__ import annotations

import pytest

from mailforward import aliases
from mailforward.addresses import parse_mailbox
from mailforward.admin import Admin
from mailforward.aliases import NoDestination, alias_keys, expand_alias, lookup_alias
from mailforward.config import DatabaseSettings
from mailforward.tables import open_admin_database, open_table

from conftest import raw_sql

# ---------------------------------------------------------------- helpers


async def add_aliases(settings: DatabaseSettings, *rows: tuple[str, str]) -> None:
    """Add alias rows through the admin layer (as ``mailforward alias add`` would)."""
    db = await open_admin_database(settings)
    try:
        admin = Admin(db)
        for address, destinations in rows:
            await admin.add_alias(address, destinations)
    finally:
        await db.close()


async def raw_alias(settings: DatabaseSettings, backend: str, row_id: int, address: str,
                    goto: str, domain: str = "example.org") -> None:
    raw_sql(settings, backend,
                  "INSERT INTO alias (id, address, goto, active, domain_id) "
                  f"SELECT {row_id}, '{address}', '{goto}', 1, id FROM domain WHERE name='{domain}'")


async def expand(settings: DatabaseSettings, address: str, delimiter: str = "") -> tuple[str, ...] | None:
    table = await open_table(settings)
    try:
        return await expand_alias(table, parse_mailbox(address), delimiter)
    finally:
        await table.close()


async def lookup(settings: DatabaseSettings, address: str, delimiter: str = "") -> tuple[str, ...] | None:
    table = await open_table(settings)
    try:
        return await lookup_alias(table, parse_mailbox(address), delimiter)
    finally:
        await table.close()


# ---------------------------------------------------------------- alias_keys (no database)


def test_alias_keys_without_delimiter_are_exact_then_catch_all() -> None:
    assert alias_keys(parse_mailbox("User+Ext@Example.ORG"), "") == [
        "user+ext@example.org", "@example.org"]


def test_alias_keys_with_delimiter_are_extension_then_base_then_catch_all() -> None:
    assert alias_keys(parse_mailbox("User+Ext@Example.ORG"), "+") == [
        "user+ext@example.org", "user@example.org", "@example.org"]


def test_alias_keys_strip_only_from_the_first_delimiter() -> None:
    assert alias_keys(parse_mailbox("user+a+b@example.org"), "+")[1] == "user@example.org"


def test_alias_keys_never_produce_an_empty_base() -> None:
    assert alias_keys(parse_mailbox("+ext@example.org"), "+") == ["+ext@example.org", "@example.org"]


# ---------------------------------------------------------------- plain and recursive expansion


async def test_plain_alias_expands_to_its_destinations_in_order(seeded_settings: DatabaseSettings) -> None:
    assert await expand(seeded_settings, "multi@example.org") == ("a@sink.test", "b@sink2.test")


async def test_chain_expands_recursively_to_final_destination(seeded_settings: DatabaseSettings) -> None:
    assert await expand(seeded_settings, "chain@example.org") == ("alice.dest@sink.test",)


async def test_multi_level_chain_expands_to_final_destination(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("top@example.org", "chain@example.org"))
    assert await expand(seeded_settings, "top@example.org") == ("alice.dest@sink.test",)


async def test_chain_across_hosted_domains_is_followed(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("tobob@example.org", "bob@forward.test"))
    assert await expand(seeded_settings, "tobob@example.org") == ("bob@sink.test",)


async def test_mixed_local_and_external_destinations_keep_order(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("mix@example.org", "x@sink.test,chain@example.org,y@sink.test"))
    assert await expand(seeded_settings, "mix@example.org") == (
        "x@sink.test", "alice.dest@sink.test", "y@sink.test")


async def test_upper_case_recipient_is_expanded(seeded_settings: DatabaseSettings) -> None:
    assert await expand(seeded_settings, "CHAIN@Example.ORG") == ("alice.dest@sink.test",)


async def test_destination_in_inactive_domain_is_kept_as_external(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("toghost@example.org", "ghost@inactive.test"))
    assert await expand(seeded_settings, "toghost@example.org") == ("ghost@inactive.test",)


async def test_chain_within_depth_limit_expands(seeded_settings: DatabaseSettings,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aliases, "MAX_DEPTH", 3)
    await add_aliases(seeded_settings, ("d1@example.org", "d2@example.org"),
                      ("d2@example.org", "out@sink.test"))
    assert await expand(seeded_settings, "d1@example.org") == ("out@sink.test",)


async def test_chain_deeper_than_depth_limit_is_a_loop(seeded_settings: DatabaseSettings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aliases, "MAX_DEPTH", 3)
    await add_aliases(seeded_settings, ("d1@example.org", "d2@example.org"),
                      ("d2@example.org", "d3@example.org"), ("d3@example.org", "d4@example.org"),
                      ("d4@example.org", "out@sink.test"))
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "d1@example.org")
    assert caught.value.loop is True


# ---------------------------------------------------------------- dedupe


async def test_destination_reached_by_two_paths_is_kept_once(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings,
                      ("both@example.org", "alice@example.org,chain@example.org,alice.dest@sink.test"))
    assert await expand(seeded_settings, "both@example.org") == ("alice.dest@sink.test",)


async def test_destinations_differing_only_in_local_case_are_kept_once(
        seeded_settings: DatabaseSettings, backend: str) -> None:
    await raw_alias(seeded_settings, backend, 100, "dup@example.org", "x@sink.test,X@SINK.test")
    assert await expand(seeded_settings, "dup@example.org") == ("x@sink.test",)


async def test_invalid_destination_in_table_is_skipped(seeded_settings: DatabaseSettings,
                                                      backend: str) -> None:
    await raw_alias(seeded_settings, backend, 100, "odd@example.org", "not an address,x@sink.test")
    assert await expand(seeded_settings, "odd@example.org") == ("x@sink.test",)


# ---------------------------------------------------------------- cycles


async def test_two_alias_cycle_raises_no_destination_with_loop(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("ping@example.org", "pong@example.org"),
                      ("pong@example.org", "ping@example.org"))
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "ping@example.org")
    assert caught.value.loop is True
    assert "ping@example.org" in str(caught.value)


async def test_cycle_with_an_external_exit_keeps_the_exit(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("ping@example.org", "pong@example.org"),
                      ("pong@example.org", "ping@example.org,exit@sink.test"))
    assert await expand(seeded_settings, "ping@example.org") == ("exit@sink.test",)


async def test_self_reference_plus_external_keeps_only_external(seeded_settings: DatabaseSettings,
                                                                backend: str) -> None:
    await raw_alias(seeded_settings, backend, 100, "self@example.org",
                    "self@example.org,out@sink.test")
    assert await expand(seeded_settings, "self@example.org") == ("out@sink.test",)


async def test_pure_self_reference_raises_no_destination_with_loop(seeded_settings: DatabaseSettings,
                                                                   backend: str) -> None:
    await raw_alias(seeded_settings, backend, 100, "self@example.org", "self@example.org")
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "self@example.org")
    assert caught.value.loop is True


async def test_alias_to_own_extension_is_a_loop_with_delimiter(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("ext@example.org", "ext+more@example.org"))
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "ext@example.org", "+")
    assert caught.value.loop is True


# ---------------------------------------------------------------- dangling chains


async def test_dangling_chain_raises_no_destination_without_loop(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("dangle@example.org", "nobody@example.org"))
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "dangle@example.org")
    assert caught.value.loop is False
    assert "dangle@example.org" in str(caught.value)


async def test_chain_to_inactive_alias_is_dangling(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("tooff@example.org", "off@example.org"))
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "tooff@example.org")
    assert caught.value.loop is False


async def test_dangling_branch_is_dropped_when_another_branch_delivers(
        seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("half@example.org", "nobody@example.org,kept@sink.test"))
    assert await expand(seeded_settings, "half@example.org") == ("kept@sink.test",)


async def test_diamond_onto_dangling_alias_is_not_reported_as_loop(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings,
                      ("fork@example.org", "left@example.org,right@example.org"),
                      ("left@example.org", "nobody@example.org"),
                      ("right@example.org", "nobody@example.org"))
    with pytest.raises(NoDestination) as caught:
        await expand(seeded_settings, "fork@example.org")
    assert caught.value.loop is False


# ---------------------------------------------------------------- catch-all


async def test_catch_all_answers_unknown_local_part(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("@forward.test", "catchall@sink.test"))
    assert await expand(seeded_settings, "who@forward.test") == ("catchall@sink.test",)


async def test_exact_row_beats_catch_all(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("@forward.test", "catchall@sink.test"))
    assert await expand(seeded_settings, "bob@forward.test") == ("bob@sink.test",)


async def test_catch_all_rescues_a_chain_to_unknown_hosted_address(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("@example.org", "catchall@sink.test"),
                      ("dangle@example.org", "nobody@example.org"))
    assert await expand(seeded_settings, "dangle@example.org") == ("catchall@sink.test",)


async def test_catch_all_of_one_domain_does_not_answer_another(seeded_settings: DatabaseSettings) -> None:
    await add_aliases(seeded_settings, ("@forward.test", "catchall@sink.test"))
    assert await expand(seeded_settings, "who@example.org") is None


# ---------------------------------------------------------------- recipient delimiter order


@pytest.fixture
async def delimiter_rows(seeded_settings: DatabaseSettings) -> DatabaseSettings:
    await add_aliases(seeded_settings, ("user+ext@example.org", "ext@sink.test"),
                      ("user@example.org", "base@sink.test"),
                      ("@example.org", "catchall@sink.test"))
    return seeded_settings


async def test_extension_row_beats_base_row(delimiter_rows: DatabaseSettings) -> None:
    assert await lookup(delimiter_rows, "user+ext@example.org", "+") == ("ext@sink.test",)


async def test_base_row_beats_catch_all_for_unknown_extension(delimiter_rows: DatabaseSettings) -> None:
    assert await lookup(delimiter_rows, "user+other@example.org", "+") == ("base@sink.test",)


async def test_catch_all_answers_when_neither_extension_nor_base_row_exists(
        delimiter_rows: DatabaseSettings) -> None:
    assert await lookup(delimiter_rows, "stranger+ext@example.org", "+") == ("catchall@sink.test",)


async def test_without_delimiter_extension_is_not_stripped(delimiter_rows: DatabaseSettings) -> None:
    assert await lookup(delimiter_rows, "user+other@example.org", "") == ("catchall@sink.test",)


async def test_delimiter_order_also_applies_to_expansion(delimiter_rows: DatabaseSettings) -> None:
    assert await expand(delimiter_rows, "user+ext@example.org", "+") == ("ext@sink.test",)
    assert await expand(delimiter_rows, "user+other@example.org", "+") == ("base@sink.test",)


async def test_nested_destination_uses_delimiter_fallback(delimiter_rows: DatabaseSettings) -> None:
    await add_aliases(delimiter_rows, ("list@example.org", "user+list@example.org"))
    assert await expand(delimiter_rows, "list@example.org", "+") == ("base@sink.test",)


# ---------------------------------------------------------------- not an alias


async def test_unknown_address_expands_to_none(seeded_settings: DatabaseSettings) -> None:
    assert await expand(seeded_settings, "nobody@example.org") is None


async def test_unknown_address_looks_up_to_none(seeded_settings: DatabaseSettings) -> None:
    assert await lookup(seeded_settings, "nobody@example.org") is None


async def test_inactive_alias_expands_to_none(seeded_settings: DatabaseSettings) -> None:
    assert await expand(seeded_settings, "off@example.org") is None


async def test_address_in_unhosted_domain_expands_to_none(seeded_settings: DatabaseSettings) -> None:
    assert await expand(seeded_settings, "alice@victim.test") is None
