"""Inbound verdicts: SPF, DKIM, DMARC and ARC, as one ``Authentication-Results`` header.

Every accepted message is checked once, at DATA; the verdict drives policy
(DMARC ``p=reject``, optionally SPF ``-all``) and is prepended to the message
under our authserv-id, where the ARC sealer later reads ``arc=`` from it.

All DNS goes through ``mailforward.dns`` with the resolver built by
``make_sync_resolver`` -- the one delivery uses -- never the libraries' own
default (the system resolver), and with its one error policy (NXDOMAIN and
NODATA are "not there", everything else ``DnsTemporaryError``):

* pyspf looks names up through its module-global ``spf.DNSLookup``.  We replace
  it once, at import, with a dispatcher reading the resolver from a
  ``ContextVar``; ``check_spf`` sets it for its own call only, so concurrent
  checks with different nameservers in worker threads do not interfere
  (each pool call runs in a copy of the context).  With no resolver set the
  dispatcher answers TempError rather than falling back.
* dkimpy takes a ``dnsfunc``; ours closes over the resolver.  DMARC
  (``auth.dmarc``) takes a TXT lookup the same way.

Work runs in the auth pools (``executors``), never on the loop nor in the
default executor: SPF, DMARC and the DKIM/ARC key lookups in the DNS pool,
the DKIM/ARC arithmetic in the CPU pool.  dkimpy looks keys up in the middle
of verifying, so the key records a message's signatures and seals name are
fetched first, in the DNS pool, with the same parser dkimpy uses, and dkimpy
then verifies in the CPU pool with a ``dnsfunc`` answering from those
answers (a name not fetched, which dkimpy should never ask for, is looked
up there as before).  An ARC chain naming more than ``ARC_KEY_LOOKUPS``
distinct keys is not looked up past that: the further seals fail (RFC 8617
lets a verifier limit the chains it evaluates).  RSA verification is
OpenSSL's (``rsa_openssl``), with dkimpy's results.

dkimpy parses a copy of the message with obsolete-syntax white space before
header colons removed, and hashes the names as written (``headerfields``),
so mail a compliant verifier accepts is never failed because dkimpy's parser
is stricter than RFC 5322.  A message dkimpy still cannot parse is malformed:
its signatures are ``permerror`` and DMARC is decided by SPF alone, so
garbage cannot be used to get around ``p=reject``.

Log lines name the exception type and a signature's position, never
dkimpy's text nor any header value (not even d= or s=): no message content
may reach the logs.

DNS trouble (timeout, SERVFAIL) is a ``temperror`` in the verdict, never an
exception and never a rejection by itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Collection, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import dkim  # type: ignore[import-untyped]
import dns.rdata
import dns.resolver
import spf  # type: ignore[import-untyped]
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.txtbase import TXTBase

from ..addresses import normalize_domain
from ..dns import (
    CacheOnlyResolver,
    DnsTemporaryError,
    make_sync_resolver,
    resolve_sync,
    txt_records_sync,
)
from ..errors import AddressError
from ..headerfields import dkimpy_parse, dkimpy_view, field_name, header_block, split_header
from . import rsa_openssl
from .dmarc import (
    Authenticated,
    aligned,
    discover_policy,
    dmarc_result,
    from_domain_of,
    org_domain,
)
from .executors import ON_LOOP_LIMIT, run_cpu, run_dns

__all__ = [
    "MAX_DKIM_SIGNATURES",
    "SPF_TIME_LIMIT",
    "AuthVerdict",
    "DkimVerdict",
    "SpfVerdict",
    "Verifier",
    "aligned",
    "authserv_id_of",
    "check_spf",
    "from_domain_of",
    "org_domain",
    "strip_forged_results",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

SPF_TIME_LIMIT = 20.0
"""Wall-clock bound on one SPF evaluation, all lookups together (RFC 7208 4.6.4)."""

MAX_DKIM_SIGNATURES = 10
"""Signatures verified per message; more only cost DNS lookups an attacker chooses."""

ARC_KEY_LOOKUPS = 20
"""Distinct ARC key records looked up per message (ten hops with keys of their own)."""

TSPECIALS = frozenset('()<>@,;:\\"/[]?=')

ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")


@dataclass(frozen=True)
class DkimVerdict:
    result: str  # pass | fail | neutral | temperror | permerror
    domain: str  # header.d
    selector: str  # header.s


@dataclass(frozen=True)
class SpfVerdict:
    result: str  # pass fail softfail neutral none temperror permerror
    explanation: str  # pyspf's reason text
    identity: str  # "mailfrom" or "helo"
    domain: str


@dataclass(frozen=True)
class AuthVerdict:
    spf: SpfVerdict
    dkim: tuple[DkimVerdict, ...]
    dmarc: str  # pass | fail | none | temperror | permerror
    dmarc_policy: str  # reject | quarantine | none | "" (no record, or no verdict)
    from_domain: str
    arc: str  # none | pass | fail
    header: bytes  # the Authentication-Results field, folded, CRLF-terminated

    @property
    def dmarc_rejects(self) -> bool:
        """The From domain asks receivers to refuse mail failing DMARC."""
        return self.dmarc == "fail" and self.dmarc_policy == "reject"

    @property
    def spf_fails(self) -> bool:
        """SPF says the client is not authorised (``-all``), not merely discouraged."""
        return self.spf.result == "fail"


class _NoKey(Exception):
    """The key record a signature names does not exist: permerror (RFC 6376 6.1.2)."""


# --- SPF -------------------------------------------------------------------

_spf_resolver: ContextVar[dns.resolver.Resolver | None] = ContextVar("spf_resolver",
                                                                    default=None)

PyspfAnswer = list[tuple[tuple[str, str], object]]


def _pyspf_lookup(name: str, qtype: str, strict: object = True,
                  timeout: float = 20.0) -> PyspfAnswer:
    """pyspf's ``DNSLookup`` contract, answered by the resolver of the current context.

    Same output as pyspf's own ``DNSLookup_dnspython``; NXDOMAIN and NODATA are
    an empty answer, everything else that goes wrong is ``spf.TempError``.
    """
    resolver = _spf_resolver.get()
    if resolver is None:
        raise spf.TempError("DNS: no resolver configured for this SPF check")
    try:
        answer = resolve_sync(resolver, name, qtype, lifetime=min(timeout, resolver.lifetime))
    except DnsTemporaryError as e:
        raise spf.TempError(f"DNS {e}") from None
    return [((name, qtype), _pyspf_data(rdata)) for rdata in answer.records]


def _pyspf_data(rdata: dns.rdata.Rdata) -> object:
    """One record's data in the shape pyspf works with, per type."""
    if isinstance(rdata, (A, AAAA)):
        return rdata.address
    if isinstance(rdata, MX):
        return (rdata.preference, rdata.exchange)
    if isinstance(rdata, PTR):
        return rdata.target.to_text(True)
    if isinstance(rdata, TXTBase):  # TXT and SPF
        return rdata.strings
    return rdata.to_text()


