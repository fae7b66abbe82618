"""dkimpy's RSA on OpenSSL (``auth.rsa_openssl``): same results as dkimpy's pure Python, really used.

* Equivalence with dkimpy's own functions: identical signatures (PKCS#1 v1.5 is
  deterministic) and identical verification answers and exceptions, on valid,
  tampered, short, over-long and ``s + n`` signatures, SHA-1 and SHA-256,
  ordinary and odd keys.
* The pure-Python arithmetic and PEM parser are never reached when we sign,
  seal or verify (they are made to raise), and a key is parsed once when it
  is loaded, not per message; loading a new key file signs with the new key.
* Perl's Mail::DKIM, an independent implementation, verifies every signature
  and seal made this way (RSA 1024 and 2048, each canonicalization, obsolete
  header syntax); our verifier passes Mail::DKIM-made and dkimpy-made
  signatures and fails tampered ones with the same verdicts as pure dkimpy.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import pickle
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import dkim.crypto  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mailforward.auth import dkim as dkim_module
from mailforward.auth import rsa_openssl
from mailforward.auth.arc import ArcSealer
from mailforward.auth.dkim import DkimConfig, DkimKey, DkimSigner, generate_key, load_key
from mailforward.auth.verify import Verifier
from mailforward.headerfields import dkimpy_view

from dns_server import LoopbackDNSServer
from mail_dkim import mail_dkim_verify, mail_dkim_verify_arc

PURE_SIGN = rsa_openssl.PURE_PYTHON["RSASSA_PKCS1_v1_5_sign"]
PURE_VERIFY = rsa_openssl.PURE_PYTHON["RSASSA_PKCS1_v1_5_verify"]
AUTHSERV_ID = "mx.forward.test"
TIMEOUT = 2.0

PLAIN = (b"From: Alice <alice@example.org>\r\n"
         b"To: bob@forward.test\r\n"
         b"Subject: OpenSSL test\r\n"
         b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
         b"Message-ID: <openssl@example.org>\r\n"
         b"\r\n"
         b"Hello.\r\n"
         b"  Some  white   space\t to canonicalize.  \r\n")

OBSOLETE = PLAIN.replace(b"Subject: OpenSSL test", b"Subject  :   OpenSSL test").replace(
    b"To: bob", b"X-Spaces  :  value\r\nTo: bob")

MESSAGES = {"plain": PLAIN, "obsolete": OBSOLETE}

_PERL_SIGNER = r"""
use strict;
use warnings;
use Mail::DKIM::Signer;
my ($keyfile, $domain, $selector, $method, $algorithm) = @ARGV;
my $signer = Mail::DKIM::Signer->new(Algorithm => $algorithm, Method => $method,
    Domain => $domain, Selector => $selector, KeyFile => $keyfile,
    Headers => "from:to:subject:date");
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\015\012/; $signer->PRINT($line); }
$signer->CLOSE;
print $signer->signature->as_string;
"""


# ------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Keys:
    rsa1024: DkimKey
    rsa2048: DkimKey
    ed: DkimKey

    def by_bits(self, bits: int) -> DkimKey:
        return self.rsa1024 if bits == 1024 else self.rsa2048


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    return Keys(rsa1024=generate_key("example.org", "k1024", directory, bits=1024),
                rsa2048=generate_key("example.org", "k2048", directory, bits=2048),
                ed=generate_key("example.org", "ed", directory, key_type="ed25519"))


@pytest.fixture(scope="module")
def dns_zone(keys: Keys) -> str:
    """The keys' records, served on loopback by the ``loopback_dns`` fixture."""
    return "".join(key.zone_lines() + "\n" for key in (keys.rsa1024, keys.rsa2048, keys.ed))


@pytest.fixture(scope="module")
def dns_port(loopback_dns: LoopbackDNSServer) -> int:
    return loopback_dns.port


@pytest.fixture
def no_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """dkimpy's pure-Python RSA arithmetic and private-key parser raise if reached."""
    def refuse(*args: object) -> None:
        raise AssertionError("dkimpy's pure-Python RSA path was used")
    for name in ("rsa_decrypt", "rsa_encrypt", "parse_private_key"):
        monkeypatch.setattr(dkim.crypto, name, refuse)


@pytest.fixture
def pure_dkimpy() -> Iterator[None]:
    """dkimpy exactly as shipped, for the duration of a test."""
    rsa_openssl.uninstall()
    try:
        yield
    finally:
        rsa_openssl.install()


def signer_for(key: DkimKey, canonicalization: str = "relaxed/simple") -> DkimSigner:
    return DkimSigner(DkimConfig(keys={key.name: key}, sign_forwarded_as=key,
                                 canonicalization=canonicalization))


