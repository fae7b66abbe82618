"""Inbound verdicts (SPF, DKIM, DMARC, ARC) against a real DNS server on loopback.

Never the machine's resolver: every check names the loopback server.  Messages
are signed and sealed here with dkimpy and keys made with cryptography; the
public halves are published in the zone.  No mail is sent anywhere.
"""

from __future__ import annotations

import base64
import logging
import threading
import time

import authres  # type: ignore[import-untyped]
import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailforward.auth import executors
from mailforward.auth import verify as verify_module
from mailforward.auth.verify import (
    AuthVerdict,
    DkimVerdict,
    SpfVerdict,
    Verifier,
    authserv_id_of,
    check_spf,
    strip_forged_results,
)
from mailforward.dns import CacheOnlyResolver

from dns_server import SilentNameserver

AUTHSERV_ID = "mx.forward.test"
CLIENT = "192.0.2.10"  # authorised by example.test's SPF record
STRANGER = "192.0.2.66"  # authorised by nobody
TIMEOUT = 2.0


def _key_pair() -> tuple[bytes, str]:
    """(PEM private key for dkimpy, the zone's quoted p= strings)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    record = f"v=DKIM1; k=rsa; p={public}"
    return private, " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))


DKIM_KEY, DKIM_TXT = _key_pair()
ARC_KEY, ARC_TXT = _key_pair()

TOO_MANY = " ".join(f"a:h{n}.toomany.test" for n in range(1, 12))

ZONE = f"""
example.test.               300 IN TXT "v=spf1 ip4:{CLIENT} -all"
_dmarc.example.test.        300 IN TXT "v=DMARC1; p=reject; sp=quarantine"
sel._domainkey.example.test. 300 IN TXT {DKIM_TXT}
mail.example.test.          300 IN TXT "v=spf1 ip4:{CLIENT} -all"
soft.test.                  300 IN TXT "v=spf1 ip4:{CLIENT} ~all"
nospf.test.                 300 IN A 192.0.2.99
toomany.test.               300 IN TXT "v=spf1 {TOO_MANY} -all"
mx.helo.test.               300 IN TXT "v=spf1 ip4:{CLIENT} -all"
monitor.test.               300 IN TXT "v=spf1 -all"
_dmarc.monitor.test.        300 IN TXT "v=DMARC1; p=none"
strict.test.                300 IN TXT "v=spf1 ip4:{CLIENT} -all"
_dmarc.strict.test.         300 IN TXT "v=DMARC1; p=reject; aspf=s"
mail.strict.test.           300 IN TXT "v=spf1 ip4:{CLIENT} -all"
nodmarc.test.               300 IN TXT "v=spf1 ip4:{CLIENT} -all"
arc._domainkey.sealer.test. 300 IN TXT {ARC_TXT}
""" + "".join(f"h{n}.toomany.test. 300 IN A 192.0.2.{200 + n}\n" for n in range(1, 12))

SERVFAIL = ["servfail.test", "slowkey._domainkey.example.test", "_dmarc.flaky.test"]
# ZONE and SERVFAIL are served on loopback to every test that takes the ``nameserver`` fixture.


@pytest.fixture
def verifier(nameserver: str) -> Verifier:
    return Verifier(AUTHSERV_ID, [nameserver], TIMEOUT)


def message(from_header: str = "Alice <alice@example.test>", body: str = "Hello.\r\n",
            extra: str = "") -> bytes:
    return (f"{extra}From: {from_header}\r\nTo: bob@forward.test\r\nSubject: hi\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n"
            f"\r\n{body}").encode()


def signed(raw: bytes, domain: bytes = b"example.test", selector: bytes = b"sel") -> bytes:
    signature: bytes = dkim.sign(raw, selector, domain, DKIM_KEY)
    return signature + raw


def sealed(raw: bytes) -> bytes:
    """The message as sealer.test would pass it on: its AR, then an ARC set (i=1)."""
    raw = b"Authentication-Results: sealer.test; dkim=pass header.d=example.test\r\n" + raw
    return b"".join(dkim.arc_sign(raw, b"arc", b"sealer.test", ARC_KEY, b"sealer.test")) + raw


def spf(nameserver: str, mail_from: str, ip: str = CLIENT, helo: str = "mx.helo.test",
        timeout: float = TIMEOUT) -> SpfVerdict:
    return check_spf(ip, mail_from, helo, [nameserver], timeout)


# --- SPF ---------------------------------------------------------------------

def test_spf_pass_for_authorised_client(nameserver: str) -> None:
    assert spf(nameserver, "bounce@example.test") == SpfVerdict(
        "pass", "sender SPF authorized", "mailfrom", "example.test")


def test_spf_fail_for_dash_all(nameserver: str) -> None:
    assert spf(nameserver, "bounce@example.test", ip=STRANGER).result == "fail"


def test_spf_softfail_for_tilde_all(nameserver: str) -> None:
    assert spf(nameserver, "bounce@soft.test", ip=STRANGER).result == "softfail"


def test_spf_none_without_record(nameserver: str) -> None:
    assert spf(nameserver, "bounce@nospf.test").result == "none"


def test_spf_none_for_nonexistent_domain(nameserver: str) -> None:
    assert spf(nameserver, "bounce@nowhere.test").result == "none"


def test_spf_temperror_on_servfail(nameserver: str) -> None:
    assert spf(nameserver, "bounce@servfail.test").result == "temperror"


def test_spf_temperror_on_silent_nameserver() -> None:
    with SilentNameserver() as silent:
        started = time.monotonic()
        verdict = spf(silent.nameserver, "bounce@example.test", timeout=0.5)
    assert verdict.result == "temperror"
    assert time.monotonic() - started < 3


def test_spf_permerror_explains_too_many_lookups(nameserver: str) -> None:
    verdict = spf(nameserver, "bounce@toomany.test", ip=STRANGER)
    assert verdict.result == "permerror"
    assert "Too many DNS lookups" in verdict.explanation


def test_spf_null_sender_checks_helo(nameserver: str) -> None:
    assert spf(nameserver, "") == SpfVerdict("pass", "sender SPF authorized", "helo",
                                             "mx.helo.test")


def test_spf_null_sender_written_as_brackets_checks_helo(nameserver: str) -> None:
    assert spf(nameserver, "<>").identity == "helo"


def test_spf_none_for_address_literal_helo_without_asking(nameserver: str) -> None:
    assert spf(nameserver, "", helo="[192.0.2.10]").result == "none"


def test_spf_without_resolver_never_uses_system_resolver() -> None:
    """pyspf's global lookup is ours: called outside check_spf it refuses."""
    import spf as pyspf  # type: ignore[import-untyped]
    with pytest.raises(pyspf.TempError):
        pyspf.DNSLookup("example.test", "TXT", True, 1)


