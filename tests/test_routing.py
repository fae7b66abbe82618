"""MX routing against a real DNS server on loopback (tests/dns_server.py).

Never the machine's resolver: every router here names the loopback server.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from mailforward.delivery.routing import (
    MxRouter,
    NextHop,
    PermanentRoutingError,
    RoutingError,
    TemporaryRoutingError,
    parse_relayhost,
)
from mailforward.errors import ConfigError, MailforwardError
from mailforward.smtpd.replies import Reply

from dns_server import LoopbackDNSServer, SilentNameserver, ZoneResolver

ZONE = """
pref.test.              300 IN MX 20 mx-b.pref.test.
pref.test.              300 IN MX 10 mx-a.pref.test.
mx-a.pref.test.         300 IN A 192.0.2.1
mx-b.pref.test.         300 IN A 192.0.2.2

multi.test.             300 IN MX 30 mx3.multi.test.
multi.test.             300 IN MX 10 mx1.multi.test.
multi.test.             300 IN MX 20 mx2.multi.test.
mx1.multi.test.         300 IN A 198.51.100.1
mx2.multi.test.         300 IN A 198.51.100.2
mx3.multi.test.         300 IN A 198.51.100.3

tie.test.               300 IN MX 10 one.tie.test.
tie.test.               300 IN MX 10 two.tie.test.
tie.test.               300 IN MX 10 three.tie.test.
tie.test.               300 IN MX 20 backup.tie.test.
one.tie.test.           300 IN A 203.0.113.1
two.tie.test.           300 IN A 203.0.113.2
three.tie.test.         300 IN A 203.0.113.3
backup.tie.test.        300 IN A 203.0.113.9

dual.test.              300 IN MX 10 mx.dual.test.
mx.dual.test.           300 IN AAAA 2001:db8::25
mx.dual.test.           300 IN A 192.0.2.25

shared.test.            300 IN MX 10 a.shared.test.
shared.test.            300 IN MX 20 b.shared.test.
a.shared.test.          300 IN A 192.0.2.50
b.shared.test.          300 IN A 192.0.2.50
b.shared.test.          300 IN A 192.0.2.51

implicit.test.          300 IN A 192.0.2.80
implicit.test.          300 IN AAAA 2001:db8::80
implicit.test.          300 IN TXT "v=spf1 -all"

null.test.              300 IN MX 0 .

dead.test.              300 IN TXT "no mail here"

halfbroken.test.        300 IN MX 10 nowhere.halfbroken.test.
halfbroken.test.        300 IN MX 20 mx.halfbroken.test.
mx.halfbroken.test.     300 IN A 192.0.2.30

allbroken.test.         300 IN MX 10 nowhere.allbroken.test.
allbroken.test.         300 IN MX 20 noaddress.allbroken.test.
noaddress.allbroken.test. 300 IN TXT "exists, no address"

flaky.test.             300 IN MX 10 nowhere.flaky.test.
flaky.test.             300 IN MX 20 mx.flaky.test.

