"""RSA signature fields (DKIM-Signature, the first ARC set) built from a message parsed once.

Why not dkimpy's ``DKIM.sign`` and ``arc_sign`` end to end: each call parses
the whole message again, canonicalizes every header field again for every
signature, hashes the body again, and ``arc_sign`` re-reads our own
Authentication-Results with authres (a third of a seal's cost for a small
message, more than its two RSA signatures).  A forwarded message gets three
signatures, so that overhead, not the RSA, set our signing throughput.

Here a message is parsed once (:class:`SigningInput`, through
``headerfields.dkimpy_parse`` so obsolete syntax is read as before), each
field is canonicalized once per canonicalization, each body hash is computed
once, and the ARC-Authentication-Results is the Authentication-Results we
wrote (so nothing is parsed back).  The pieces are dkimpy's own --
``CanonicalizationPolicy``, ``fold``, ``hash_headers`` and the ``b=`` tag
regular expression -- put together as dkimpy's ``DomainSigner.gen_header``
puts them, so a DKIM-Signature is byte for byte the one ``DKIM.sign`` makes
(a test compares them) and the RSA step is OpenSSL's (``rsa_openssl``).

Only what is common is done here: RSA keys, and an ARC set with instance 1
(the message carries no ARC fields).  Ed25519 keys and messages continuing
an ARC chain go to dkimpy as before (``dkim.py``, ``arc.py``).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dkim  # type: ignore[import-untyped]
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

from ..headerfields import dkimpy_parse
from .rsa_openssl import PreparedRsaPem, parse_pem_private_key, rsassa_pkcs1_v1_5_sign

__all__ = ["ARC_FIELD_NAMES", "SigningInput", "arc_set", "dkim_signature", "signs_here"]

HeaderList = list[list[bytes]]
"""dkimpy's header list: ``[name, value]`` pairs, the value with its line ends."""

ARC_FIELD_NAMES = frozenset((b"arc-seal", b"arc-message-signature",
                             b"arc-authentication-results"))

RELAXED = b"relaxed/relaxed"
"""ARC's only canonicalization (RFC 8617 4.1.2 and 4.1.3)."""

AMS_HEADERS = frozenset(dkim.DKIM.SHOULD) | frozenset(dkim.DKIM.FROZEN)
"""What dkimpy's ``arc_sign`` covers by default (``default_sign_headers``): RFC 6376's list."""


@dataclass
class _Parsed:
    """What ``dkimpy_parse`` needs to hand back: dkimpy's header list and body."""

    headers: HeaderList
    body: bytes

    @classmethod
    def of(cls, view: bytes) -> _Parsed:
        headers, body = dkim.rfc822_parse(view)
        return cls(headers, body)


@dataclass
class SigningInput:
    """One message as the signers read it: parsed once, canonical forms made once each."""

    headers: HeaderList
    body: bytes
    _canonical: dict[bytes, HeaderList] = field(default_factory=dict)
    _body_hashes: dict[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, message: bytes) -> SigningInput:
        """dkimpy's parse of ``message`` (obsolete syntax as ``headerfields`` reads it);
        dkimpy's MessageFormatError for what it cannot read."""
        parsed = dkimpy_parse(message, _Parsed.of)
        return cls(parsed.headers, parsed.body)

    def canonical_headers(self, policy: Any) -> HeaderList:
        """Every field in ``policy``'s header canonicalization (relaxed is per field)."""
        name = policy.header_algorithm.name
        if name not in self._canonical:
            self._canonical[name] = policy.canonicalize_headers(self.headers)
        return self._canonical[name]

    def body_hash(self, policy: Any) -> bytes:
        """base64 SHA-256 of the body in ``policy``'s body canonicalization."""
        name = policy.body_algorithm.name
        if name not in self._body_hashes:
            digest = hashlib.sha256(policy.canonicalize_body(self.body)).digest()
            self._body_hashes[name] = base64.b64encode(digest)
        return self._body_hashes[name]

    def with_fields_above(self, fields: bytes) -> SigningInput:
        """This message with ``fields`` (whole CRLF-ended fields) prepended; the
        canonical forms already made are kept and extended, the body hashes reused."""
        added, _ = dkim.rfc822_parse(fields + b"\r\n")
        canonical = {name: _policy(name).canonicalize_headers(added) + headers
                     for name, headers in self._canonical.items()}
        return SigningInput(added + self.headers, self.body, canonical, self._body_hashes)

    def has_arc_fields(self) -> bool:
        return any(name.lower() in ARC_FIELD_NAMES for name, _ in self.headers)