def test_spf_checks_with_different_nameservers_do_not_mix(nameserver: str) -> None:
    """Each check uses its own resolver even when run side by side in threads."""
    from concurrent.futures import ThreadPoolExecutor
    with SilentNameserver() as silent, ThreadPoolExecutor(4) as pool:
        slow = pool.submit(spf, silent.nameserver, "bounce@example.test", timeout=1.0)
        fast = [pool.submit(spf, nameserver, "bounce@example.test") for _ in range(3)]
        assert [f.result().result for f in fast] == ["pass"] * 3
        assert slow.result().result == "temperror"


# --- DKIM --------------------------------------------------------------------

async def test_dkim_pass_for_valid_signature(verifier: Verifier) -> None:
    verdict = await verifier.verify(signed(message()), CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.dkim == (DkimVerdict("pass", "example.test", "sel"),)


async def test_dkim_fail_for_tampered_body(verifier: Verifier) -> None:
    tampered = signed(message()).replace(b"Hello.", b"Hullo.")
    verdict = await verifier.verify(tampered, CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.dkim == (DkimVerdict("fail", "example.test", "sel"),)


async def test_dkim_permerror_without_key(verifier: Verifier) -> None:
    raw = signed(message(), selector=b"gone")
    verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.dkim == (DkimVerdict("permerror", "example.test", "gone"),)


async def test_dkim_temperror_when_key_lookup_servfails(verifier: Verifier) -> None:
    raw = signed(message(), selector=b"slowkey")
    verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.dkim == (DkimVerdict("temperror", "example.test", "slowkey"),)


async def test_dkim_temperror_when_key_lookup_times_out() -> None:
    with SilentNameserver() as silent:
        verifier = Verifier(AUTHSERV_ID, [silent.nameserver], 0.5)
        started = time.monotonic()
        verdict = await verifier.verify(signed(message()), CLIENT, "mx.helo.test",
                                        "a@example.test")
    assert verdict.dkim == (DkimVerdict("temperror", "example.test", "sel"),)
    assert (verdict.spf.result, verdict.dmarc) == ("temperror", "temperror")
    assert time.monotonic() - started < 5


async def test_dkim_none_for_unsigned_message(verifier: Verifier) -> None:
    verdict = await verifier.verify(message(), CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.dkim == ()
    assert b"dkim=none" in verdict.header


# --- DMARC -------------------------------------------------------------------

async def test_dmarc_pass_with_aligned_dkim(verifier: Verifier) -> None:
    verdict = await verifier.verify(signed(message()), STRANGER, "mx.helo.test",
                                    "bounce@other.test")
    assert (verdict.dmarc, verdict.dmarc_policy, verdict.from_domain) == (
        "pass", "reject", "example.test")
    assert not verdict.dmarc_rejects


async def test_dmarc_pass_with_relaxed_aligned_spf(verifier: Verifier) -> None:
    verdict = await verifier.verify(message(), CLIENT, "mx.helo.test",
                                    "bounce@mail.example.test")
    assert (verdict.spf.result, verdict.dmarc) == ("pass", "pass")


async def test_dmarc_fail_when_spf_domain_not_strictly_aligned(verifier: Verifier) -> None:
    verdict = await verifier.verify(message("a@strict.test"), CLIENT, "mx.helo.test",
                                    "bounce@mail.strict.test")
    assert (verdict.spf.result, verdict.dmarc) == ("pass", "fail")


async def test_dmarc_fail_with_p_none_does_not_reject(verifier: Verifier) -> None:
    verdict = await verifier.verify(message("a@monitor.test"), CLIENT, "mx.helo.test",
                                    "bounce@example.test")
    assert (verdict.dmarc, verdict.dmarc_policy) == ("fail", "none")
    assert not verdict.dmarc_rejects


async def test_dmarc_fail_with_p_reject_rejects(verifier: Verifier) -> None:
    verdict = await verifier.verify(message(), STRANGER, "mx.helo.test", "bounce@other.test")
    assert (verdict.dmarc, verdict.dmarc_policy) == ("fail", "reject")
    assert verdict.dmarc_rejects


async def test_dmarc_fail_with_unaligned_dkim_pass(verifier: Verifier) -> None:
    raw = signed(message("a@monitor.test"))  # d=example.test, From monitor.test
    verdict = await verifier.verify(raw, STRANGER, "mx.helo.test", "bounce@other.test")
    assert verdict.dkim[0].result == "pass"
    assert verdict.dmarc == "fail"


async def test_dmarc_subdomain_takes_sp_policy(verifier: Verifier) -> None:
    verdict = await verifier.verify(message("a@news.example.test"), STRANGER, "mx.helo.test",
                                    "bounce@other.test")
    assert (verdict.dmarc, verdict.dmarc_policy, verdict.from_domain) == (
        "fail", "quarantine", "news.example.test")
    assert not verdict.dmarc_rejects


async def test_dmarc_subdomain_passes_with_org_domain_signature(verifier: Verifier) -> None:
    verdict = await verifier.verify(signed(message("a@news.example.test")), STRANGER,
                                    "mx.helo.test", "bounce@other.test")
    assert verdict.dmarc == "pass"


async def test_dmarc_none_without_record(verifier: Verifier) -> None:
    verdict = await verifier.verify(message("a@nodmarc.test"), STRANGER, "mx.helo.test",
                                    "bounce@nodmarc.test")
    assert (verdict.dmarc, verdict.dmarc_policy) == ("none", "")


async def test_dmarc_temperror_when_record_lookup_servfails(verifier: Verifier) -> None:
    verdict = await verifier.verify(message("a@flaky.test"), STRANGER, "mx.helo.test",
                                    "bounce@flaky.test")
    assert verdict.dmarc == "temperror"
    assert not verdict.dmarc_rejects


async def test_dmarc_none_without_from(verifier: Verifier) -> None:
    raw = b"To: bob@forward.test\r\nSubject: hi\r\n\r\nHello.\r\n"
    verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "bounce@example.test")
    assert (verdict.dmarc, verdict.from_domain) == ("none", "")


async def test_dmarc_permerror_with_two_from_fields(verifier: Verifier) -> None:
    raw = message(extra="From: mallory@evil.test\r\n")
    verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "bounce@example.test")
    assert verdict.dmarc == "permerror"


async def test_dmarc_finds_idn_from_domain_in_ascii_form(verifier: Verifier) -> None:
    raw = "From: a@bücher.test\r\n\r\nHello.\r\n".encode()
    verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "bounce@example.test")
    assert (verdict.dmarc, verdict.from_domain) == ("none", "xn--bcher-kva.test")
    assert verdict.header.isascii()