smarthost.test.         300 IN A 192.0.2.99
smarthost.test.         300 IN MX 10 mx.smarthost.test.
mx.smarthost.test.      300 IN A 192.0.2.100
"""
SERVFAIL = ["broken.test", "mx.flaky.test"]
# ZONE and SERVFAIL are served on loopback: fixtures ``loopback_dns`` and ``dns_zone`` (its resolver).


@pytest.fixture
def router(loopback_dns: LoopbackDNSServer) -> MxRouter:
    return MxRouter([loopback_dns.nameserver], timeout=2.0, rng=random.Random(7))


@pytest.fixture
def silent() -> Iterator[SilentNameserver]:
    with SilentNameserver() as nameserver:
        yield nameserver


def hosts(hops: list[NextHop]) -> list[str]:
    return [hop.host for hop in hops]


# --- MX order


async def test_mx_hosts_come_in_preference_order(router: MxRouter) -> None:
    assert await router.next_hops("pref.test") == [
        NextHop("mx-a.pref.test", "192.0.2.1", 25),
        NextHop("mx-b.pref.test", "192.0.2.2", 25),
    ]


async def test_several_preferences_are_sorted_numerically(router: MxRouter) -> None:
    assert hosts(await router.next_hops("multi.test")) == [
        "mx1.multi.test", "mx2.multi.test", "mx3.multi.test"]


async def test_equal_preference_hosts_all_precede_the_backup(router: MxRouter) -> None:
    found = hosts(await router.next_hops("tie.test"))
    assert sorted(found[:3]) == ["one.tie.test", "three.tie.test", "two.tie.test"]
    assert found[3] == "backup.tie.test"


async def test_tie_order_is_reproducible_with_a_seeded_rng(
        loopback_dns: LoopbackDNSServer) -> None:
    def seeded() -> MxRouter:
        return MxRouter([loopback_dns.nameserver], timeout=2.0, rng=random.Random(42))
    assert await seeded().next_hops("tie.test") == await seeded().next_hops("tie.test")


async def test_tie_order_varies_with_the_rng(loopback_dns: LoopbackDNSServer) -> None:
    orders = set()
    for seed in range(12):
        router = MxRouter([loopback_dns.nameserver], timeout=2.0, rng=random.Random(seed))
        orders.add(tuple(hosts(await router.next_hops("tie.test"))[:3]))
    assert len(orders) > 1


# --- addresses


async def test_mx_host_yields_ipv4_then_ipv6(router: MxRouter) -> None:
    assert await router.next_hops("dual.test") == [
        NextHop("mx.dual.test", "192.0.2.25", 25),
        NextHop("mx.dual.test", "2001:db8::25", 25),
    ]


async def test_an_address_shared_by_two_mx_hosts_is_listed_once(router: MxRouter) -> None:
    assert await router.next_hops("shared.test") == [
        NextHop("a.shared.test", "192.0.2.50", 25),
        NextHop("b.shared.test", "192.0.2.51", 25),
    ]


async def test_hops_carry_the_routers_port(loopback_dns: LoopbackDNSServer) -> None:
    router = MxRouter([loopback_dns.nameserver], port=2525, timeout=2.0)
    assert {hop.port for hop in await router.next_hops("multi.test")} == {2525}


async def test_domain_is_matched_case_insensitively_with_trailing_dot(
        router: MxRouter) -> None:
    assert hosts(await router.next_hops("PREF.Test.")) == ["mx-a.pref.test", "mx-b.pref.test"]


async def test_no_mx_falls_back_to_the_domains_own_addresses(router: MxRouter) -> None:
    assert await router.next_hops("implicit.test") == [
        NextHop("implicit.test", "192.0.2.80", 25),
        NextHop("implicit.test", "2001:db8::80", 25),
    ]


async def test_mx_host_without_address_is_skipped(router: MxRouter) -> None:
    assert await router.next_hops("halfbroken.test") == [
        NextHop("mx.halfbroken.test", "192.0.2.30", 25)]


# --- permanent failures


async def test_null_mx_is_a_permanent_failure(router: MxRouter) -> None:
    with pytest.raises(PermanentRoutingError) as caught:
        await router.next_hops("null.test")
    assert caught.value.reply == Reply(
        556, "5.1.10", "<null.test>: Domain does not accept mail (null MX)")


async def test_nxdomain_is_a_permanent_failure(router: MxRouter) -> None:
    with pytest.raises(PermanentRoutingError) as caught:
        await router.next_hops("missing.test")
    assert caught.value.reply == Reply(
        550, "5.1.2", "<missing.test>: Host or domain name not found. "
                      "Name service error for name=missing.test type=MX: Host not found")


async def test_no_mx_and_no_address_is_a_permanent_failure(router: MxRouter) -> None:
    with pytest.raises(PermanentRoutingError) as caught:
        await router.next_hops("dead.test")
    assert caught.value.reply.code == 550
    assert caught.value.reply.status == "5.1.2"
    assert "name=dead.test type=A: Host found but no data record" in caught.value.reply.text


async def test_no_mx_host_resolving_is_a_permanent_failure(router: MxRouter) -> None:
    with pytest.raises(PermanentRoutingError) as caught:
        await router.next_hops("allbroken.test")
    assert (caught.value.reply.code, caught.value.reply.status) == (550, "5.4.4")
    assert caught.value.reply.text.startswith("<allbroken.test>: Host or domain name not found.")


async def test_invalid_address_literal_is_a_permanent_failure(router: MxRouter) -> None:
    with pytest.raises(PermanentRoutingError):
        await router.next_hops("[300.1.2.3]")


# --- temporary failures


async def test_servfail_is_a_temporary_failure(router: MxRouter) -> None:
    with pytest.raises(TemporaryRoutingError) as caught:
        await router.next_hops("broken.test")
    assert caught.value.reply == Reply(
        451, "4.4.3", "<broken.test>: Host or domain name not found. "
                      "Name service error for name=broken.test type=MX: Host not found, try again")


async def test_timeout_is_a_temporary_failure(silent: SilentNameserver) -> None:
    router = MxRouter([silent.nameserver], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TemporaryRoutingError) as caught:
        await router.next_hops("pref.test")
    assert time.monotonic() - started < 3
    assert caught.value.reply.is_temporary


async def test_unresolved_mx_hosts_with_one_servfail_are_a_temporary_failure(
        router: MxRouter) -> None:
    with pytest.raises(TemporaryRoutingError) as caught:
        await router.next_hops("flaky.test")
    assert "name=mx.flaky.test type=A: Host not found, try again" in caught.value.reply.text


async def test_a_silent_nameserver_is_passed_over_for_the_next(
        silent: SilentNameserver, loopback_dns: LoopbackDNSServer) -> None:
    router = MxRouter([silent.nameserver, loopback_dns.nameserver], timeout=1.0)
    assert hosts(await router.next_hops("pref.test")) == ["mx-a.pref.test", "mx-b.pref.test"]


async def test_routing_errors_are_mailforward_errors() -> None:
    assert issubclass(PermanentRoutingError, RoutingError)
    assert issubclass(TemporaryRoutingError, RoutingError)
    assert issubclass(RoutingError, MailforwardError)


# --- literals and relay hosts


async def test_ip_literal_is_used_without_dns(router: MxRouter, dns_zone: ZoneResolver) -> None:
    before = len(dns_zone.queries)
    assert await router.next_hops("[192.0.2.7]") == [NextHop("192.0.2.7", "192.0.2.7", 25)]
    assert len(dns_zone.queries) == before


async def test_ipv6_literal_is_used_without_dns(router: MxRouter) -> None:
    assert await router.next_hops("[IPv6:2001:DB8::7]") == [
        NextHop("2001:db8::7", "2001:db8::7", 25)]


async def test_bracketed_relayhost_skips_the_mx_lookup(
        router: MxRouter, dns_zone: ZoneResolver) -> None:
    assert await router.relay_hops("[smarthost.test]:587") == [
        NextHop("smarthost.test", "192.0.2.99", 587)]
    assert ("smarthost.test", "MX") not in dns_zone.queries


async def test_unbracketed_relayhost_uses_its_mx(router: MxRouter) -> None:
    assert await router.relay_hops("smarthost.test:587") == [
        NextHop("mx.smarthost.test", "192.0.2.100", 587)]


async def test_relayhost_without_port_uses_the_routers_port(router: MxRouter) -> None:
    assert await router.relay_hops("[smarthost.test]") == [
        NextHop("smarthost.test", "192.0.2.99", 25)]


async def test_relayhost_ip_literal_is_used_without_dns(router: MxRouter) -> None:
    assert await router.relay_hops("[IPv6:::1]:2525") == [NextHop("::1", "::1", 2525)]


async def test_unknown_bracketed_relayhost_is_a_permanent_failure(router: MxRouter) -> None:
    with pytest.raises(PermanentRoutingError) as caught:
        await router.relay_hops("[missing.test]")
    assert "name=missing.test type=A: Host not found" in caught.value.reply.text


# --- configuration syntax


@pytest.mark.parametrize("text", ["ns.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1"])
def test_bad_nameserver_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        MxRouter([text])


@pytest.mark.parametrize(("text", "expected"), [
    ("[relay.example]:587", ("relay.example", 587, True)),
    ("relay.example:587", ("relay.example", 587, False)),
    ("Relay.Example", ("relay.example", 25, False)),
    ("[192.0.2.1]", ("192.0.2.1", 25, True)),
    ("[IPv6:2001:db8::1]:26", ("2001:db8::1", 26, True)),
])
def test_relayhost_syntax(text: str, expected: tuple[str, int, bool]) -> None:
    assert parse_relayhost(text) == expected


@pytest.mark.parametrize("text", ["[relay.example", "relay.example:99999", "[relay]x", ""])
def test_bad_relayhost_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_relayhost(text)
