"""Sender Rewriting Scheme, byte for byte as PostSRSd 1.x (libsrs2) does it.

Why hand-written: the addresses we mint must be reversible by a PostSRSd
sharing our secret (and vice versa) during a migration, so every quirk of
PostSRSd 1.x is kept on purpose -- HMAC-SHA1 keyed with the secret *text*,
ASCII-only lower-casing, standard base64 alphabet, a two-character base32 day
stamp that wraps every 1024 days, a case-insensitive hash compare, splitting
at the *first* '@', and PostSRSd's own error texts (``.reason``), which the
tcp_table server (``srs_tcp``) sends back verbatim.

The core works on bytes (``forward_bytes``/``reverse_bytes``) because
PostSRSd's lengths, case folding and comparisons are byte-wise C-string
operations; the ``str`` API encodes with UTF-8 + ``surrogateescape`` so any
byte string the wire can carry round-trips unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _secrets
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import SrsSettings
from .errors import MailforwardError
from .private_files import create_private_file

__all__ = [
    "SEPARATORS",
    "SrsConfigError",
    "SrsError",
    "SrsExpired",
    "SrsHashError",
    "SrsInvalid",
    "SrsNotRewritten",
    "SrsNotSrsAddress",
    "SrsRewriter",
    "SrsSecretError",
    "SrsSyntaxError",
    "generate_secret_file",
    "is_srs_address",
    "load_secrets",
]

SEPARATORS = "=+-"
"""The separators allowed after SRS0/SRS1; every other separator is '='."""

# PostSRSd's reply texts, kept exactly (including its "py policy" typo) so that
# Postfix sees the same 500 answers from us as from PostSRSd.
EXCLUDED = "Domain excluded py policy"
ALREADY_REWRITTEN = "Already rewritten"
NO_AT_SIGN = "No at sign in sender address"
NOT_SRS = "Not an SRS address."
BUFFER_TOO_SMALL = "Buffer too small."
HASH_TOO_SHORT = "Hash too short in SRS address."
HASH_INVALID = "Hash invalid in SRS address."
STAMP_OUT_OF_DATE = "Time stamp out of date."
BAD_STAMP_CHAR = "Bad base32 character in timestamp."

_B32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECONDS_PER_DAY = 86400
_STAMP_SLOTS = 1024  # two base32 characters: the stamp is days mod 1024
_MAX_LEN = 1024  # PostSRSd's ``char value[1024]``: 1024 bytes or more is refused
_MAX_HASH_LENGTH = 27  # base64 of a 20-byte SHA-1 digest without padding
_SEPS = SEPARATORS.encode()


class SrsError(MailforwardError):
    """Root of every SRS error; ``reason`` is PostSRSd's reply text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SrsNotRewritten(SrsError):
    """forward() leaves the sender alone (excluded domain, already ours).

    Not a failure of the mail: Postfix keeps the original sender.
    """


class SrsInvalid(SrsError):
    """The address cannot be rewritten or reversed as given."""


class SrsNotSrsAddress(SrsInvalid):
    """reverse() of an address that is not SRS0/SRS1 at all."""


class SrsSyntaxError(SrsInvalid):
    """A malformed address: missing field, no '@', bad stamp character, too long."""


class SrsHashError(SrsInvalid):
    """The hash is too short or does not verify with any secret (forged or foreign)."""


class SrsExpired(SrsInvalid):
    """The day stamp is older than ``max_age_days`` (or in the future)."""


class SrsConfigError(SrsError):
    """The rewriter was configured with invalid values."""


class SrsSecretError(SrsConfigError):
    """The secrets file is missing, empty, unsafe or unreadable; the message names it."""


def is_srs_address(local_part: str) -> bool:
    """Does ``local_part`` start with SRS0/SRS1 (any case) and one of ``= + -``?"""
    return (
        len(local_part) >= 5
        and local_part[0] in "Ss"
        and local_part[1] in "Rr"
        and local_part[2] in "Ss"
        and local_part[3] in "01"
        and local_part[4] in SEPARATORS
    )


