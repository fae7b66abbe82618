"""Outbound DKIM signing, configured with OpenDKIM's own KeyTable, SigningTable and TrustedHosts.

Operators migrating from OpenDKIM keep their files, so the tables are read
with OpenDKIM's rules: ``#`` starts a comment, fields are separated by white
space, a KeyTable value is ``domain:selector:keypath``, a ``refile:``
SigningTable holds ``*`` wildcard patterns matched case-insensitively, and
the first SigningTable match wins (OpenDKIM's ``MultipleSignatures`` defaults
to no).  Only mail from a trusted client (``InternalHosts``; OpenDKIM's
default is 127.0.0.1) gets a SigningTable signature.  ``sign_forwarded_as``
is our addition: one key that signs *every* forwarded message, so receivers
see a valid signature from the forwarder even when the author's breaks.

Signatures follow OpenDKIM's defaults: the header fields of RFC 6376
section 5.4.1 (libopendkim's ``dkim_should_signhdrs``) that are present,
plus ``From`` over-signed as ``OversignHeaders From`` does.  RSA keys sign
rsa-sha256: ``signing.dkim_signature`` builds the field from the message
parsed once (byte for byte what dkimpy's ``sign()`` makes), OpenSSL signs
(``rsa_openssl``, the key parsed once when its file is loaded); a message
not parsed beforehand is signed by dkimpy as before.  Ed25519 keys sign
ed25519-sha256 (RFC 8463), which dkimpy does through PyNaCl
(``dkimpy[ed25519]``).  Key files are PEM as opendkim-genkey writes them
(PKCS#1 or PKCS#8; Ed25519 as PKCS#8), or dkimpy's bare base64 Ed25519 seed.

dkimpy's parser refuses header fields in RFC 5322's obsolete syntax
(``Name  : value``); it reads them through ``headerfields``, which
keeps the names as written, so a signature covers the bytes we send, in
either canonicalization.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import ipaddress
import logging
import os
import re
import stat
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dkim  # type: ignore[import-untyped]
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..config import DkimSettings
from ..errors import ConfigError
from ..headerfields import dkimpy_parse, dkimpy_view
from ..private_files import create_private_file
from .rsa_openssl import PreparedRsaPem, prepare_private_key
from .signing import SigningInput, dkim_signature, signs_here

__all__ = [
    "OVERSIGN_HEADERS",
    "SIGN_HEADERS",
    "DkimConfig",
    "DkimError",
    "DkimKey",
    "DkimSigner",
    "SigningRule",
    "TrustedNetwork",
    "check_key_file",
    "from_address",
    "generate_key",
    "headers_to_sign",
    "load_dkim",
    "sign_message",
]

log = logging.getLogger("mailforward.dkim")

SIGN_HEADERS: tuple[str, ...] = (
    "from", "reply-to", "subject", "date", "to", "cc",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
    "in-reply-to", "references",
    "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post",
    "list-owner", "list-archive",
)
"""libopendkim's default ``SignHeaders``: RFC 6376 section 5.4.1's list, signed when present."""

OVERSIGN_HEADERS: tuple[str, ...] = ("from",)
"""The seed's ``OversignHeaders From``: named once more than it occurs, so none can be added."""