spf.DNSLookup = _pyspf_lookup
rsa_openssl.install()  # dkimpy's RSA verification on OpenSSL (done at its import; explicit here)


def check_spf(ip: str, mail_from: str, helo: str, nameservers: Sequence[str],
              timeout: float) -> SpfVerdict:
    """SPF for the client (RFC 7208): MAIL FROM, or postmaster@HELO for a null sender.

    Synchronous: the CLI's ``check`` calls it directly, the Verifier in a thread.
    """
    return _check_spf(make_sync_resolver(nameservers, timeout), ip, mail_from, helo)


def _check_spf(resolver: dns.resolver.Resolver, ip: str, mail_from: str,
               helo: str) -> SpfVerdict:
    mail_from = "" if mail_from == "<>" else mail_from
    identity, domain = ("mailfrom", mail_from.rpartition("@")[2]) if mail_from else ("helo", helo)
    if not _is_hostname(domain):  # RFC 7208 4.3: malformed or single-label domain
        return SpfVerdict("none", "no domain to check", identity, domain.lower())
    token = _spf_resolver.set(resolver)
    try:
        query = spf.query(i=ip, s=mail_from, h=helo, timeout=resolver.lifetime,
                          querytime=SPF_TIME_LIMIT)
        result, _, explanation = query.check()
    except Exception as e:  # pyspf raises on some inputs it cannot parse (bad IP, ...)
        log.warning("SPF check failed (%s)", type(e).__name__)
        result, explanation = "permerror", f"SPF check failed: {e}"
    finally:
        _spf_resolver.reset(token)
    return SpfVerdict(str(result), str(explanation), identity, domain.lower())