def _encode(text: str) -> bytes:
    """The wire bytes of ``text``; surrogateescape keeps undecodable bytes intact."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise SrsSyntaxError(f"Address contains an unencodable character at {e.start}.") from e


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _has_tag(user: bytes, tag: bytes) -> bool:
    """libsrs2's tag test: case-insensitive tag, then a separator.

    Like C's ``strchr(seps, user[4])``, a string that *ends* after the tag
    counts too (strchr finds the terminating NUL).
    """
    return user[:4].lower() == tag and (len(user) == 4 or user[4] in _SEPS)


def _looks_srs(address: bytes) -> bool:
    """PostSRSd's ``SRS_IS_SRS_ADDRESS``: "SRS", then 0/1, then a separator.

    As in C, the end of the string also satisfies each character test.
    """
    return (
        len(address) >= 3
        and address[:3].lower() == b"srs"
        and (len(address) == 3 or address[3] in b"01")
        and (len(address) <= 4 or address[4] in _SEPS)
    )


class SrsRewriter:
    """One SRS configuration: forward() for senders, reverse() for bounces.

    Frozen after construction (attributes cannot be reassigned), so one
    instance can be shared by every connection.
    """

    domain: str
    separator: str
    hash_length: int
    hash_min: int
    max_age_days: int
    exclude_domains: tuple[str, ...]
    _clock: Callable[[], float]
    _keys: tuple[bytes, ...]
    _domain: bytes
    _excludes: tuple[bytes, ...]

    def __init__(
        self,
        domain: str,
        secrets: Sequence[str],
        separator: str = "=",
        hash_length: int = 4,
        hash_min: int = 4,
        max_age_days: int = 21,
        exclude_domains: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not domain or "@" in domain or any(c.isspace() or c == "\0" for c in domain):
            raise SrsConfigError(f"SRS domain {domain!r} is not a domain name")
        if isinstance(secrets, str) or not secrets:
            raise SrsConfigError("SRS needs a non-empty list of secrets (the first one signs)")
        for secret in secrets:
            # PostSRSd reads one secret per line and stops at NUL: such secrets
            # could never be shared with it.
            if not secret or any(c in secret for c in "\r\n\0"):
                raise SrsConfigError("an SRS secret must be non-empty and free of CR, LF and NUL")
        if separator not in SEPARATORS or len(separator) != 1:
            raise SrsConfigError(f"SRS separator must be one of {SEPARATORS!r}, not {separator!r}")
        if not 1 <= hash_length <= _MAX_HASH_LENGTH:
            raise SrsConfigError(f"SRS hash_length must be 1..{_MAX_HASH_LENGTH}, not {hash_length}")
        # hash_min 0 would accept an empty hash: every address would verify.
        if not 1 <= hash_min <= hash_length:
            raise SrsConfigError(f"SRS hash_min must be 1..hash_length ({hash_length}), not {hash_min}")
        if not 0 <= max_age_days < _STAMP_SLOTS:
            raise SrsConfigError(f"SRS max_age_days must be 0..{_STAMP_SLOTS - 1}, not {max_age_days}")
        for excluded in exclude_domains:
            if not excluded or any(c.isspace() or c in ",;\0" for c in excluded):
                raise SrsConfigError(f"SRS excluded domain {excluded!r} is not a domain name")
        sets = object.__setattr__
        sets(self, "domain", domain)
        sets(self, "separator", separator)
        sets(self, "hash_length", hash_length)
        sets(self, "hash_min", hash_min)
        sets(self, "max_age_days", max_age_days)
        sets(self, "exclude_domains", tuple(exclude_domains))
        sets(self, "_clock", clock)
        sets(self, "_keys", tuple(_encode(s) for s in secrets))
        sets(self, "_domain", _encode(domain))
        sets(self, "_excludes", tuple(_encode(d).lower() for d in exclude_domains))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SrsRewriter is immutable; cannot set {name!r}")

    def __repr__(self) -> str:  # never show the secrets
        return (f"SrsRewriter(domain={self.domain!r}, separator={self.separator!r}, "
                f"hash_length={self.hash_length}, hash_min={self.hash_min}, "
                f"max_age_days={self.max_age_days}, exclude_domains={self.exclude_domains!r})")

    # -- str API ---------------------------------------------------------------

    def forward(self, sender: str) -> str:
        """The envelope sender to use when forwarding mail from ``sender``.

        The null sender ``""`` is returned unchanged: bounces must never get
        a return path (RFC 5321 4.5.5), and Postfix never even asks PostSRSd
        about it.  Own-domain senders come back unchanged; an excluded domain
        or an address that is already ours raises SrsNotRewritten.
        """
        if sender == "":
            return ""
        return _decode(self.forward_bytes(_encode(sender)))

    def reverse(self, address: str) -> str:
        """The original sender behind the SRS ``address`` (a bounce's recipient).

        Raises an SrsInvalid subclass: SrsNotSrsAddress for ordinary
        addresses, SrsHashError for forged or foreign ones, SrsExpired for
        stale ones, SrsSyntaxError for mangled ones.
        """
        return _decode(self.reverse_bytes(_encode(address)))

    # -- wire (bytes) API, exactly PostSRSd's handle_forward / srs_reverse -------

    def forward_bytes(self, sender: bytes) -> bytes:
        """forward() on raw bytes, with no special case for the empty sender.

        The order of the checks is PostSRSd's: excluded, already ours,
        no '@', own domain.
        """
        if self._is_excluded(sender):
            raise SrsNotRewritten(EXCLUDED)
        try:
            self.reverse_bytes(sender)
        except SrsError:
            pass
        else:
            raise SrsNotRewritten(ALREADY_REWRITTEN)
        user, at, host = sender.partition(b"@")
        if not at:
            raise SrsSyntaxError(NO_AT_SIGN)
        if host.lower() == self._domain.lower():
            return self._fits(sender)
        sep = self.separator.encode()
        if _has_tag(user, b"srs1"):
            # Another forwarder's SRS1: keep its first hop, re-sign it for us.
            # (For a bare "SRS1" local part C reads on into the host part.)
            rest = user[5:] if len(user) > 4 else host
            if not rest:
                raise SrsSyntaxError("No hash in SRS1 address.")
            fields = rest.split(b"=", 2)
            if len(fields) < 2:
                raise SrsSyntaxError("No host in SRS1 address.")
            if len(fields) < 3:
                raise SrsSyntaxError("No user in SRS1 address.")
            _, first_host, first_rest = fields
            digest = self._hash(0, first_host, first_rest)
            result = b"SRS1" + sep + digest + b"=" + first_host + b"=" + first_rest
        elif _has_tag(user, b"srs0"):
            # Another forwarder's SRS0: wrap it as SRS1 naming that forwarder.
            rest = user[4:]
            digest = self._hash(0, host, rest)
            result = b"SRS1" + sep + digest + b"=" + host + b"=" + rest
        else:
            stamp = self._stamp()
            digest = self._hash(0, stamp, host, user)
            result = b"SRS0" + sep + digest + b"=" + stamp + b"=" + host + b"=" + user
        return self._fits(result + b"@" + self._domain)

    def reverse_bytes(self, address: bytes) -> bytes:
        """reverse() on raw bytes; the part after the first '@' is ignored."""
        if not _looks_srs(address):
            raise SrsNotSrsAddress(NOT_SRS)
        if len(address) >= _MAX_LEN:
            raise SrsSyntaxError(BUFFER_TOO_SMALL)
        user = address.partition(b"@")[0]
        tag = user[:4].lower()
        if tag == b"srs1":
            if not user[5:]:
                raise SrsSyntaxError("No hash in SRS1 address.")
            fields = user[5:].split(b"=", 2)
            if len(fields) < 2:
                raise SrsSyntaxError("No host in SRS1 address.")
            if len(fields) < 3:
                raise SrsSyntaxError("No user in SRS1 address.")
            digest, host, rest = fields
            self._check_hash(digest, host, rest)
            return b"SRS0" + rest + b"@" + host
        if tag == b"srs0":
            if not user[5:]:
                raise SrsSyntaxError("No hash in SRS0 address.")
            fields = user[5:].split(b"=", 3)
            if len(fields) < 2:
                raise SrsSyntaxError("No timestamp in SRS0 address.")
            if len(fields) < 3:
                raise SrsSyntaxError("No host in SRS0 address.")
            if len(fields) < 4:
                raise SrsSyntaxError("No user in SRS0 address.")
            digest, stamp, host, orig_user = fields
            self._check_stamp(stamp)
            self._check_hash(digest, stamp, host, orig_user)
            return orig_user + b"@" + host
        raise SrsNotSrsAddress(NOT_SRS)

    # -- internals -------------------------------------------------------------

    def _is_excluded(self, sender: bytes) -> bool:
        """PostSRSd's suffix test on the whole address, case-insensitive.

        "example.com" matches exactly after the '@'; ".example.com" matches
        any subdomain but not the domain itself.
        """
        lowered = sender.lower()
        for excluded in self._excludes:
            n = len(excluded)
            if n >= len(sender) or not lowered.endswith(excluded):
                continue
            if excluded.startswith(b".") or sender[-n - 1:-n] == b"@":
                return True
        return False

    def _stamp(self) -> bytes:
        day = int(self._clock()) // _SECONDS_PER_DAY
        return bytes((_B32[(day >> 5) & 31], _B32[day & 31]))

    def _check_stamp(self, stamp: bytes) -> None:
        """Valid iff 0 <= age <= max_age_days, age computed modulo 1024 days.

        A stamp from the future therefore looks ~1000 days old and fails.
        """
        if len(stamp) != 2:
            raise SrsExpired(STAMP_OUT_OF_DATE)
        then = 0
        for char in stamp.upper():
            index = _B32.find(char)
            if index < 0:
                raise SrsSyntaxError(BAD_STAMP_CHAR)
            then = (then << 5) | index
        now = (int(self._clock()) // _SECONDS_PER_DAY) % _STAMP_SLOTS
        if now < then:
            now += _STAMP_SLOTS
        if now > then + self.max_age_days:
            raise SrsExpired(STAMP_OUT_OF_DATE)

    def _hash(self, key_index: int, *fields: bytes) -> bytes:
        """HMAC-SHA1 of the lower-cased fields, base64, cut to hash_length."""
        mac = hmac.new(self._keys[key_index], digestmod=hashlib.sha1)
        for field in fields:
            mac.update(field.lower())  # bytes.lower() is ASCII-only, like C's tolower
        return base64.b64encode(mac.digest())[: self.hash_length]

    def _check_hash(self, digest: bytes, *fields: bytes) -> None:
        """Case-insensitive prefix compare against every secret (key rotation).

        At least hash_min characters must be present; anything beyond
        hash_length is ignored, so shorter hashes from before a hash_length
        increase keep working.
        """
        if len(digest) < self.hash_min:
            raise SrsHashError(HASH_TOO_SHORT)
        n = min(len(digest), self.hash_length)
        wanted = digest[:n].lower()
        for index in range(len(self._keys)):
            if hmac.compare_digest(self._hash(index, *fields)[:n].lower(), wanted):
                return
        raise SrsHashError(HASH_INVALID)

    @staticmethod
    def _fits(address: bytes) -> bytes:
        if len(address) >= _MAX_LEN:
            raise SrsSyntaxError(BUFFER_TOO_SMALL)
        return address


# -- the secrets file -----------------------------------------------------------

_LINE_MAX = 1022  # PostSRSd reads lines with fgets(buf, 1024): longer lines split


def _describe_access(mode: int) -> str:
    bits = [
        (stat.S_IRGRP, "readable by group"), (stat.S_IWGRP, "writable by group"),
        (stat.S_IXGRP, "executable by group"), (stat.S_IROTH, "readable by others"),
        (stat.S_IWOTH, "writable by others"), (stat.S_IXOTH, "executable by others"),
    ]
    return ", ".join(text for bit, text in bits if mode & bit)


def load_secrets(path: str | os.PathLike[str]) -> list[str]:
    """The secrets in ``path``, one per line; the first signs, all verify.

    Lines are taken as written (the hex *text*, trailing blanks included),
    as PostSRSd does; empty lines are skipped.  The file must belong to us
    alone (no group/other permission bits): the secret is what stops anyone
    from minting addresses that relay through us.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SrsSecretError(f"SRS secret file {path} does not exist") from None
    except OSError as e:
        raise SrsSecretError(f"SRS secret file {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SrsSecretError(f"SRS secret file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SrsSecretError(
            f"SRS secret file {path} is {_describe_access(mode)} (mode {mode:04o}); "
            f"run: chmod 600 {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SrsSecretError(f"SRS secret file {path} cannot be read: {e.strerror}") from None
    found: list[str] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        # PostSRSd: strtok(line, "\r\n") -- leading CRs skipped, cut at the next CR.
        secret = line.lstrip(b"\r").split(b"\r", 1)[0]
        if not secret:
            continue
        if b"\0" in secret:
            raise SrsSecretError(f"SRS secret file {path}: line {number} contains a NUL byte")
        if len(line) > _LINE_MAX:
            raise SrsSecretError(
                f"SRS secret file {path}: line {number} is longer than {_LINE_MAX} bytes")
        found.append(_decode(secret))
    if not found:
        raise SrsSecretError(f"SRS secret file {path} is empty (no secret in it)")
    return found


def generate_secret_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (mode 600) holding a new random secret, like ``openssl rand -hex 32``.

    Refuses to overwrite: replacing the secret would invalidate every
    address in flight.  To rotate, put a new line *first* and keep the old.
    """
    path = Path(path)
    try:
        create_private_file(path, (_secrets.token_hex(32) + "\n").encode("ascii"))
    except FileExistsError:
        raise SrsSecretError(f"SRS secret file {path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise SrsSecretError(f"SRS secret file {path} cannot be created: {e.strerror}") from None


def rewriter_from_settings(settings: SrsSettings) -> SrsRewriter | None:
    """The configured rewriter, or None when ``[srs] domain`` is unset (SRS off).

    Reads and checks the secret file, so a missing, empty or loose one stops
    the program at start-up rather than at the first message.
    """
    if not settings.domain:
        return None
    return SrsRewriter(settings.domain, load_secrets(settings.secret_file),
                       separator=settings.separator, hash_length=settings.hash_length,
                       hash_min=settings.hash_min, max_age_days=settings.max_age_days,
                       exclude_domains=settings.exclude_domains)