def dkim_signed(key: DkimKey, message: bytes, canonicalization: str = "relaxed/simple") -> bytes:
    signer = signer_for(key, canonicalization)
    headers = signer.signature_headers(message, "192.0.2.1")
    assert headers and signer.signing_failures == 0
    return headers + message


def arc_sealed(key: DkimKey, message: bytes) -> bytes:
    message = f"Authentication-Results: {AUTHSERV_ID}; arc=none\r\n".encode() + message
    sealer = ArcSealer(key, AUTHSERV_ID)
    seal = sealer.seal(message)
    assert seal and sealer.sealing_failures == 0
    return seal + message


# ------------------------------------------------------------------ equivalence


def _key_numbers(bits: int, exponent: int) -> dict[str, int]:
    """dkimpy's private-key dict for a fresh key with any public exponent."""
    while True:
        numbers = rsa.generate_private_key(65537, bits).private_numbers()
        p, q = numbers.p, numbers.q
        lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
        if math.gcd(exponent, lam) == 1:
            break
    d = pow(exponent, -1, lam)
    return {"version": 0, "modulus": p * q, "publicExponent": exponent, "privateExponent": d,
            "prime1": p, "prime2": q, "exponent1": d % (p - 1), "exponent2": d % (q - 1),
            "coefficient": pow(q, -1, p)}


def _outcome(function: Callable[..., Any], *args: object) -> object:
    try:
        return function(*args)
    except Exception as e:
        return type(e)


def _variants(signature: bytes, modulus: int) -> list[bytes]:
    """The signature, and what a sender or an attacker could make of it."""
    size = len(signature)
    value = int.from_bytes(signature, "big")
    return [signature,
            bytes([signature[0] ^ 1]) + signature[1:],  # tampered
            signature[:-1],  # truncated
            b"\0" + signature,  # over-long with a leading zero: the same integer
            value.to_bytes(size, "big").lstrip(b"\0") or b"\0",  # leading zeros stripped
            (value + modulus).to_bytes(size + 1, "big"),  # not reduced modulo n
            b"", (0).to_bytes(size, "big"), (1).to_bytes(size, "big"),
            (modulus - 1).to_bytes(size, "big")]


@pytest.mark.parametrize(("bits", "exponent"), [(1024, 65537), (2048, 65537), (1024, 3),
                                                (2048, 2**65 + 1), (3072, 2**63 + 1)])
@pytest.mark.parametrize("hash_name", ["sha256", "sha1"])
def test_verification_answers_exactly_as_dkimpy(bits: int, exponent: int,
                                                hash_name: str) -> None:
    private = _key_numbers(bits, exponent)
    public = {"modulus": private["modulus"], "publicExponent": exponent}
    signed = hashlib.new(hash_name, b"signed text")
    signature = bytes(PURE_SIGN(signed, private))
    for digest in (signed, hashlib.new(hash_name, b"other text")):
        for variant in _variants(signature, private["modulus"]):
            expected = _outcome(PURE_VERIFY, digest, variant, public)
            assert _outcome(rsa_openssl.rsassa_pkcs1_v1_5_verify, digest, variant,
                            public) == expected
    assert rsa_openssl.rsassa_pkcs1_v1_5_verify(signed, signature, public) is True


@pytest.mark.parametrize("public", [
    {"modulus": 2**400 + 1, "publicExponent": 65537},  # too small for SHA-256: DigestTooLarge
    {"modulus": 2**1024, "publicExponent": 65537},  # even modulus
    {"modulus": 2**1023 + 1, "publicExponent": 1},
    {"modulus": 2**1023 + 1, "publicExponent": 2**1024 + 1},  # exponent above the modulus
    {"modulus": 0, "publicExponent": 65537},
    {"modulus": -(2**1023 + 1), "publicExponent": 65537},
])
@pytest.mark.parametrize("hash_name", ["sha256", "sha1"])
def test_odd_public_keys_answer_or_raise_as_dkimpy(public: dict[str, int],
                                                   hash_name: str) -> None:
    digest = hashlib.new(hash_name, b"x")
    for signature in (b"\1" * 128, b""):
        assert _outcome(rsa_openssl.rsassa_pkcs1_v1_5_verify, digest, signature, public) \
            == _outcome(PURE_VERIFY, digest, signature, public)


def test_digest_too_large_is_dkimpys_exception() -> None:
    public = {"modulus": 2**400 + 1, "publicExponent": 65537}
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        rsa_openssl.rsassa_pkcs1_v1_5_verify(hashlib.sha256(b"x"), b"\1" * 51, public)


