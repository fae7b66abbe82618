"""``mailforward.dns``: one resolver module, one error policy, for every DNS consumer.

NXDOMAIN and NODATA are answers ("not there"); timeout, SERVFAIL, REFUSED
and anything else raise ``DnsTemporaryError``.  Each consumer (routing, the
verifier's SPF/DKIM/DMARC, ``check``) is shown to turn a REFUSED answer into
its own "temporary" outcome, never into "not there".  Everything resolves
against a DNS server on loopback, never the machine's resolver.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from mailforward.auth.verify import Verifier
from mailforward.delivery.routing import MxRouter, TemporaryRoutingError
from mailforward.dns import (
    Answer,
    CacheOnlyResolver,
    DnsTemporaryError,
    make_resolver,
    make_sync_resolver,
    parse_nameserver,
    resolve,
    resolve_sync,
    txt_records,
    txt_records_sync,
)
from mailforward.dnstools import check_dmarc
from mailforward.errors import ConfigError, MailforwardError

from dns_server import SilentNameserver

TIMEOUT = 2.0
# The module's loopback DNS (the ``nameserver`` fixture) serves ZONE; these names get
# REFUSED (a server not serving them) and SERVFAIL.
REFUSED = ("refused.test", "_dmarc.refused.test", "sel._domainkey.refused.test")
SERVFAIL = ("servfail.test",)

ZONE = """
here.test.          300 IN A 192.0.2.1
here.test.          300 IN TXT "first" "second"
here.test.          300 IN TXT "other"
sender.test.        300 IN TXT "v=spf1 -all"
"""


def lookup_sync(nameserver: str, name: str, rdtype: str) -> Answer:
    return resolve_sync(make_sync_resolver([nameserver], TIMEOUT), name, rdtype)


def lookup_async(nameserver: str, name: str, rdtype: str) -> Answer:
    return asyncio.run(resolve(make_resolver([nameserver], TIMEOUT), name, rdtype))


Lookup = Callable[[str, str, str], Answer]
LOOKUPS = [pytest.param(lookup_sync, id="sync"), pytest.param(lookup_async, id="async")]


# --- the policy, in both variants


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_records_found_are_returned(lookup: Lookup, nameserver: str) -> None:
    answer = lookup(nameserver, "here.test", "A")
    assert [rd.to_text() for rd in answer.records] == ["192.0.2.1"]


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_nxdomain_is_an_empty_answer_marked_nxdomain(lookup: Lookup, nameserver: str) -> None:
    assert lookup(nameserver, "nowhere.test", "A") == Answer(
        "nowhere.test", "A", (), nxdomain=True)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_nodata_is_an_empty_answer_not_marked_nxdomain(lookup: Lookup, nameserver: str) -> None:
    assert lookup(nameserver, "here.test", "MX") == Answer(
        "here.test", "MX", (), nxdomain=False)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_servfail_raises_dns_temporary_error(lookup: Lookup, nameserver: str) -> None:
    with pytest.raises(DnsTemporaryError, match="SERVFAIL"):
        lookup(nameserver, "servfail.test", "A")


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_refused_raises_dns_temporary_error(lookup: Lookup, nameserver: str) -> None:
    with pytest.raises(DnsTemporaryError, match="REFUSED"):
        lookup(nameserver, "refused.test", "A")


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_timeout_raises_dns_temporary_error(lookup: Lookup) -> None:
    with SilentNameserver() as silent:
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError, match="timeout"):
            lookup(silent.nameserver, "here.test", "A")
    assert time.monotonic() - started < 3 * TIMEOUT


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_name_that_cannot_exist_is_nxdomain(lookup: Lookup, nameserver: str) -> None:
    name = "x" * 64 + ".test"  # a label over 63 octets: nobody can publish it
    assert lookup(nameserver, name, "TXT").nxdomain


def test_sync_lifetime_bounds_one_lookup() -> None:
    with SilentNameserver() as silent:
        resolver = make_sync_resolver([silent.nameserver], 30)
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError):
            resolve_sync(resolver, "here.test", "A", lifetime=0.3)
    assert time.monotonic() - started < 2


def test_txt_records_join_each_records_strings(nameserver: str) -> None:
    resolver = make_sync_resolver([nameserver], TIMEOUT)
    assert sorted(txt_records_sync(resolver, "here.test")) == [b"firstsecond", b"other"]


def test_async_txt_records_match_the_sync_ones(nameserver: str) -> None:
    resolver = make_resolver([nameserver], TIMEOUT)
    assert sorted(asyncio.run(txt_records(resolver, "here.test"))) == [b"firstsecond", b"other"]


def test_txt_records_of_a_missing_name_are_empty(nameserver: str) -> None:
    assert txt_records_sync(make_sync_resolver([nameserver], TIMEOUT), "nowhere.test") == []


def test_dns_temporary_error_is_a_mailforward_error() -> None:
    assert issubclass(DnsTemporaryError, MailforwardError)


def test_dns_temporary_error_names_the_lookup() -> None:
    error = DnsTemporaryError("here.test", "MX", "no answer within the timeout")
    assert str(error) == "here.test MX: no answer within the timeout"


# --- configuration


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_nameserver_syntax(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["ns.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1"])
def test_bad_nameserver_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_nameserver(text)


def test_resolver_uses_only_the_given_nameservers(nameserver: str) -> None:
    resolver = make_sync_resolver([nameserver], TIMEOUT)
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [  # type: ignore[union-attr]
        parse_nameserver(nameserver)]


def test_one_try_gets_at_most_half_the_lookup_timeout() -> None:
    assert make_resolver(["127.0.0.1"], 1.0).timeout == 0.5


# --- every consumer: REFUSED is temporary, never "not there"


async def test_routing_treats_refused_as_temporary(nameserver: str) -> None:
    with pytest.raises(TemporaryRoutingError):
        await MxRouter([nameserver], timeout=TIMEOUT).next_hops("refused.test")


async def test_verifier_spf_treats_refused_as_temperror(nameserver: str) -> None:
    verdict = await Verifier("mx.test", [nameserver], TIMEOUT).verify(
        b"From: a@sender.test\r\n\r\nbody\r\n", "192.0.2.9", "helo.test", "a@refused.test")
    assert verdict.spf.result == "temperror"


async def test_verifier_dmarc_treats_refused_as_temperror(nameserver: str) -> None:
    verdict = await Verifier("mx.test", [nameserver], TIMEOUT).verify(
        b"From: a@refused.test\r\n\r\nbody\r\n", "192.0.2.9", "helo.test", "a@sender.test")
    assert verdict.dmarc == "temperror"


async def test_verifier_dkim_treats_refused_key_lookup_as_temperror(nameserver: str) -> None:
    signature = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=refused.test;"
                 b" s=sel; h=from; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\n")
    verdict = await Verifier("mx.test", [nameserver], TIMEOUT).verify(
        signature + b"From: a@sender.test\r\n\r\n", "192.0.2.9", "helo.test", "a@sender.test")
    assert [v.result for v in verdict.dkim] == ["temperror"]


async def test_check_treats_refused_as_a_temporary_failure(nameserver: str) -> None:
    result = await check_dmarc(make_resolver([nameserver], TIMEOUT), "refused.test")
    assert result.reason.startswith("DNS lookup failed (temporary): _dmarc.refused.test TXT")


# --- answers from the cache alone (verification on the loop)


def test_cache_only_resolver_answers_what_the_cache_holds(nameserver: str) -> None:
    resolver = make_sync_resolver([nameserver], TIMEOUT)
    assert txt_records_sync(resolver, "here.test") == [b"firstsecond", b"other"]
    cached = CacheOnlyResolver(resolver)
    assert txt_records_sync(cached, "here.test") == [b"firstsecond", b"other"]
    assert cached.misses == 0


def test_cache_only_resolver_counts_a_miss_as_a_temporary_error() -> None:
    silent = SilentNameserver()  # anything sent there would go unanswered until the timeout
    with silent:
        cached = CacheOnlyResolver(make_sync_resolver([silent.nameserver], TIMEOUT))
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError):
            txt_records_sync(cached, "here.test")
        assert time.monotonic() - started < TIMEOUT / 2  # nobody was asked
    assert cached.misses == 1


def test_cache_only_resolver_answers_a_cached_nxdomain(nameserver: str) -> None:
    resolver = make_sync_resolver([nameserver], TIMEOUT)
    assert resolve_sync(resolver, "missing.here.test", "TXT").nxdomain
    cached = CacheOnlyResolver(resolver)
    assert resolve_sync(cached, "missing.here.test", "TXT").nxdomain
    assert cached.misses == 0