async def test_dmarc_permerror_with_from_naming_two_domains(verifier: Verifier) -> None:
    raw = message("a@example.test, b@other.test")
    verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "bounce@example.test")
    assert verdict.dmarc == "permerror"


# --- ARC ---------------------------------------------------------------------

async def test_arc_none_for_plain_message(verifier: Verifier) -> None:
    verdict = await verifier.verify(message(), CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.arc == "none"


async def test_arc_pass_for_sealed_message(verifier: Verifier) -> None:
    verdict = await verifier.verify(sealed(message()), CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.arc == "pass"
    assert b"arc=pass" in verdict.header


async def test_arc_fail_for_message_changed_after_sealing(verifier: Verifier) -> None:
    tampered = sealed(message()).replace(b"Hello.", b"Hullo.")
    verdict = await verifier.verify(tampered, CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.arc == "fail"


async def test_arc_sealer_reads_chain_state_from_our_header(verifier: Verifier) -> None:
    """Our header is what dkimpy's arc_sign consumes: it must find arc= under our id."""
    incoming = sealed(message())
    verdict = await verifier.verify(incoming, CLIENT, "mx.helo.test", "a@example.test")
    ours = verdict.header + incoming
    seal = b"".join(dkim.arc_sign(ours, b"arc", b"sealer.test", ARC_KEY,
                                  AUTHSERV_ID.encode()))
    assert b"i=2" in seal and b"cv=pass" in seal


# --- The header --------------------------------------------------------------

async def test_header_names_our_id_and_every_method(verifier: Verifier) -> None:
    verdict = await verifier.verify(signed(message()), CLIENT, "mx.helo.test",
                                    "bounce@example.test")
    assert verdict.header == (
        b"Authentication-Results: mx.forward.test;\r\n"
        b"\tspf=pass smtp.mailfrom=bounce@example.test;\r\n"
        b"\tdkim=pass header.d=example.test header.s=sel;\r\n"
        b"\tdmarc=pass (p=reject) header.from=example.test;\r\n"
        b"\tarc=none\r\n")


async def test_header_names_helo_for_null_sender(verifier: Verifier) -> None:
    verdict = await verifier.verify(message(), CLIENT, "mx.helo.test", "")
    assert b"spf=pass smtp.helo=mx.helo.test;" in verdict.header


async def test_header_quotes_values_that_are_not_tokens(verifier: Verifier) -> None:
    verdict = await verifier.verify(message(), CLIENT, "[192.0.2.10]", "")
    assert b'smtp.helo="[192.0.2.10]"' in verdict.header


async def test_header_parses_with_authres(verifier: Verifier) -> None:
    verdict = await verifier.verify(signed(message()), CLIENT, "mx.helo.test",
                                    "bounce@example.test")
    parsed = authres.AuthenticationResultsHeader.parse(verdict.header.decode())
    assert parsed.authserv_id == AUTHSERV_ID
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass"), ("arc", "none")]


async def test_verify_survives_garbage_message(verifier: Verifier) -> None:
    verdict = await verifier.verify(b"\x00\xff no header at all", CLIENT, "mx.helo.test",
                                    "bounce@example.test")
    assert isinstance(verdict, AuthVerdict)
    assert verdict.dkim == ()


# --- Which pool does what ------------------------------------------------------

class Recorder:
    """Where verification looked names up and checked RSA: (thread, resolver kind) each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lookups: list[tuple[str, bool]] = []  # (thread, from the cache alone)
        self.rsa_checks: list[str] = []
        real_lookup, real_rsa = verify_module.txt_records_sync, dkim.RSASSA_PKCS1_v1_5_verify

        def recording_lookup(resolver: object, *args: object, **kwargs: object) -> list[bytes]:
            self.lookups.append((threading.current_thread().name,
                                 isinstance(resolver, CacheOnlyResolver)))
            return real_lookup(resolver, *args, **kwargs)  # type: ignore[arg-type]

        def recording_rsa(*args: object) -> bool:
            self.rsa_checks.append(threading.current_thread().name)
            return bool(real_rsa(*args))

        monkeypatch.setattr(verify_module, "txt_records_sync", recording_lookup)
        monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", recording_rsa)

    def network_lookups(self) -> list[str]:
        return [thread for thread, cached in self.lookups if not cached]


async def test_lookups_the_cache_cannot_answer_run_in_the_dns_pool(
        verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DNS wait never holds the loop nor a CPU worker."""
    recorder = Recorder(monkeypatch)
    verdict = await verifier.verify(sealed(signed(message())), CLIENT, "mx.helo.test",
                                    "a@example.test")
    assert [d.result for d in verdict.dkim] == ["pass"] and verdict.arc == "pass"
    assert len(recorder.network_lookups()) >= 3
    assert all(name.startswith(executors.DNS.name) for name in recorder.network_lookups())


async def test_a_message_whose_records_are_cached_is_verified_on_the_loop(
        verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread hand-off, and no GIL held by a pool thread, for what the cache answers."""
    mail = sealed(signed(message()))
    first = await verifier.verify(mail, CLIENT, "mx.helo.test", "a@example.test")
    recorder = Recorder(monkeypatch)
    again = await verifier.verify(mail, CLIENT, "mx.helo.test", "a@example.test")
    assert again == first
    assert recorder.network_lookups() == []
    assert recorder.rsa_checks == [threading.current_thread().name] * 3  # DKIM, AMS, AS


async def test_rsa_of_a_big_message_is_checked_in_the_cpu_pool(
        verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    body = "x" * 78 + "\r\n"
    big = signed(message(body=body * (executors.ON_LOOP_LIMIT // len(body) + 1)))
    verdict = await verifier.verify(big, CLIENT, "mx.helo.test", "a@example.test")
    assert [d.result for d in verdict.dkim] == ["pass"]
    assert recorder.rsa_checks and all(name.startswith(executors.CPU.name)
                                       for name in recorder.rsa_checks)


async def test_a_key_record_is_fetched_once_for_signatures_sharing_it(
        verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    real_lookup = verify_module.txt_records_sync

    def recording_lookup(resolver: object, name: str) -> list[bytes]:
        if not isinstance(resolver, CacheOnlyResolver):  # what the DNS server was asked
            asked.append(name)
        return real_lookup(resolver, name)  # type: ignore[arg-type]

    monkeypatch.setattr(verify_module, "txt_records_sync", recording_lookup)
    twice = signed(signed(message()))
    verdict = await verifier.verify(twice, CLIENT, "mx.helo.test", "a@example.test")
    assert [d.result for d in verdict.dkim] == ["pass", "pass"]
    assert asked.count("sel._domainkey.example.test") == 1


def test_key_names_are_the_ones_dkimpy_asks_for() -> None:
    """Prefetched names match dkimpy's requests exactly, so nothing is looked up twice."""
    raw = sealed(signed(message(), selector=b"sel"))
    asked: list[bytes] = []

    def record(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name)
        return None

    dkim.DKIM(raw).verify(dnsfunc=record)
    assert verify_module._dkim_key_names(raw) == asked
    asked.clear()
    dkim.arc_verify(raw, dnsfunc=record)
    assert set(asked) <= set(verify_module._arc_key_names(raw))


def test_dkim_signature_failing_dkimpys_field_checks_is_not_looked_up() -> None:
    raw = signed(message()).replace(b"a=rsa-sha256", b"a=rsa-md5", 1)
    assert verify_module._dkim_key_names(raw) == []


def test_arc_key_lookups_are_bounded() -> None:
    seals = "".join(f"ARC-Seal: i={n}; a=rsa-sha256; cv=pass; d=chain.test; s=s{n}; b=AAAA\r\n"
                    for n in range(1, 31))
    raw = seals.encode() + message()
    names = verify_module._arc_key_names(raw)
    assert len(names) == verify_module.ARC_KEY_LOOKUPS
    assert b"s30._domainkey.chain.test." in names  # the newest seals are checked first


async def test_arc_seal_past_the_lookup_limit_fails(verifier: Verifier,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "ARC_KEY_LOOKUPS", 0)
    verdict = await verifier.verify(sealed(message()), CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.arc == "fail"


# --- Forged results -----------------------------------------------------------

FORGED = (b"Received: from somewhere\r\n"
          b"authentication-results: MX.Forward.TEST;\r\n"
          b"\tspf=pass smtp.mailfrom=ceo@example.test;\r\n"
          b"\tdmarc=pass header.from=example.test\r\n"
          b"Authentication-Results: other.test; spf=fail smtp.mailfrom=x@example.test\r\n"
          b"AUTHENTICATION-RESULTS: (comment (nested)) \"mx.forward.test\" 1; none\r\n"
          b"Subject: hi\r\n"
          b"\r\n"
          b"Authentication-Results: mx.forward.test; body text, not a header\r\n")


def test_strip_removes_our_folded_forged_results_any_case() -> None:
    assert strip_forged_results(FORGED, AUTHSERV_ID) == (
        b"Received: from somewhere\r\n"
        b"Authentication-Results: other.test; spf=fail smtp.mailfrom=x@example.test\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.forward.test; body text, not a header\r\n")


@pytest.mark.parametrize("claimed", [
    b"mx.forward.test.",
    b"MX.FORWARD.TEST.",
    b'"mx.forward.test."',
    b'"Mx.Forward.Test"',
    b" (comment) mx.forward.test.",
])
def test_strip_removes_forged_results_whatever_the_spelling_of_our_id(claimed: bytes) -> None:
    forged = b"Authentication-Results: " + claimed + b"; dmarc=pass header.from=bank.test\r\n"
    assert strip_forged_results(forged + message(), AUTHSERV_ID) == message()


def test_strip_removes_forged_results_when_our_id_is_configured_with_a_dot() -> None:
    forged = b"Authentication-Results: mx.forward.test; dmarc=pass\r\n"
    assert strip_forged_results(forged + message(), AUTHSERV_ID + ".") == message()


def test_strip_removes_forged_results_with_space_before_the_colon() -> None:
    forged = b"Authentication-Results  : mx.forward.test; dmarc=pass\r\n"
    assert strip_forged_results(forged + message(), AUTHSERV_ID) == message()


def test_strip_keeps_results_of_a_longer_id_ending_in_a_dot() -> None:
    kept = b"Authentication-Results: mx.forward.test.evil.; dmarc=pass\r\n" + message()
    assert strip_forged_results(kept, AUTHSERV_ID) == kept


def test_strip_leaves_message_without_ours_unchanged() -> None:
    raw = message(extra="Authentication-Results: mx.forward.test.evil; none\r\n",
                  body="line\n\r\nbare\rcr\r\n")
    assert strip_forged_results(raw, AUTHSERV_ID) == raw


def test_strip_handles_bare_lf_messages() -> None:
    raw = b"Authentication-Results: mx.forward.test;\n spf=pass\nSubject: x\n\nbody\n"
    assert strip_forged_results(raw, AUTHSERV_ID) == b"Subject: x\n\nbody\n"


def test_strip_does_not_split_lines_at_lone_cr() -> None:
    raw = b"X-Note: a\rAuthentication-Results: mx.forward.test; none\r\n\r\nbody"
    assert strip_forged_results(raw, AUTHSERV_ID) == raw


def test_authserv_id_skips_comments_and_ignores_version() -> None:
    assert authserv_id_of(b" (hi \\) there) mx.forward.test 1; none") == "mx.forward.test"


def test_authserv_id_of_unclosed_comment_is_none() -> None:
    assert authserv_id_of(b" (mx.forward.test; none") is None


async def test_verification_logs_name_no_header_values(
        verifier: Verifier, caplog: pytest.LogCaptureFixture) -> None:
    raw = signed(message(), domain=b"marker-51.test", selector=b"marker-51")  # no such key
    with caplog.at_level(logging.DEBUG, logger="mailforward"):
        verdict = await verifier.verify(raw, CLIENT, "mx.helo.test", "a@example.test")
    assert verdict.dkim == (DkimVerdict("permerror", "marker-51.test", "marker-51"),)
    assert "DKIM signature 1: permerror (no key)" in caplog.text
    assert "marker-51" not in caplog.text
