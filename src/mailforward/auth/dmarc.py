"""DMARC (RFC 7489) in one place: the record, policy discovery, alignment, the verdict.

``mailforward check`` and the inbound verifier used to read records each in
their own way, and disagreed: ``V=DMARC1; p=reject`` passed ``check`` while
the verifier ignored it, so that domain's ``p=reject`` was never enforced.
Both now find records with :func:`dmarc_records` and read them with
:func:`parse_record`, so a record ``check`` calls valid is enforced exactly
as published, and one it calls invalid is the one the verifier ignores.

Record syntax is RFC 7489 6.3's ABNF: tag names and policy values are ABNF
literals, so case-insensitive (``V=DMARC1``, ``p=Reject`` are valid); the
version value is ``%x44.4d.41.52.43.31``, exactly ``DMARC1`` (``v=dmarc1``
is not a DMARC record); ``v`` must be the first tag.

``check`` reports every syntax problem; the verifier, as RFC 7489 6.3 and
6.6.3 ask, ignores a broken tag in favour of its default, and applies no
policy when ``p=`` or ``sp=`` is invalid -- unless ``rua=`` names a report
address, when it acts as if ``p=none`` had been published.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from publicsuffix2 import PublicSuffixList  # type: ignore[import-untyped]

from ..from_field import FromProblem, read_from_field

__all__ = [
    "POLICIES",
    "VERSION",
    "Authenticated",
    "DmarcPolicy",
    "DmarcRecord",
    "TxtLookup",
    "aligned",
    "discover_policy",
    "dmarc_records",
    "dmarc_result",
    "from_domain_of",
    "is_dmarc_record",
    "org_domain",
    "parse_record",
]

POLICIES = ("none", "quarantine", "reject")
ALIGNMENT_MODES = ("r", "s")
VERSION = "DMARC1"
MISSING_VERSION = "the first tag must be v=DMARC1"

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_REPORT_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s,!]+(![0-9]+[kmgtKMGT]?)?")
"""RFC 7489 6.4 ``dmarc-uri``: a URI with an optional ``!size`` suffix."""

TxtLookup = Callable[[str], Sequence[bytes]]
"""The TXT records at a name (strings joined); raises DnsTemporaryError when DNS cannot say."""


# ---------------------------------------------------------------- the record


@dataclass(frozen=True)
class DmarcRecord:
    """A record's tags (names lower-cased, first occurrence wins) and what is wrong with it."""

    tags: tuple[tuple[str, str], ...]
    problem: str  # "" when the record is valid; otherwise the first problem, in words

    def value(self, name: str) -> str | None:
        return next((value for tag, value in self.tags if tag == name), None)

    def requested_policy(self, subdomain: bool) -> str | None:
        """``p=`` (``sp=`` for a subdomain, when given), or RFC 7489 6.6.3's fallback.

        None means no DMARC processing: the policy tags are broken and no
        report address was given.
        """
        policy = (self.value("p") or "").lower()
        sub = self.value("sp")
        if policy not in POLICIES or (sub is not None and sub.lower() not in POLICIES):
            return "none" if self._reports_somewhere() else None
        return sub.lower() if subdomain and sub is not None else policy

    def alignment(self, tag: str) -> str:
        """``adkim``/``aspf``: ``s`` or ``r``; relaxed when absent or invalid."""
        mode = (self.value(tag) or "r").lower()
        return mode if mode in ALIGNMENT_MODES else "r"

    def _reports_somewhere(self) -> bool:
        uris = (self.value("rua") or "").split(",")
        return any(_REPORT_URI.fullmatch(uri.strip()) for uri in uris)


def is_dmarc_record(text: str) -> bool:
    """Whether TXT text is a DMARC record at all: its first tag is ``v=DMARC1``.

    Other TXT records at ``_dmarc.DOMAIN`` are discarded (RFC 7489 6.6.3).
    """
    name, sep, value = text.split(";", 1)[0].partition("=")
    return bool(sep) and name.strip(" \t").lower() == "v" and value.strip(" \t") == VERSION