def signs_here(private_pem: bytes) -> bool:
    """Keys this module signs with: RSA keys parsed at load (others go to dkimpy)."""
    return isinstance(private_pem, PreparedRsaPem)


def dkim_signature(message: SigningInput, domain: str, selector: str, private_pem: bytes,
                   canonicalization: str, include: Sequence[bytes],
                   timestamp: int | None = None) -> bytes:
    """The DKIM-Signature field ``DKIM.sign`` makes (``i=@domain``, no ``l=``), CRLF-ended."""
    policy = CanonicalizationPolicy.from_c_value(_c_value(canonicalization))
    include = tuple(name.lower() for name in include)
    if b"from" not in include:
        raise ValueError("the From header field must be signed")
    tags = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", policy.to_c_value()),
            (b"d", domain.encode("ascii")), (b"i", b"@" + domain.encode("ascii")),
            (b"q", b"dns/txt"), (b"s", selector.encode("ascii")), (b"t", _now(timestamp)),
            (b"h", b" : ".join(include)), (b"bh", message.body_hash(policy))]
    return _signature_field(b"DKIM-Signature", tags, include, policy,
                            message.canonical_headers(policy), private_pem)


def arc_set(message: SigningInput, domain: str, selector: str, private_pem: bytes,
            results: bytes, timestamp: int | None = None) -> bytes:
    """ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results, instance 1 (``cv=none``).

    ``results`` is the value of our Authentication-Results field (after the
    colon); the ARC-Authentication-Results carries it as written (RFC 8617
    4.1.1), where dkimpy would re-serialize it without comments.
    """
    if message.has_arc_fields():
        raise ValueError("the message continues an ARC chain")
    policy = CanonicalizationPolicy.from_c_value(RELAXED)
    include = _ams_headers(message.headers)
    if b"from" not in include:
        raise ValueError("the From header field must be signed")
    stamp = _now(timestamp)
    aar = b"ARC-Authentication-Results: i=1; " + results.strip() + b"\r\n"
    message = message.with_fields_above(aar)
    ams = _signature_field(
        b"ARC-Message-Signature",
        [(b"i", b"1"), (b"a", b"rsa-sha256"), (b"c", RELAXED), (b"d", domain.encode("ascii")),
         (b"s", selector.encode("ascii")), (b"t", stamp), (b"h", b" : ".join(include)),
         (b"bh", message.body_hash(policy))],
        include, policy, message.canonical_headers(policy), private_pem)
    message = message.with_fields_above(ams)
    seal = _signature_field(
        b"ARC-Seal",
        [(b"i", b"1"), (b"cv", b"none"), (b"a", b"rsa-sha256"), (b"d", domain.encode("ascii")),
         (b"s", selector.encode("ascii")), (b"t", stamp)],
        (b"arc-authentication-results", b"arc-message-signature"), policy,
        message.canonical_headers(policy), private_pem)
    return seal + ams + aar


def _signature_field(name: bytes, tags: list[tuple[bytes, bytes]], include: Sequence[bytes],
                     policy: Any, canonical_headers: HeaderList, private_pem: bytes) -> bytes:
    """dkimpy's ``DomainSigner.gen_header`` (not standardized) over canonical headers.

    ``b=`` is folded onto a line of its own first (60 zeros) so that the
    refold after signing leaves the other tags' white space as it was hashed.
    """
    tags = [*tags, (b"b", b"0" * 60)]
    value = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags), namelen=len(name),
                      linesep=b"\r\n")
    unsigned = (name, b" " + dkim.RE_BTAG.sub(b"\\1", value))
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, canonical_headers, include, unsigned, dict(tags))
    signature = rsassa_pkcs1_v1_5_sign(hasher, parse_pem_private_key(private_pem))
    tags[-1] = (b"b", base64.b64encode(signature))
    signed: bytes = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags) + b"\r\n",
                       namelen=len(name), linesep=b"\r\n")
    return name + b": " + signed


def _ams_headers(headers: HeaderList) -> tuple[bytes, ...]:
    """``default_sign_headers``: each present RFC 6376 field, then From once more."""
    present = [name.lower() for name, _ in headers if name.lower() in AMS_HEADERS]
    return tuple(present + [name for name in present if name in dkim.DKIM.FROZEN])


def _c_value(canonicalization: str) -> bytes:
    header, _, body = canonicalization.partition("/")
    return f"{header}/{body or 'simple'}".encode("ascii")


def _policy(header_algorithm: bytes) -> Any:
    return CanonicalizationPolicy.from_c_value(header_algorithm + b"/simple")


def _now(timestamp: int | None) -> bytes:
    return str(int(time.time()) if timestamp is None else timestamp).encode("ascii")
