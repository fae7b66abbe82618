"""RFC 5321 mailbox parsing and lookup-key normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailforward.addresses import Address, normalize_domain, parse_address, parse_mailbox, strip_source_route
from mailforward.errors import AddressError


def test_domain_is_lower_cased_and_trailing_dot_removed() -> None:
    assert normalize_domain("Example.ORG.") == "example.org"


def test_unicode_domain_is_idna_encoded() -> None:
    assert normalize_domain("Bücher.example") == "xn--bcher-kva.example"


@pytest.mark.parametrize("bad", ["", "-bad.example", "a..b", "bad_host.example", "x" * 64 + ".example"])
def test_invalid_domains_are_refused(bad: str) -> None:
    with pytest.raises(AddressError):
        normalize_domain(bad)


def test_key_lower_cases_local_part() -> None:
    assert parse_mailbox("ALICE@EXAMPLE.ORG").key == "alice@example.org"


def test_quoted_local_part_is_unquoted() -> None:
    address = parse_mailbox('"user@victim.test"@example.org')
    assert address.local == "user@victim.test"
    assert address.is_routed


@pytest.mark.parametrize("text", ["user%victim.test@example.org", "victim.test!user@example.org",
                                  "user@victim.test@example.org"])
def test_routing_operators_mark_the_address_routed(text: str) -> None:
    assert parse_mailbox(text).is_routed


def test_ip_literal_is_canonical() -> None:
    address = parse_mailbox("user@[127.0.0.1]")
    assert address.is_literal and address.domain == "[127.0.0.1]"


def test_source_route_is_stripped() -> None:
    assert strip_source_route("@example.org,@b.test:user@victim.test") == "user@victim.test"


def test_operator_addresses_refuse_routing_tricks() -> None:
    with pytest.raises(AddressError):
        parse_address("user%victim.test@example.org")


def test_operator_addresses_refuse_overlong_local_part() -> None:
    with pytest.raises(AddressError):
        parse_address("a" * 65 + "@example.org")


def test_str_quotes_when_needed() -> None:
    assert str(Address("a b", "example.org")) == '"a b"@example.org'


@given(st.text(max_size=80))
def test_parse_mailbox_raises_only_address_error(text: str) -> None:
    try:
        parse_mailbox(text)
    except AddressError:
        pass