def _is_hostname(domain: str) -> bool:
    try:
        return "." in normalize_domain(domain)
    except AddressError:
        return False


# --- DKIM and ARC ----------------------------------------------------------

def _key_lookup(resolver: dns.resolver.Resolver) -> Callable[..., bytes]:
    """A dkimpy ``dnsfunc``: the key record, or an exception saying why not.

    dkimpy turns a missing key into a plain verification failure and swallows
    its own timeouts; raising instead (``_NoKey``, ``DnsTemporaryError``) lets
    us report permerror ("no key", RFC 6376 6.1.2) and temperror.
    """
    def lookup(name: bytes, timeout: float = 5) -> bytes:
        try:
            text = name.decode("ascii").rstrip(".")
        except UnicodeDecodeError:
            raise _NoKey("key name is not ASCII") from None
        records = txt_records_sync(resolver, text)
        if not records:
            raise _NoKey("no key record")
        return records[0]
    return lookup


def _arc_key_lookup(keys: Callable[..., bytes]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` for ARC over ``keys`` (a DKIM one): any missing key makes the chain fail.

    ARC has no temperror (RFC 8617 4.4): a seal we could not check is not valid.
    """
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            return keys(name)
        except (_NoKey, DnsTemporaryError):
            return None
    return lookup


KeyAnswers = dict[bytes, bytes | Exception]
"""Key record (or the exception its lookup raised) by the name dkimpy asks for."""


class _Prefetched:
    """A dkimpy ``dnsfunc`` answering from lookups made beforehand in the DNS pool.

    A stored exception is raised again, so dkimpy's caller sees what a direct
    lookup would have raised; a name not fetched goes to ``missing``.
    """

    def __init__(self, answers: KeyAnswers, missing: Callable[..., bytes]) -> None:
        self.answers = answers
        self.missing = missing

    def __call__(self, name: bytes, timeout: float = 5) -> bytes:
        try:
            answer = self.answers[name]
        except KeyError:
            return self.missing(name, timeout)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _header_fields(message: bytes) -> list[list[bytes]]:
    """dkimpy's (name, value) list for the header section only (never the body)."""
    headers: list[list[bytes]] = dkim.rfc822_parse(dkimpy_view(header_block(message) + b"\n"))[0]
    return headers


def _key_name(value: bytes, dkim_signature: bool = False) -> bytes | None:
    """The key record dkimpy looks up for a signature or seal: ``s._domainkey.d.``.

    None when dkimpy fails it before looking anything up (for a
    DKIM-Signature, the same field checks ``DKIM.verify`` makes first).
    """
    try:
        tags = dkim.util.parse_tag_value(value)
        if dkim_signature:
            dkim.validate_signature_fields(tags)
    except Exception:  # dkimpy fails this signature before any lookup
        return None
    if b"s" not in tags or b"d" not in tags:
        return None
    name: bytes = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
    return name


def _dkim_key_names(message: bytes) -> list[bytes]:
    """The key records of the signatures ``_verify_dkim`` will check, each once."""
    try:
        fields = _header_fields(message)
    except Exception:  # unparseable: every signature is permerror, nothing to look up
        return []
    values = [value for name, value in fields if name.lower() == b"dkim-signature"]
    names = (_key_name(value, dkim_signature=True) for value in values[:MAX_DKIM_SIGNATURES])
    return list(dict.fromkeys(name for name in names if name is not None))


def _arc_key_names(message: bytes) -> list[bytes]:
    """The key records of the ARC seals and message signatures, each once (at most ARC_KEY_LOOKUPS).

    Read as ``ARC.verify`` reads them: relaxed-canonicalized ARC fields.
    """
    try:
        _, arc_fields = dkim.ARC(dkimpy_view(header_block(message) + b"\n")).sorted_arc_headers()
    except Exception:  # dkimpy fails such a chain itself
        return []
    names = (_key_name(value) for _, (name, value) in arc_fields
             if name.lower() in (b"arc-seal", b"arc-message-signature"))
    unique = list(dict.fromkeys(name for name in names if name is not None))
    if len(unique) > ARC_KEY_LOOKUPS:
        log.info("ARC: chain names %d keys; looking up the first %d", len(unique),
                 ARC_KEY_LOOKUPS)
    return unique[:ARC_KEY_LOOKUPS]


def _fetch_keys(resolver: dns.resolver.Resolver,
                names_of: Callable[[bytes], list[bytes]], message: bytes) -> KeyAnswers:
    """Look up every key record ``names_of(message)`` names (in the DNS pool)."""
    lookup = _key_lookup(resolver)
    answers: KeyAnswers = {}
    for name in names_of(message):
        try:
            answers[name] = lookup(name)
        except Exception as e:  # _NoKey, DnsTemporaryError: raised again where dkimpy asks
            answers[name] = e
    return answers


def _verify_dkim(resolver: dns.resolver.Resolver, message: bytes,
                 answers: KeyAnswers | None = None) -> tuple[DkimVerdict, ...]:
    """One verdict per DKIM-Signature, topmost first (up to MAX_DKIM_SIGNATURES).

    Key records come from ``answers`` when given (fetched in the DNS pool),
    else are looked up here.
    """
    if not _has_field(message, DKIM_FIELDS):
        return ()  # nothing to verify: dkimpy need not parse the whole message
    try:
        signed = dkimpy_parse(message, dkim.DKIM)
    except Exception as e:  # dkimpy's parser raises more than DKIMException on garbage
        log.info("DKIM: message not parseable (%s); its signatures are permerror",
                 type(e).__name__)
        return _unverifiable(message)
    headers = [value for name, value in signed.headers if name.lower() == b"dkim-signature"]
    lookup = _key_lookup(resolver)
    if answers is not None:
        lookup = _Prefetched(answers, lookup)
    return tuple(_verify_signature(signed, index, value, lookup)
                 for index, value in enumerate(headers[:MAX_DKIM_SIGNATURES]))


def _unverifiable(message: bytes) -> tuple[DkimVerdict, ...]:
    """permerror for each DKIM-Signature of a message dkimpy cannot read at all."""
    values = [field.partition(b":")[2] for field in split_header(message)[0]
              if field_name(field) == b"dkim-signature"]
    return tuple(DkimVerdict("permerror", *_signature_ids(value))
                 for value in values[:MAX_DKIM_SIGNATURES])


def _verify_signature(signed: dkim.DKIM, index: int, value: bytes,
                      lookup: Callable[..., bytes]) -> DkimVerdict:
    """Logs name the signature by position: its d= and s= are header text too."""
    try:
        result = "pass" if signed.verify(idx=index, dnsfunc=lookup) else "fail"
    except DnsTemporaryError as e:
        log.info("DKIM signature %d: temperror (%s)", index + 1, e.reason)
        result = "temperror"
    except _NoKey:
        log.info("DKIM signature %d: permerror (no key)", index + 1)
        result = "permerror"
    except dkim.ValidationError as e:  # body hash mismatch and the like
        log.info("DKIM signature %d: fail (%s)", index + 1, type(e).__name__)
        result = "fail"
    except Exception as e:  # malformed signature or key; dkimpy has no narrower contract
        log.info("DKIM signature %d: permerror (%s)", index + 1, type(e).__name__)
        result = "permerror"
    return DkimVerdict(result, *_signature_ids(value))


def _signature_ids(value: bytes) -> tuple[str, str]:
    """d= and s= of a DKIM-Signature, "" when absent or unparseable; white space removed."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:  # InvalidTagValueList, bad bytes: the verdict will say permerror
        return "", ""
    domain = b"".join(tags.get(b"d", b"").split()).decode("ascii", "replace").lower()
    return domain, b"".join(tags.get(b"s", b"").split()).decode("ascii", "replace")


def _not_fetched(name: bytes, timeout: float = 5) -> bytes:
    raise _NoKey("over ARC_KEY_LOOKUPS")


def _verify_arc(resolver: dns.resolver.Resolver, message: bytes,
                answers: KeyAnswers | None = None) -> str:
    """The incoming chain's state for our ``arc=`` result: none, pass or fail.

    Key records come from ``answers`` when given (a key not among them is
    missing, so its seal fails), else are looked up here.
    """
    if not _has_arc_set(message):
        return "none"  # no chain to verify: dkimpy need not parse the whole message
    keys = _key_lookup(resolver) if answers is None else _Prefetched(answers, _not_fetched)
    try:
        state, _, _ = dkim.arc_verify(dkimpy_view(message), dnsfunc=_arc_key_lookup(keys))
    except Exception as e:  # dkimpy catches only its own exceptions
        log.info("ARC: verification failed (%s)", type(e).__name__)
        return "fail" if _has_arc_set(message) else "none"
    if state in (dkim.CV_Pass, dkim.CV_None):
        return str(state.decode("ascii"))
    log.info("ARC: incoming chain fails")
    return "fail"  # includes None: a seal already reported cv=fail


def _has_arc_set(message: bytes) -> bool:
    return _has_field(message, ARC_FIELDS)


DKIM_FIELDS = frozenset({b"dkim-signature"})


def _has_field(message: bytes, names: Collection[bytes]) -> bool:
    """Does the header section hold a field named one of ``names`` (lower case)?"""
    return any(field_name(field) in names for field in split_header(message)[0])


ARC_FIELDS_SET = frozenset(ARC_FIELDS)


async def _nothing(value: T) -> T:
    """An awaitable for a check with nothing to check (no thread hand-off)."""
    return value


# --- DMARC -----------------------------------------------------------------

def _check_spf_and_dmarc(resolver: dns.resolver.Resolver, message: bytes, ip: str,
                         mail_from: str, helo: str) -> tuple[SpfVerdict, tuple[str, str, str]]:
    """SPF, then DMARC decided by it alone (a message without DKIM signatures)."""
    spf_verdict = _check_spf(resolver, ip, mail_from, helo)
    return spf_verdict, _check_dmarc(resolver, message, spf_verdict, ())


def _check_dmarc(resolver: dns.resolver.Resolver, message: bytes, spf_verdict: SpfVerdict,
                 dkim_verdicts: Sequence[DkimVerdict]) -> tuple[str, str, str]:
    """(result, policy, from domain), the policy as ``auth.dmarc`` discovers it."""
    from_domain, problem = from_domain_of(message)
    if problem:
        return problem, "", from_domain
    try:
        policy = discover_policy(lambda name: txt_records_sync(resolver, name), from_domain)
    except DnsTemporaryError as e:
        log.info("DMARC: %s", e.reason)
        return "temperror", "", from_domain
    if policy is None:
        return "none", "", from_domain
    result = dmarc_result(policy, from_domain,
                          Authenticated(spf_verdict.result, spf_verdict.domain),
                          [Authenticated(v.result, v.domain) for v in dkim_verdicts])
    return result, policy.policy, from_domain


# --- The header ------------------------------------------------------------

def _pvalue(text: str) -> str:
    """An RFC 8601 pvalue: a token or addr-spec as is, anything else quoted.

    Non-ASCII cannot appear in the header we write; it becomes "?" inside quotes.
    """
    if text and text.isascii():
        if _is_token(text) or re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+",
                                           text):
            return text
    escaped = re.sub(r'(["\\])', r"\\\1", text.encode("ascii", "replace").decode("ascii"))
    return f'"{escaped}"'


def _is_token(text: str) -> bool:
    return all(32 < ord(c) < 127 and c not in TSPECIALS for c in text)


def _header(authserv_id: str, mail_from: str, spf_verdict: SpfVerdict,
            dkim_verdicts: Sequence[DkimVerdict], dmarc: str, policy: str, from_domain: str,
            arc: str) -> bytes:
    """The Authentication-Results field: one method per folded line (RFC 8601 2.2)."""
    if spf_verdict.identity == "mailfrom":
        spf_text = f"spf={spf_verdict.result} smtp.mailfrom={_pvalue(mail_from)}"
    else:
        spf_text = f"spf={spf_verdict.result} smtp.helo={_pvalue(spf_verdict.domain)}"
    dkim_texts = [f"dkim={v.result} header.d={_pvalue(v.domain)} header.s={_pvalue(v.selector)}"
                  for v in dkim_verdicts] or ["dkim=none"]
    dmarc_text = f"dmarc={dmarc}" + (f" (p={policy})" if policy else "")
    if from_domain:
        dmarc_text += f" header.from={_pvalue(from_domain)}"
    results = [_pvalue(authserv_id), spf_text, *dkim_texts, dmarc_text, f"arc={arc}"]
    return ("Authentication-Results: " + ";\r\n\t".join(results) + "\r\n").encode("ascii")


# --- Forged results ---------------------------------------------------------

def authserv_id_of(value: bytes) -> str | None:
    """The authserv-id opening an Authentication-Results value (RFC 8601 2.2), or None.

    Skips leading CFWS (nested comments included); the id is a token or a
    quoted-string (unquoted here).
    """
    text = value.decode("latin-1")
    position = _skip_cfws(text, 0)
    if position is None or position >= len(text):
        return None
    if text[position] == '"':
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text[position:], re.DOTALL)
        return re.sub(r"\\(.)", r"\1", match.group(1)) if match else None
    match = re.match(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+', text[position:])
    return match.group(0) if match else None


def _skip_cfws(text: str, position: int) -> int | None:
    """Index after folding white space and comments; None for an unclosed comment."""
    depth = 0
    while position < len(text):
        char = text[position]
        if depth and char == "\\":
            position += 1
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and char not in " \t\r\n":
            return position
        position += 1
    return None if depth else position


def strip_forged_results(message: bytes, authserv_id: str) -> bytes:
    """The message without Authentication-Results fields claiming our authserv-id.

    Only we may speak for our id: anything arriving with it was forged, and
    downstream (the ARC sealer, the recipient's filters) would trust it.
    The id is compared as a domain name would be: case-insensitively, with
    or without a trailing dot, quoted or not.  Only the header section is
    touched; everything else stays byte for byte.
    """
    fields, rest = split_header(message)
    ours = _comparable_id(authserv_id)
    kept = [field for field in fields if not _claims(field, ours)]
    return b"".join(kept) + rest


def _comparable_id(authserv_id: str) -> str:
    return authserv_id.strip().rstrip(".").lower()


def _claims(field: bytes, authserv_id: str) -> bool:
    if field_name(field) != b"authentication-results":
        return False
    claimed = authserv_id_of(field.partition(b":")[2])
    return claimed is not None and _comparable_id(claimed) == authserv_id


# --- Everything together ---------------------------------------------------

class Verifier:
    """Computes an AuthVerdict per message with one resolver, shared across threads."""

    def __init__(self, authserv_id: str, nameservers: Sequence[str], timeout: float) -> None:
        self.authserv_id = authserv_id
        self.resolver = make_sync_resolver(nameservers, timeout)
        # Made once (a resolver takes ~9 us to build): _lookups uses it only on the
        # loop, and synchronously, so no two checks ever share it at the same time.
        self.cached = CacheOnlyResolver(self.resolver)

    async def verify(self, message: bytes, client_ip: str, helo: str,
                     mail_from: str) -> AuthVerdict:
        """SPF, DKIM and ARC side by side, then DMARC.

        Whether there are signatures or seals at all is seen here, on the loop
        (a scan of the field names): most mail has no ARC set and much has no
        DKIM signature.  Without signatures, DMARC needs only SPF: both run
        as one piece of work.  Lookups are tried from the cache first, on the
        loop (:meth:`_lookups`); DKIM and ARC arithmetic is done on the loop
        for small messages (:meth:`_arithmetic`).
        """
        names = {field_name(f) for f in split_header(message)[0]}
        signed, sealed = not DKIM_FIELDS.isdisjoint(names), not ARC_FIELDS_SET.isdisjoint(names)
        if not signed and not sealed:
            spf_verdict, (dmarc, policy, from_domain) = await self._lookups(
                _check_spf_and_dmarc, message, client_ip, mail_from, helo)
            return self._verdict(mail_from, spf_verdict, (), dmarc, policy, from_domain, "none")
        spf_verdict, dkim_verdicts, arc = await asyncio.gather(
            self._lookups(_check_spf, client_ip, mail_from, helo),
            self._dkim(message) if signed else _nothing(()),
            self._arc(message) if sealed else _nothing("none"))
        dmarc, policy, from_domain = await self._lookups(
            _check_dmarc, message, spf_verdict, dkim_verdicts)
        return self._verdict(mail_from, spf_verdict, dkim_verdicts, dmarc, policy, from_domain,
                             arc)

    async def _lookups(self, work: Callable[Concatenate[dns.resolver.Resolver, P], T],
                       *args: P.args, **kwargs: P.kwargs) -> T:
        """``work(resolver, ...)`` on the loop if the cache answers every lookup it makes,
        else again in the DNS pool with the real resolver.

        The libraries' Python work in a pool thread holds the GIL the loop
        needs; answered from the cache it is short, and done here it contends
        with nothing.  A check that needed a name not cached is run again from
        the start (it is a pure function of the answers), so its verdict is
        the one the pool alone would give.
        """
        self.cached.misses = 0
        result = work(self.cached, *args, **kwargs)
        if not self.cached.misses:
            return result
        return await run_dns(work, self.resolver, *args, **kwargs)

    async def _arithmetic(self, message: bytes, work: Callable[P, T],
                          *args: P.args, **kwargs: P.kwargs) -> T:
        """DKIM/ARC verification: on the loop for a small ``message``, else in the CPU pool
        (canonicalizing a big one would stall the loop)."""
        if len(message) <= ON_LOOP_LIMIT:
            return work(*args, **kwargs)
        return await run_cpu(work, *args, **kwargs)

    def _verdict(self, mail_from: str, spf_verdict: SpfVerdict,
                 dkim_verdicts: tuple[DkimVerdict, ...], dmarc: str, policy: str,
                 from_domain: str, arc: str) -> AuthVerdict:
        header = _header(self.authserv_id, mail_from, spf_verdict, dkim_verdicts, dmarc,
                         policy, from_domain, arc)
        return AuthVerdict(spf_verdict, dkim_verdicts, dmarc, policy, from_domain, arc, header)

    async def _dkim(self, message: bytes) -> tuple[DkimVerdict, ...]:
        """Key records looked up first, then the signatures checked against those answers."""
        answers = await self._lookups(_fetch_keys, _dkim_key_names, message)
        return await self._arithmetic(message, _verify_dkim, self.resolver, message, answers)

    async def _arc(self, message: bytes) -> str:
        answers = await self._lookups(_fetch_keys, _arc_key_names, message)
        return await self._arithmetic(message, _verify_arc, self.resolver, message, answers)
