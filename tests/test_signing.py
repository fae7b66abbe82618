"""The signature fields built from a message parsed once (``auth/signing.py``).

A DKIM-Signature must be byte for byte the one dkimpy's ``DKIM.sign`` makes
(same time, same key: RSA PKCS#1 v1.5 is deterministic); a first ARC set
must pass dkimpy's and Mail::DKIM's ARC verifiers.  A message we cannot
take the short way (continuing a chain, Ed25519 key) goes to dkimpy.
"""

from __future__ import annotations

import time
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest

from mailforward.auth.arc import ArcSealer
from mailforward.auth.dkim import DkimKey, generate_key, headers_to_sign, sign_message
from mailforward.auth.pipeline import MessageAuthenticator
from mailforward.auth.signing import SigningInput, arc_set, dkim_signature, signs_here
from mailforward.headerfields import dkimpy_view

from dns_server import LoopbackDNSServer
from mail_dkim import mail_dkim_verify, mail_dkim_verify_arc

AUTHSERV = "mx.forward.test"
RESULTS = (b" mx.forward.test;\r\n\tspf=pass smtp.mailfrom=example.org;\r\n\tdkim=none;\r\n"
           b"\tdmarc=pass (p=none) header.from=example.org;\r\n\tarc=none\r\n")
NOW = 1_700_000_000

MESSAGES = {
    "plain": (b"From: Alice <alice@example.org>\r\nTo: bob@forward.test\r\nSubject: hi\r\n"
              b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
              b"\r\nHello.\r\n"),
    "folded and spaced": (b"From: alice@example.org\r\nSubject:  two   spaces\r\n\tand a fold\r\n"
                          b"MIME-Version: 1.0\r\n\r\nbody  with  spaces \r\n\r\n\r\n"),
    "obsolete colon": (b"Received: from x by y\r\nFrom : <alice@example.org>\r\n"
                       b"Subject : s\r\n\r\nbody\r\n"),
    "two from fields": b"From: a@example.org\r\nfrom: b@example.org\r\nTo: c@x\r\n\r\n",
    "no body": b"From: a@example.org\r\nTo: c@x\r\n\r\n",
}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    return generate_key("forward.test", "fwd", tmp_path_factory.mktemp("keys"), bits=1024)


@pytest.fixture(scope="module")
def dns_zone(key: DkimKey) -> str:
    return key.zone_lines() + "\n"


def key_record(key: DkimKey) -> object:
    def lookup(name: bytes, timeout: float = 5) -> bytes:
        return key.public_record().encode()
    return lookup


@pytest.mark.parametrize("canonicalization",
                         ["relaxed/simple", "relaxed/relaxed", "simple/simple", "simple/relaxed"])
@pytest.mark.parametrize("name", list(MESSAGES))
def test_dkim_signature_is_byte_for_byte_dkimpys(key: DkimKey, name: str, canonicalization: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    message = MESSAGES[name]
    monkeypatch.setattr(time, "time", lambda: NOW + 0.5)
    parsed = SigningInput.parse(message)
    ours = dkim_signature(parsed, key.domain, key.selector, key.private_pem, canonicalization,
                          headers_to_sign(parsed.headers), NOW)
    assert ours == sign_message(message, key, canonicalization)


def test_dkim_signature_verifies_with_mail_dkim(key: DkimKey,
                                                loopback_dns: LoopbackDNSServer) -> None:
    message = MESSAGES["plain"]
    parsed = SigningInput.parse(message)
    signature = dkim_signature(parsed, key.domain, key.selector, key.private_pem,
                               "relaxed/simple", headers_to_sign(parsed.headers))
    assert mail_dkim_verify(signature + message, loopback_dns.port) == [("pass", key.domain)]


@pytest.mark.parametrize("name", list(MESSAGES))
def test_first_arc_set_passes_dkimpys_verifier(key: DkimKey, name: str) -> None:
    message = b"Authentication-Results:" + RESULTS + MESSAGES[name]
    sealed = arc_set(SigningInput.parse(message), key.domain, key.selector, key.private_pem,
                     RESULTS) + message
    state, _, reason = dkim.arc_verify(dkimpy_view(sealed), dnsfunc=key_record(key))
    assert state == b"pass", reason


@pytest.mark.parametrize("name", ["plain", "folded and spaced", "obsolete colon"])
def test_first_arc_set_passes_mail_dkim(key: DkimKey, name: str,
                                        loopback_dns: LoopbackDNSServer) -> None:
    message = b"Authentication-Results:" + RESULTS + MESSAGES[name]
    sealed = arc_set(SigningInput.parse(message), key.domain, key.selector, key.private_pem,
                     RESULTS) + message
    assert mail_dkim_verify_arc(sealed, loopback_dns.port) == "pass"


def test_arc_authentication_results_carry_our_results_as_written(key: DkimKey) -> None:
    message = b"Authentication-Results:" + RESULTS + MESSAGES["plain"]
    sealed = arc_set(SigningInput.parse(message), key.domain, key.selector, key.private_pem,
                     RESULTS)
    assert b"ARC-Authentication-Results: i=1; " + RESULTS.strip() + b"\r\n" in sealed
    assert sealed.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; ")


def test_a_signed_field_added_above_is_covered_by_the_seal(key: DkimKey) -> None:
    message = b"Authentication-Results:" + RESULTS + MESSAGES["plain"]
    parsed = SigningInput.parse(message)
    signature = dkim_signature(parsed, key.domain, key.selector, key.private_pem,
                               "relaxed/relaxed", headers_to_sign(parsed.headers))
    sealed = arc_set(parsed.with_fields_above(signature), key.domain, key.selector,
                     key.private_pem, RESULTS) + signature + message
    state, _, reason = dkim.arc_verify(sealed, dnsfunc=key_record(key))
    assert state == b"pass", reason
    assert dkim.verify(sealed, dnsfunc=key_record(key))


def test_a_message_continuing_a_chain_is_sealed_by_dkimpy(key: DkimKey) -> None:
    first_results = RESULTS.replace(b"mx.forward.test", b"mx.first.test")
    message = b"Authentication-Results:" + first_results + MESSAGES["plain"]
    first = arc_set(SigningInput.parse(message), key.domain, key.selector, key.private_pem,
                    first_results) + message
    results = RESULTS.replace(b"arc=none", b"arc=pass")
    relayed = b"Authentication-Results:" + results + first
    with pytest.raises(ValueError, match="chain"):
        arc_set(SigningInput.parse(relayed), key.domain, key.selector, key.private_pem, results)
    sealer = ArcSealer(key, AUTHSERV)
    sealed = sealer.seal(relayed, SigningInput.parse(relayed), results) + relayed
    assert sealer.sealing_failures == 0
    assert sealed.startswith(b"ARC-Seal: i=2; cv=pass")
    state, _, reason = dkim.arc_verify(sealed, dnsfunc=key_record(key))
    assert state == b"pass", reason


def test_ed25519_keys_are_left_to_dkimpy(tmp_path: Path) -> None:
    ed = generate_key("forward.test", "ed", tmp_path, key_type="ed25519")
    assert not signs_here(ed.private_pem)


def test_a_message_dkimpy_cannot_parse_is_sent_unsigned_and_counted(key: DkimKey) -> None:
    sealer = ArcSealer(key, AUTHSERV)
    auth = MessageAuthenticator(None, None, sealer, authserv_id=AUTHSERV)
    garbage = b"no colon in this header line\r\n\r\nbody\r\n"
    assert auth._sign_and_seal(garbage, "192.0.2.1", RESULTS) == garbage
    assert sealer.sealing_failures == 1