DEFAULT_TRUSTED: tuple[str, ...] = ("127.0.0.1",)
"""OpenDKIM's ``InternalHosts`` when none is configured."""

ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
TXT_STRING_MAX = 255
LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
HOSTNAME = re.compile(rf"^{LABEL}(\.{LABEL})*\.?$", re.I)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class DkimError(ConfigError):
    """The DKIM tables or keys are unusable; the message names the file (and line)."""


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class DkimKey:
    """One KeyTable entry with its private key loaded.

    ``private_pem`` is in the form dkimpy's ``sign()`` takes: PKCS#1 PEM for
    RSA, the base64 32-byte seed for Ed25519 (whatever the file held).  For
    RSA keys loaded from a file it is a :class:`~.rsa_openssl.PreparedRsaPem`,
    which carries the key parsed by OpenSSL at load, so signing never parses
    it again.
    """

    domain: str
    selector: str
    path: str
    private_pem: bytes = field(repr=False)  # never in a repr, a log line or a test failure
    algorithm: str

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def public_key_base64(self) -> str:
        """The ``p=`` value: SubjectPublicKeyInfo for RSA, raw 32 bytes for Ed25519 (RFC 8463)."""
        if self.algorithm == "ed25519":
            seed = base64.b64decode(self.private_pem)
            public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return base64.b64encode(raw).decode("ascii")
        if isinstance(self.private_pem, PreparedRsaPem):
            key: object = self.private_pem.parsed.key
        else:
            key = serialization.load_pem_private_key(self.private_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimError(f"[dkim] key file {self.path}: not an RSA private key")
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode("ascii")

    def public_record(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key_base64()}"

    def zone_lines(self) -> str:
        """The record as zone-file text; TXT strings hold at most 255 bytes, so ``p=`` is split."""
        pieces = [f"v=DKIM1; k={self.algorithm}; "]
        value = "p=" + self.public_key_base64()
        pieces += [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
        strings = " ".join(f'"{piece}"' for piece in pieces)
        return f"{self.name}. IN TXT ( {strings} )"


def check_key_file(path: str) -> bytes:
    """Read a private key file, refusing one that "other" users may access.

    Like OpenDKIM's ``RequireSafeKeys``: a key others can read is a key that
    may have leaked, so we stop at start-up rather than sign with it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DkimError(f"[dkim] key file {path}: not found") from None
    except OSError as e:
        raise DkimError(f"[dkim] key file {path}: cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise DkimError(f"[dkim] key file {path}: not a regular file")
        if mode & 0o007:
            raise DkimError(f"[dkim] key file {path}: accessible by other users "
                            f"(mode {stat.S_IMODE(mode):04o}); chmod o= it")
        return f.read()


def parse_private_key(data: bytes, path: str) -> tuple[str, bytes]:
    """(algorithm, dkimpy key) from PEM (PKCS#1 or PKCS#8), DER, or a base64 Ed25519 seed.

    PEM is what opendkim-genkey writes (``openssl genrsa``, ``openssl genpkey
    -algorithm ed25519``) and libopendkim reads; the bare base64 seed is what
    dkimpy's ``dknewkey`` and rspamd write for Ed25519, accepted too.
    """
    text = data.strip()
    if not text.startswith(b"-----"):
        seed = _base64_seed(text)
        if seed is not None:
            return "ed25519", base64.b64encode(seed)
    try:
        if text.startswith(b"-----"):
            key = serialization.load_pem_private_key(text, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DkimError(f"[dkim] key file {path}: not an unencrypted RSA or Ed25519 "
                        "private key") from None
    return _dkimpy_key(key, path)


def _base64_seed(text: bytes) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _dkimpy_key(key: object, path: str) -> tuple[str, bytes]:
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa", prepare_private_key(key)  # the one parse of this key: OpenSSL's, above
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return "ed25519", base64.b64encode(seed)
    raise DkimError(f"[dkim] key file {path}: {type(key).__name__} keys cannot sign DKIM; "
                    "use RSA or Ed25519")


def load_key(domain: str, selector: str, path: str) -> DkimKey:
    algorithm, private = parse_private_key(check_key_file(path), path)
    return DkimKey(domain=domain.lower(), selector=selector, path=path,
                   private_pem=private, algorithm=algorithm)


def generate_key(domain: str, selector: str, directory: Path, key_type: str = "rsa",
                 bits: int = 2048) -> DkimKey:
    """Write ``directory/<selector>.private`` (mode 0600) as opendkim-genkey would, and load it.

    RSA is PKCS#1 PEM (``openssl genrsa``), Ed25519 is PKCS#8 PEM (``openssl
    genpkey``): both OpenDKIM and :func:`load_dkim` read them.  An existing
    file is never overwritten: it may be the key a published record needs.
    """
    if not selector or "/" in selector or selector.startswith("."):
        raise DkimError(f"[dkim] selector {selector!r}: not usable as a file name")
    path = Path(directory) / f"{selector}.private"
    try:
        create_private_file(path, _new_private_pem(key_type, bits))
    except FileExistsError:
        raise DkimError(f"[dkim] key file {path}: already exists; not overwriting it") from None
    except OSError as e:
        raise DkimError(f"[dkim] key file {path}: cannot be created ({e.strerror})") from None
    return load_key(domain, selector, str(path))


def _new_private_pem(key_type: str, bits: int) -> bytes:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    if key_type != "rsa":
        raise DkimError(f"[dkim] key type {key_type!r}: use rsa or ed25519")
    if bits < 1024:
        raise DkimError(f"[dkim] {bits}-bit RSA key: verifiers reject keys under 1024 bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableLine:
    """One non-blank table line; ``where`` names its file and line for error messages."""

    where: str
    fields: tuple[str, ...]


def read_table(path: str, inline: Sequence[str], inline_name: str) -> list[TableLine]:
    """The lines of a table given as a file or inline, comments and blank lines dropped.

    OpenDKIM's explicit ``file:`` data-set prefix is accepted (and ``refile:``,
    whose meaning the caller handles), as migrated configs often carry them.
    """
    path = path.removeprefix("refile:").removeprefix("file:")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DkimError(f"[dkim] {path}: not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DkimError(f"[dkim] {path}: cannot be read ({e})") from None
        return _table_lines(text.splitlines(), path)
    return _table_lines(inline, f"[dkim] {inline_name}")


def _table_lines(lines: Iterable[str], source: str) -> list[TableLine]:
    result = []
    for number, line in enumerate(lines, start=1):
        fields = tuple(line.split("#", 1)[0].split())
        if fields:
            result.append(TableLine(f"{source}, line {number}", fields))
    return result


def parse_key_table(lines: Iterable[TableLine]) -> dict[str, DkimKey]:
    """KeyTable lines ``name domain:selector:keypath``, keys loaded (first of a name wins).

    Names are case-sensitive, as in OpenDKIM (its KeyTable is the one table
    it opens without case folding).  A key that fails to load is reported
    with its KeyTable line, so the operator knows which entry to fix.
    """
    keys: dict[str, DkimKey] = {}
    for line in lines:
        name, domain, selector, path = _key_entry(line)
        try:
            key = load_key(domain, selector, path)
        except DkimError as e:
            raise DkimError(f"{line.where}: {e}") from None
        keys.setdefault(name, key)
    return keys


def _key_entry(line: TableLine) -> tuple[str, str, str, str]:
    if len(line.fields) != 2:
        raise DkimError(f"{line.where}: expected 'name domain:selector:keypath'")
    name, value = line.fields
    parts = value.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise DkimError(f"{line.where}: value {value!r} is not domain:selector:keypath")
    domain, selector, path = parts
    if domain == "%":
        raise DkimError(f"{line.where}: the '%' domain (signer's own domain) is not supported; "
                        "name the domain")
    return name, domain, selector, path


@dataclass(frozen=True)
class SigningRule:
    """A SigningTable line: who (an address or domain, or a ``*`` pattern) signs with which key."""

    pattern: str
    key_name: str
    wildcard: bool
    regex: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def make(cls, pattern: str, key_name: str, wildcard: bool) -> SigningRule:
        pieces = (re.escape(piece) for piece in pattern.lower().split("*"))
        return cls(pattern.lower(), key_name, wildcard, re.compile(".*".join(pieces)))

    def matches(self, candidate: str) -> bool:
        if self.wildcard:
            return self.regex.fullmatch(candidate) is not None
        return candidate == self.pattern


def parse_signing_table(lines: Iterable[TableLine], keys: Mapping[str, DkimKey],
                        wildcard: bool) -> tuple[SigningRule, ...]:
    rules = []
    for line in lines:
        if len(line.fields) != 2:
            raise DkimError(f"{line.where}: expected 'pattern keyname'")
        pattern, key_name = line.fields
        if key_name not in keys:
            raise DkimError(f"{line.where}: key {key_name!r} is not in the KeyTable")
        rules.append(SigningRule.make(pattern, key_name, wildcard))
    return tuple(rules)


# --------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class TrustedNetwork:
    network: Network
    negated: bool = False


def parse_trusted(lines: Iterable[TableLine]
                  ) -> tuple[tuple[TrustedNetwork, ...], tuple[str, ...]]:
    """(networks, hostnames) from TrustedHosts/InternalHosts entries.

    Entries are IP addresses, CIDR networks, ``localhost`` (127.0.0.1 and
    ::1), or other host names, each optionally negated with ``!``.  OpenDKIM
    matches host names against the client's reverse DNS; we resolve nothing
    at load, so they are kept (and logged) but never match.
    """
    networks: list[TrustedNetwork] = []
    hostnames: list[str] = []
    for line in lines:
        for entry in line.fields:
            negated = entry.startswith("!")
            name = entry.removeprefix("!").strip("[]")
            found = _networks(name, line)
            networks += [TrustedNetwork(net, negated) for net in found]
            if not found:
                hostnames.append(entry)
    return tuple(networks), tuple(hostnames)


def _networks(name: str, line: TableLine) -> list[Network]:
    if name.lower() == "localhost":
        return [ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("::1")]
    try:
        return [ipaddress.ip_network(name, strict=False)]
    except ValueError:
        pass
    if not HOSTNAME.match(name) or name.replace(".", "").isdigit():
        raise DkimError(f"{line.where}: {name!r} is not an address, network or host name")
    return []


def _client_address(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(client_ip.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DkimConfig:
    """The loaded tables: keys by KeyTable name, SigningTable rules, trusted clients."""

    keys: Mapping[str, DkimKey]
    rules: tuple[SigningRule, ...] = ()
    trusted: tuple[TrustedNetwork, ...] = ()
    unresolved_hosts: tuple[str, ...] = ()
    sign_forwarded_as: DkimKey | None = None
    canonicalization: str = "relaxed/simple"

    def signers_for(self, from_address: str) -> list[DkimKey]:
        """The SigningTable's key for a From address: ``user@domain`` first, then ``domain``.

        OpenDKIM's lookup order (with ``SubDomains no``).  For a ``refile:``
        table each candidate is tried against the patterns in file order;
        the first match wins.
        """
        address = from_address.strip().strip("<>").lower()
        candidates = [address]
        if "@" in address:
            candidates.append(address.rpartition("@")[2])
        for candidate in candidates:
            for rule in self.rules:
                if rule.matches(candidate):
                    return [self.keys[rule.key_name]]
        return []

    def is_trusted(self, client_ip: str) -> bool:
        """Whether mail from this client may be signed by the SigningTable.

        The most specific matching entry decides, a negated one winning a tie
        (OpenDKIM looks up ``!addr/bits`` before ``addr/bits``, longest
        prefix first).  Unparseable addresses are not trusted.
        """
        address = _client_address(client_ip)
        if address is None:
            return False
        matches = [entry for entry in self.trusted if address in entry.network]
        if not matches:
            return False
        best = max(matches, key=lambda entry: (entry.network.prefixlen, entry.negated))
        return not best.negated

    def key_for(self, domain: str, selector: str | None = None) -> DkimKey | None:
        """The first KeyTable key for a domain (and selector, if given)."""
        for key in self.keys.values():
            if key.domain == domain.lower() and selector in (None, key.selector):
                return key
        return None


def load_dkim(settings: DkimSettings) -> DkimConfig | None:
    """Read and check everything at start-up, so a bad table stops the program, not a message.

    Inline ``signing`` lines are taken as ``refile:`` patterns: a one-file
    config has no file name to prefix, and patterns are what operators
    write (an exact address or domain is a pattern without ``*`` anyway).
    """
    if not settings.enabled:
        return None
    keys = parse_key_table(read_table(settings.key_table, settings.keys, "keys"))
    wildcard = settings.signing_table.startswith("refile:") or not settings.signing_table
    rules = parse_signing_table(read_table(settings.signing_table, settings.signing, "signing"),
                                keys, wildcard)
    trusted, hostnames = _load_trusted(settings)
    if hostnames:
        log.warning("DKIM trusted hosts %s are host names; without DNS at load they never "
                    "match (use addresses)", ", ".join(hostnames))
    return DkimConfig(keys=types.MappingProxyType(keys), rules=rules, trusted=trusted,
                      unresolved_hosts=hostnames,
                      sign_forwarded_as=_forwarding_key(settings.sign_forwarded_as, keys),
                      canonicalization=settings.canonicalization)


def _load_trusted(settings: DkimSettings) -> tuple[tuple[TrustedNetwork, ...], tuple[str, ...]]:
    if settings.trusted_hosts or settings.trusted:
        return parse_trusted(read_table(settings.trusted_hosts, settings.trusted, "trusted"))
    return parse_trusted(_table_lines(DEFAULT_TRUSTED, "default InternalHosts"))


def _forwarding_key(domain: str, keys: Mapping[str, DkimKey]) -> DkimKey | None:
    if not domain:
        return None
    for key in keys.values():
        if key.domain == domain.lower():
            return key
    raise DkimError(f"[dkim] sign_forwarded_as: no KeyTable entry has domain {domain!r}")


# --------------------------------------------------------------------------- signing


def headers_to_sign(headers: Iterable[Sequence[bytes]]) -> list[bytes]:
    """The ``h=`` list: each present header of :data:`SIGN_HEADERS`, then the over-signed ones."""
    present = [name.lower() for name, _ in headers if name.lower().decode("ascii", "replace")
               in SIGN_HEADERS]
    return present + [name.encode("ascii") for name in OVERSIGN_HEADERS]


def sign_message(message: bytes, key: DkimKey, canonicalization: str) -> bytes:
    """One DKIM-Signature header (CRLF-terminated) by ``key``; dkimpy's exceptions propagate."""
    header_canon, _, body_canon = canonicalization.partition("/")
    signer = dkimpy_parse(message, functools.partial(
        dkim.DKIM, signature_algorithm=ALGORITHMS[key.algorithm], linesep=b"\r\n"))
    signature: bytes = signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                                   key.private_pem,
                                   canonicalize=(header_canon.encode(),
                                                 (body_canon or "simple").encode()),
                                   include_headers=headers_to_sign(signer.headers))
    return signature