@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("hash_name", ["sha256", "sha1"])
def test_openssl_signature_is_byte_for_byte_dkimpys(keys: Keys, bits: int,
                                                    hash_name: str) -> None:
    pem = keys.by_bits(bits).private_pem
    assert isinstance(pem, rsa_openssl.PreparedRsaPem)
    pure_key = rsa_openssl.PURE_PYTHON["parse_pem_private_key"](bytes(pem))
    assert dict(pem.parsed) == pure_key
    digest = hashlib.new(hash_name, b"message hash")
    assert rsa_openssl.rsassa_pkcs1_v1_5_sign(digest, pem.parsed) \
        == bytes(PURE_SIGN(digest, pure_key))


def test_other_private_keys_still_sign_in_pure_python(keys: Keys) -> None:
    """A plain PEM (not loaded by us) takes dkimpy's own path, with dkimpy's result."""
    plain = bytes(keys.rsa1024.private_pem)
    parsed = dkim.parse_pem_private_key(plain)
    assert not isinstance(parsed, rsa_openssl.OpenSslPrivateKey)
    digest = hashlib.sha256(b"m")
    assert bytes(dkim.RSASSA_PKCS1_v1_5_sign(digest, parsed)) == bytes(PURE_SIGN(digest, parsed))


def test_installed_when_the_signing_module_is_imported() -> None:
    assert rsa_openssl.installed()
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsa_openssl.rsassa_pkcs1_v1_5_sign
    assert dkim.RSASSA_PKCS1_v1_5_verify is rsa_openssl.rsassa_pkcs1_v1_5_verify
    assert dkim.parse_pem_private_key is rsa_openssl.parse_pem_private_key


def test_install_and_uninstall_are_idempotent() -> None:
    rsa_openssl.install()
    rsa_openssl.install()
    assert rsa_openssl.installed()
    rsa_openssl.uninstall()
    try:
        assert dkim.RSASSA_PKCS1_v1_5_sign is PURE_SIGN
        assert not rsa_openssl.installed()
    finally:
        rsa_openssl.install()
    assert rsa_openssl.installed()


# ------------------------------------------------------------------ really used, parsed once


@pytest.mark.usefixtures("no_pure_python")
def test_signing_sealing_and_verifying_never_reach_dkimpys_arithmetic(
        keys: Keys, dns_port: int) -> None:
    message = arc_sealed(keys.rsa2048, dkim_signed(keys.rsa2048, PLAIN))
    assert verdicts(message, dns_port) == [("pass", "example.org"), ("arc", "pass")]


def test_a_key_is_parsed_once_when_loaded_not_per_message(
        keys: Keys, monkeypatch: pytest.MonkeyPatch, no_pure_python: None) -> None:
    loads: list[bytes] = []
    real = dkim_module.serialization.load_pem_private_key

    def counting(data: bytes, password: bytes | None) -> object:
        loads.append(data)
        return real(data, password)

    monkeypatch.setattr(dkim_module.serialization, "load_pem_private_key", counting)
    key = load_key("example.org", "k2048", keys.rsa2048.path)
    assert len(loads) == 1
    signer, sealer = signer_for(key), ArcSealer(key, AUTHSERV_ID)
    for n in range(5):
        message = PLAIN.replace(b"Hello.", f"Hello {n}.".encode())
        signed = signer.signature_headers(message, "192.0.2.1") + message
        assert sealer.seal(f"Authentication-Results: {AUTHSERV_ID}; arc=none\r\n".encode()
                           + signed)
    assert len(loads) == 1
    assert signer.signing_failures == 0 and sealer.sealing_failures == 0


def test_reloading_a_new_key_file_signs_with_the_new_key(tmp_path: Path) -> None:
    first = generate_key("example.org", "rot", tmp_path, bits=1024)
    old_record = first.public_record()
    path = Path(first.path)
    path.unlink()
    second = generate_key("example.org", "rot", tmp_path, bits=1024)  # same file name, new key
    assert second.public_record() != old_record
    reloaded = load_key("example.org", "rot", str(path))
    message = dkim_signed(reloaded, PLAIN)

    def record(text: str) -> Callable[..., bytes]:
        return lambda name, timeout=5: text.encode()

    assert dkim.verify(message, dnsfunc=record(second.public_record()))
    assert not dkim.verify(message, dnsfunc=record(old_record))


def test_prepared_key_pickles_as_pem_and_is_parsed_again(keys: Keys) -> None:
    pem = keys.rsa1024.private_pem
    copy = pickle.loads(pickle.dumps(pem))
    assert isinstance(copy, rsa_openssl.PreparedRsaPem) and copy == pem
    assert dict(copy.parsed) == dict(pem.parsed)  # type: ignore[attr-defined]
    assert copy.parsed is not pem.parsed  # type: ignore[attr-defined]