def parse_record(text: str) -> DmarcRecord:
    """The record's tags and its first problem ("" when there is none)."""
    tags: list[tuple[str, str]] = []
    problems = [] if is_dmarc_record(text) else [MISSING_VERSION]
    for part in (part.strip(" \t") for part in text.split(";")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not sep or not _TAG_NAME.fullmatch(name):
            problems.append(f"'{part}' is not tag=value")
        elif any(tag == name.lower() for tag, _ in tags):
            problems.append(f"the {name.lower()}= tag appears more than once")
        else:
            tags.append((name.lower(), value))
    record = DmarcRecord(tuple(tags), "")
    problems += _value_problems(record)
    return DmarcRecord(record.tags, problems[0] if problems else "")


def _value_problems(record: DmarcRecord) -> list[str]:
    problems = []
    if record.value("p") is None:
        problems.append("the p= tag (none, quarantine or reject) is missing")
    for tag in ("p", "sp"):
        value = record.value(tag)
        if value is not None and value.lower() not in POLICIES:
            problems.append(f"{tag}={value} is not one of none, quarantine, reject")
    for tag in ("adkim", "aspf"):
        value = record.value(tag)
        if value is not None and value.lower() not in ALIGNMENT_MODES:
            problems.append(f"{tag}={value} must be r or s")
    pct = record.value("pct")
    if pct is not None and not (pct.isascii() and pct.isdigit() and int(pct) <= 100):
        problems.append(f"pct={pct} must be a number from 0 to 100")
    return problems


def dmarc_records(texts: Iterable[bytes]) -> list[str]:
    """The DMARC records among the TXT records at ``_dmarc.DOMAIN``, as text."""
    decoded = (text.decode("utf-8", "replace") for text in texts)
    return [text for text in decoded if is_dmarc_record(text)]


# ---------------------------------------------------------------- policy discovery


@dataclass(frozen=True)
class DmarcPolicy:
    """What a From domain asks of receivers; ``domain`` is where the record was found."""

    domain: str
    policy: str  # none | quarantine | reject, for the From domain itself
    adkim: str
    aspf: str


def discover_policy(lookup: TxtLookup, from_domain: str) -> DmarcPolicy | None:
    """RFC 7489 6.6.3: the From domain's record, else its organizational domain's.

    None when DMARC does not apply: no record, several records, or broken
    policy tags without a report address.  DNS trouble propagates from
    ``lookup`` (DnsTemporaryError).
    """
    domain = from_domain.lower().rstrip(".")
    records = dmarc_records(lookup(f"_dmarc.{domain}"))
    subdomain = False
    organizational = org_domain(domain)
    if not records and organizational != domain:
        domain, subdomain = organizational, True
        records = dmarc_records(lookup(f"_dmarc.{domain}"))
    if len(records) != 1:
        return None
    record = parse_record(records[0])
    policy = record.requested_policy(subdomain)
    if policy is None:
        return None
    return DmarcPolicy(domain, policy, record.alignment("adkim"), record.alignment("aspf"))


# ---------------------------------------------------------------- alignment and the verdict


@functools.cache
def _suffix_list() -> PublicSuffixList:
    """The bundled public suffix list: authheaders' copy if present (newer), else
    publicsuffix2's own.  Read from disk only, never fetched.
    """
    try:
        with importlib.resources.as_file(
                importlib.resources.files("authheaders") / "public_suffix_list.txt") as path:
            return PublicSuffixList(str(path))
    except (ModuleNotFoundError, FileNotFoundError):
        return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): one label below the public suffix.

    Unlisted TLDs (``.test``) follow the list's implicit ``*`` rule.
    """
    domain = domain.lower().rstrip(".")
    labels = domain.split(".")
    suffix = _suffix_list().get_tld(domain, strict=True) or labels[-1]
    size = str(suffix).count(".") + 2
    return ".".join(labels[-size:]) if len(labels) >= size else domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): same domain when strict, same org when relaxed."""
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return org_domain(identifier) == org_domain(from_domain)


class Authenticated(NamedTuple):
    """One authentication method's result and the domain it authenticated (SPF or a DKIM d=)."""

    result: str
    domain: str


def dmarc_result(policy: DmarcPolicy, from_domain: str, spf: Authenticated,
                 dkim: Iterable[Authenticated]) -> str:
    """``pass`` when SPF or any DKIM signature passes and aligns with the From domain, else ``fail``."""
    spf_ok = spf.result == "pass" and aligned(spf.domain, from_domain, policy.aspf)
    dkim_ok = any(signature.result == "pass" and aligned(signature.domain, from_domain,
                                                         policy.adkim) for signature in dkim)
    return "pass" if spf_ok or dkim_ok else "fail"


def from_domain_of(message: bytes) -> tuple[str, str]:
    """(domain, problem) of the RFC 5322 From (RFC 7489 6.6.1), read by ``from_field``.

    ``("", "none")`` without a From field; ``("", "permerror")`` when it is
    repeated or not exactly one mailbox; otherwise the normalised domain and
    "".  The same reader decides the From policy, so the domain DMARC judges
    is the domain the policy judged.
    """
    field = read_from_field(message)
    if field.problem is FromProblem.MISSING:
        return "", "none"
    if field.problem is not None:
        return "", "permerror"
    return field.domain, ""