def from_address(message: bytes) -> str:
    """The first address of the first From header, lower-cased ("" if none)."""
    headers, _ = dkim.rfc822_parse(dkimpy_view(message))
    for name, value in headers:
        if name.lower() == b"from":
            text = re.sub(r"\r?\n", "", value.decode("utf-8", "replace"))
            for _, address in email.utils.getaddresses([text]):
                if "@" in address:
                    return address.lower()
            return ""
    return ""


class DkimSigner:
    """Chooses the keys for a message and signs, never failing the delivery.

    A signing failure is logged (key name and exception type only, never
    message content), counted in ``signing_failures``, and that signature is
    left out: delivering unsigned beats losing or deferring forwarded mail.
    """

    def __init__(self, config: DkimConfig) -> None:
        self.config = config
        self.signing_failures = 0

    def keys_for(self, message: bytes, client_ip: str) -> list[DkimKey]:
        """SigningTable keys for trusted clients, then ``sign_forwarded_as``, each key once."""
        keys = []
        if self.config.is_trusted(client_ip):
            address = from_address(message)
            keys = self.config.signers_for(address) if address else []
        forwarded = self.config.sign_forwarded_as
        if forwarded is not None and forwarded not in keys:
            keys.append(forwarded)
        return keys

    def signature_headers(self, message: bytes, client_ip: str,
                          parsed: SigningInput | None = None) -> bytes:
        """DKIM-Signature header(s) to prepend to ``message``; b"" when no key applies.

        ``parsed``: the message already parsed for signing (``signing``), so
        RSA signatures are made without dkimpy parsing it again.
        """
        try:
            keys = self.keys_for(message, client_ip)
        except Exception as e:  # an unparseable message must still be delivered
            self._failed("(choosing keys)", e)
            return b""
        return b"".join(self._sign(message, key, parsed) for key in keys)

    def _sign(self, message: bytes, key: DkimKey, parsed: SigningInput | None) -> bytes:
        try:
            if parsed is not None and signs_here(key.private_pem):
                return dkim_signature(parsed, key.domain, key.selector, key.private_pem,
                                      self.config.canonicalization,
                                      headers_to_sign(parsed.headers))
            return sign_message(message, key, self.config.canonicalization)
        except Exception as e:  # dkimpy raises many types; none may stop delivery
            self._failed(key.name, e)
            return b""

    def _failed(self, what: str, error: Exception) -> None:
        self.signing_failures += 1
        log.error("DKIM signing %s failed (%s); sending without this signature",
                  what, type(error).__name__)
