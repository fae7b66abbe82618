"""dkimpy's RSA step on OpenSSL (through ``cryptography``), installed once at import.

dkimpy canonicalizes, hashes and builds the DKIM-Signature, ARC-Message-Signature
and ARC-Seal fields itself, and does the RSA arithmetic with Python integers:
~10 ms per 2048-bit signature, holding the GIL, so a thread does not help.
OpenSSL does the same operation in ~0.3 ms and releases the GIL while it runs.

dkimpy reaches RSA through three names it imports into its package namespace
(``from dkim.crypto import ...``) and looks up as module globals of ``dkim``
when it signs or verifies:

* ``parse_pem_private_key(privkey)``, called by ``DKIM.sign`` and ``ARC.sign``
  for every message, parses the PEM with a pure-Python ASN.1 reader (~0.2 ms);
* ``RSASSA_PKCS1_v1_5_sign(hash, private_key)``, called by ``gen_header``;
* ``RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)``, called by
  ``verify_sig_process`` for DKIM signatures, ARC-Message-Signatures and ARC-Seals.

:func:`install` replaces those three globals (and nothing else).  Why that is safe:

* **Same inputs, same outputs.**  RSASSA-PKCS1-v1_5 (RFC 8017 8.2) is
  deterministic: for a key and a digest, OpenSSL's signature is byte for byte
  the one dkimpy computes (tested).  Verification answers True exactly when
  dkimpy's does: dkimpy reads the signature as an integer of any length and
  reduces it modulo n (``pow(s, e, n)``), then compares the whole encoded
  block; we hand OpenSSL the same integer, ``s mod n``, padded to the modulus
  length, and OpenSSL's check of the PKCS#1 block and DigestInfo is as strict
  as dkimpy's comparison (tested against dkimpy on valid, tampered, short,
  over-long and ``s + n`` signatures, SHA-1 and SHA-256).
* **Same exceptions.**  A digest that does not fit the modulus raises dkimpy's
  ``DigestTooLargeError`` before any arithmetic, as dkimpy's encoder does;
  a bad signature is ``False``, never an exception.  Anything OpenSSL will not
  take (a hash other than SHA-1/SHA-256, a public key it refuses: even
  modulus, exponent under 3 or over 64 bits, modulus over 16384 bits, or a
  private key that is not ours; SHA-1 where an OpenSSL build refuses it)
  goes to dkimpy's own pure-Python function, so it gets exactly the answer
  or exception it got before.
* **Only our keys take the new signing path.**  :func:`prepare_private_key`,
  called when a key file is loaded (start-up and reload), returns
  :class:`PreparedRsaPem`: the PKCS#1 PEM text dkimpy's ``sign()`` takes,
  carrying the key already parsed by OpenSSL.  The replaced
  ``parse_pem_private_key`` hands dkimpy that parsed key (an
  :class:`OpenSslPrivateKey`, which is also dkimpy's own dict of the key's
  numbers) instead of re-reading the PEM; any other ``privkey`` is parsed by
  dkimpy as before, and signs in pure Python as before.  So a key is parsed
  once per key object, never per message, and a reload that loads a new key
  file makes a new object: nothing is cached by file name or kept globally.
* **Thread safety.**  A ``cryptography`` key is immutable and may sign from
  several threads at once; the replaced functions keep no state.

``PreparedRsaPem`` pickles as its PEM text and is parsed again on unpickling,
so a key can be handed to another process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dkim  # type: ignore[import-untyped]
import dkim.crypto  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

__all__ = [
    "PURE_PYTHON",
    "OpenSslPrivateKey",
    "PreparedRsaPem",
    "install",
    "installed",
    "parse_pem_private_key",
    "prepare_private_key",
    "rsassa_pkcs1_v1_5_sign",
    "rsassa_pkcs1_v1_5_verify",
    "uninstall",
]

PURE_PYTHON: dict[str, Callable[..., Any]] = {
    "parse_pem_private_key": dkim.crypto.parse_pem_private_key,
    "RSASSA_PKCS1_v1_5_sign": dkim.crypto.RSASSA_PKCS1_v1_5_sign,
    "RSASSA_PKCS1_v1_5_verify": dkim.crypto.RSASSA_PKCS1_v1_5_verify,
}
"""dkimpy's own functions, from ``dkim.crypto`` (where they are defined; never replaced)."""

_DIGESTS: dict[str, tuple[hashes.HashAlgorithm, int]] = {
    "sha256": (hashes.SHA256(), 19),
    "sha1": (hashes.SHA1(), 15),
}
"""Hash name -> (algorithm, length of its DER DigestInfo prefix), as dkimpy's ``HASH_ID_MAP``."""

PKCS1_OVERHEAD = 11
"""0x00 0x01, at least eight 0xff, 0x00 (RFC 8017 9.2, step 3)."""

MAX_MODULUS_BITS = 16384
"""OpenSSL's ``OPENSSL_RSA_MAX_MODULUS_BITS``: larger public keys go to dkimpy's arithmetic."""

MAX_EXPONENT_BITS = 64
"""OpenSSL refuses larger public exponents with moduli over 3072 bits; those go to dkimpy too."""


class OpenSslPrivateKey(dict[str, int]):
    """dkimpy's private-key dict (the fields its ``parse_private_key`` returns) plus the OpenSSL key.

    Being dkimpy's dict, it is a valid argument for dkimpy's own functions
    too: should anything reach the pure-Python path with it, it still signs.
    """

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        numbers = key.private_numbers()
        super().__init__(version=0, modulus=numbers.public_numbers.n,
                         publicExponent=numbers.public_numbers.e, privateExponent=numbers.d,
                         prime1=numbers.p, prime2=numbers.q, exponent1=numbers.dmp1,
                         exponent2=numbers.dmq1, coefficient=numbers.iqmp)
        self.key = key
        self.size = _byte_length(numbers.public_numbers.n)