def test_ed25519_keys_sign_as_before(keys: Keys, dns_port: int) -> None:
    """Ed25519 stays dkimpy's (PyNaCl); Mail::DKIM here has no Ed25519, so dkimpy and we judge."""
    message = dkim_signed(keys.ed, PLAIN)
    assert b"a=ed25519-sha256" in message
    assert dkim.verify(message, dnsfunc=lambda name, timeout=5: keys.ed.public_record().encode())
    assert verdicts(message, dns_port) == [("pass", "example.org"), ("arc", "none")]


# ------------------------------------------------------------------ Mail::DKIM, both ways


@pytest.mark.usefixtures("no_pure_python")
@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("canonicalization", ["relaxed/simple", "simple/simple",
                                              "relaxed/relaxed", "simple/relaxed"])
@pytest.mark.parametrize("kind", ["plain", "obsolete"])
def test_mail_dkim_verifies_our_openssl_signature(keys: Keys, dns_port: int, bits: int,
                                                  canonicalization: str, kind: str) -> None:
    message = dkim_signed(keys.by_bits(bits), MESSAGES[kind], canonicalization)
    assert mail_dkim_verify(message, dns_port) == [("pass", "example.org")]
    tampered = message.replace(b"Hello.", b"Howdy.")
    assert mail_dkim_verify(tampered, dns_port) == [("fail", "example.org")]


@pytest.mark.usefixtures("no_pure_python")
@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("kind", ["plain", "obsolete"])
def test_mail_dkim_verifies_our_openssl_arc_seal(keys: Keys, dns_port: int, bits: int,
                                                 kind: str) -> None:
    key = keys.by_bits(bits)
    message = arc_sealed(key, dkim_signed(key, MESSAGES[kind]))
    assert mail_dkim_verify_arc(message, dns_port) == "pass"
    assert mail_dkim_verify_arc(message.replace(b"Hello.", b"Howdy."), dns_port) == "fail"


def perl_signed(key: DkimKey, message: bytes, method: str, algorithm: str) -> bytes:
    if shutil.which("perl") is None:
        pytest.fail("perl is not installed (apt-get install perl libmail-dkim-perl)")
    done = subprocess.run(["perl", "-e", _PERL_SIGNER, key.path, key.domain, key.selector,
                           method, algorithm], input=message, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    return done.stdout.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") \
        + b"\r\n" + message


def verdicts(message: bytes, dns_port: int) -> list[tuple[str, str]]:
    """Our verifier's DKIM verdicts and ARC state (SPF and DMARC are not at issue here)."""
    verifier = Verifier(AUTHSERV_ID, [f"127.0.0.1:{dns_port}"], TIMEOUT)
    verdict = asyncio.run(verifier.verify(message, "192.0.2.1", "client.test", "a@example.org"))
    return [(d.result, d.domain) for d in verdict.dkim] + [("arc", verdict.arc)]


def foreign_signed(keys: Keys, kind: str, bits: int, maker: str) -> bytes:
    """PLAIN or OBSOLETE signed by Mail::DKIM (rsa-sha256 or rsa-sha1) or by dkimpy.

    dkimpy signs from a plain PEM (its own parser and arithmetic), relaxed
    header canonicalization over ``dkimpy_view`` (its parser refuses the
    obsolete syntax), which hashes the same as the original bytes.
    """
    key = keys.by_bits(bits)
    message = MESSAGES[kind]
    if maker == "dkimpy":
        signature: bytes = dkim.sign(dkimpy_view(message), key.selector.encode(),
                                     key.domain.encode(), bytes(key.private_pem),
                                     include_headers=[b"from", b"to", b"subject", b"date"])
        return signature + message
    return perl_signed(key, message, "relaxed" if maker == "perl-relaxed" else "simple",
                       "rsa-sha1" if maker == "perl-sha1" else "rsa-sha256")


@pytest.mark.parametrize("maker", ["perl-relaxed", "perl-simple", "perl-sha1", "dkimpy"])
@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("kind", ["plain", "obsolete"])
def test_verifier_passes_foreign_signatures_and_fails_tampered_ones_as_before(
        keys: Keys, dns_port: int, maker: str, bits: int, kind: str) -> None:
    message = foreign_signed(keys, kind, bits, maker)
    tampered_body = message.replace(b"Hello.", b"Howdy.")
    tampered_header = message.replace(b"OpenSSL test", b"OpenSSL text")
    ours = [verdicts(m, dns_port) for m in (message, tampered_body, tampered_header)]
    assert ours == [[("pass", "example.org"), ("arc", "none")],
                    [("fail", "example.org"), ("arc", "none")],
                    [("fail", "example.org"), ("arc", "none")]]
    rsa_openssl.uninstall()
    try:
        before = [verdicts(m, dns_port) for m in (message, tampered_body, tampered_header)]
    finally:
        rsa_openssl.install()
    assert ours == before