class PreparedRsaPem(bytes):
    """PKCS#1 PEM text of an RSA private key, with the key already parsed (``parsed``)."""

    parsed: OpenSslPrivateKey

    def __reduce__(self) -> tuple[Callable[[bytes], PreparedRsaPem], tuple[bytes]]:
        return _from_pem, (bytes(self),)


def prepare_private_key(key: rsa.RSAPrivateKey) -> PreparedRsaPem:
    """The form our ``DkimKey`` holds and dkimpy's ``sign()``/``arc_sign()`` take: parsed once."""
    pem = PreparedRsaPem(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    pem.parsed = OpenSslPrivateKey(key)
    return pem


def _from_pem(pem: bytes) -> PreparedRsaPem:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("not an RSA private key")
    return prepare_private_key(key)


def _byte_length(modulus: int) -> int:
    """dkimpy's ``len(int2str(modulus))``: the modulus length in bytes (at least 1)."""
    return max(1, (modulus.bit_length() + 7) // 8)


# --------------------------------------------------------------------------- the replacements


def parse_pem_private_key(data: Any) -> Any:
    """dkimpy's ``parse_pem_private_key``: our prepared key as parsed at load, else dkimpy's parse."""
    if isinstance(data, PreparedRsaPem):
        return data.parsed
    return PURE_PYTHON["parse_pem_private_key"](data)


def rsassa_pkcs1_v1_5_sign(hasher: Any, private_key: Any) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)``, on OpenSSL for our keys."""
    digest = _DIGESTS.get(str(hasher.name).lower())
    if not isinstance(private_key, OpenSslPrivateKey) or digest is None:
        result: bytes = PURE_PYTHON["RSASSA_PKCS1_v1_5_sign"](hasher, private_key)
        return result
    algorithm, prefix = digest
    value = hasher.digest()
    if prefix + len(value) + PKCS1_OVERHEAD > private_key.size:
        raise dkim.crypto.DigestTooLargeError()
    try:
        return private_key.key.sign(value, padding.PKCS1v15(), utils.Prehashed(algorithm))
    except UnsupportedAlgorithm:  # an OpenSSL built without SHA-1 signatures
        result = PURE_PYTHON["RSASSA_PKCS1_v1_5_sign"](hasher, private_key)
        return result


def rsassa_pkcs1_v1_5_verify(hasher: Any, signature: bytes, public_key: Any) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)``, on OpenSSL."""
    digest = _DIGESTS.get(str(hasher.name).lower())
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    if digest is None or not _openssl_takes(modulus, exponent):
        result: bool = PURE_PYTHON["RSASSA_PKCS1_v1_5_verify"](hasher, signature, public_key)
        return result
    algorithm, prefix = digest
    value = hasher.digest()
    size = _byte_length(modulus)
    if prefix + len(value) + PKCS1_OVERHEAD > size:
        raise dkim.crypto.DigestTooLargeError()
    try:
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:  # parameters cryptography refuses: dkimpy's answer, whatever it is
        result = PURE_PYTHON["RSASSA_PKCS1_v1_5_verify"](hasher, signature, public_key)
        return result
    representative = (int.from_bytes(signature, "big") % modulus).to_bytes(size, "big")
    try:
        key.verify(representative, value, padding.PKCS1v15(), utils.Prehashed(algorithm))
    except InvalidSignature:
        if isinstance(algorithm, hashes.SHA1):  # an OpenSSL built to refuse SHA-1 says so too
            result = PURE_PYTHON["RSASSA_PKCS1_v1_5_verify"](hasher, signature, public_key)
            return result
        return False
    except UnsupportedAlgorithm:
        result = PURE_PYTHON["RSASSA_PKCS1_v1_5_verify"](hasher, signature, public_key)
        return result
    return True


def _openssl_takes(modulus: object, exponent: object) -> bool:
    return (isinstance(modulus, int) and isinstance(exponent, int)
            and 0 < modulus and modulus.bit_length() <= MAX_MODULUS_BITS
            and 3 <= exponent and exponent.bit_length() <= MAX_EXPONENT_BITS)


# --------------------------------------------------------------------------- installing

_OURS: dict[str, Callable[..., Any]] = {
    "parse_pem_private_key": parse_pem_private_key,
    "RSASSA_PKCS1_v1_5_sign": rsassa_pkcs1_v1_5_sign,
    "RSASSA_PKCS1_v1_5_verify": rsassa_pkcs1_v1_5_verify,
}


def install() -> None:
    """Point dkimpy's three module globals at the OpenSSL versions (idempotent)."""
    for name, function in _OURS.items():
        setattr(dkim, name, function)


def uninstall() -> None:
    """dkimpy's pure-Python functions again (for the benchmark and tests)."""
    for name, function in PURE_PYTHON.items():
        setattr(dkim, name, function)


def installed() -> bool:
    return all(getattr(dkim, name) is function for name, function in _OURS.items())


def _self_check() -> None:
    """Refuse to start if dkimpy no longer looks its RSA functions up where we replace them."""
    for name in _OURS:
        if not callable(getattr(dkim, name, None)):
            raise RuntimeError(f"dkimpy has no dkim.{name}; the OpenSSL RSA path needs updating")


_self_check()
install()
