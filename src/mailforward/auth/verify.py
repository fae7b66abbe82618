"""Inbound verdicts: SPF, DKIM, DMARC and ARC, as one ``Authentication-Results`` header.

Every accepted message is checked once, at DATA; the verdict drives policy
(DMARC ``p=reject``, optionally SPF ``-all``) and is prepended to the message
under our authserv-id, where the ARC sealer later reads ``arc=`` from it.

All DNS goes through the resolver built by ``make_sync_resolver`` -- the one
delivery uses -- never the libraries' own default (the system resolver):

* pyspf looks names up through its module-global ``spf.DNSLookup``.  We replace
  it once, at import, with a dispatcher reading the resolver from a
  ``ContextVar``; ``check_spf`` sets it for its own call only, so concurrent
  checks with different nameservers in worker threads do not interfere
  (``asyncio.to_thread`` runs each call in a copy of the context).  With no
  resolver set the dispatcher answers TempError rather than falling back.
* dkimpy and our DMARC lookup take a ``dnsfunc``; ours closes over the resolver.

Log lines name the exception type, never dkimpy's text: it can quote header
lines, and no message content may reach the logs.

DNS trouble (timeout, SERVFAIL) is a ``temperror`` in the verdict, never an
exception and never a rejection by itself.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import importlib.resources
import logging
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import dkim  # type: ignore[import-untyped]
import dns.exception
import dns.name
import dns.resolver
import spf  # type: ignore[import-untyped]
from publicsuffix2 import PublicSuffixList  # type: ignore[import-untyped]

from ..addresses import normalize_domain
from ..delivery.routing import make_sync_resolver
from ..errors import AddressError

log = logging.getLogger(__name__)

SPF_TIME_LIMIT = 20.0
"""Wall-clock bound on one SPF evaluation, all lookups together (RFC 7208 4.6.4)."""

MAX_DKIM_SIGNATURES = 10
"""Signatures verified per message; more only cost DNS lookups an attacker chooses."""

DMARC_POLICIES = ("none", "quarantine", "reject")

TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


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


class LookupFailed(Exception):
    """A DNS lookup gave no usable answer; ``result`` is the verdict that implies."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result


# --- DNS -------------------------------------------------------------------

def _resolve(resolver: dns.resolver.Resolver, name: str, qtype: str,
             lifetime: float | None = None) -> dns.resolver.Answer | None:
    """An answer, or None when the name or type does not exist (NXDOMAIN, NODATA).

    Raises LookupFailed("temperror") for timeouts, SERVFAIL and other trouble,
    so that no caller mistakes "could not ask" for "not there".
    """
    try:
        return resolver.resolve(dns.name.from_text(name), qtype, search=False,
                                lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout as e:
        raise LookupFailed("temperror", f"DNS timeout for {name}/{qtype}: {e}") from None
    except dns.exception.DNSException as e:
        raise LookupFailed("temperror", f"DNS error for {name}/{qtype}: {e}") from None


def _txt_records(resolver: dns.resolver.Resolver, name: str) -> list[bytes]:
    """Each TXT record at ``name``, its strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    answer = _resolve(resolver, name, "TXT")
    if answer is None:
        return []
    return [b"".join(rdata.strings) for rdata in answer]


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
        answer = _resolve(resolver, name, qtype, lifetime=min(timeout, resolver.lifetime))
    except LookupFailed as e:
        raise spf.TempError(f"DNS {e}") from None
    return [((name, qtype), _pyspf_data(qtype, rdata)) for rdata in answer or ()]


def _pyspf_data(qtype: str, rdata: object) -> object:
    """One record's data in the shape pyspf works with, per type."""
    if qtype in ("A", "AAAA"):
        return getattr(rdata, "address")
    if qtype == "MX":
        return (getattr(rdata, "preference"), getattr(rdata, "exchange"))
    if qtype == "PTR":
        return getattr(rdata, "target").to_text(True)
    return getattr(rdata, "strings")  # TXT, SPF


spf.DNSLookup = _pyspf_lookup


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
        log.warning("SPF check of %s from %s failed: %r", domain, ip, e)
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
    """A dkimpy ``dnsfunc``: the key record, or LookupFailed saying why not.

    dkimpy turns a missing key into a plain verification failure and swallows
    its own timeouts; raising instead lets us report permerror ("no key",
    RFC 6376 6.1.2) and temperror.
    """
    def lookup(name: bytes, timeout: float = 5) -> bytes:
        try:
            text = name.decode("ascii").rstrip(".")
        except UnicodeDecodeError:
            raise LookupFailed("permerror", "key name is not ASCII") from None
        records = _txt_records(resolver, text)
        if not records:
            raise LookupFailed("permerror", f"no key for signature at {text}")
        return records[0]
    return lookup


def _arc_key_lookup(resolver: dns.resolver.Resolver) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` for ARC: any missing key makes the chain fail.

    ARC has no temperror (RFC 8617 4.4): a seal we could not check is not valid.
    """
    keys = _key_lookup(resolver)

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            return keys(name)
        except LookupFailed:
            return None
    return lookup


def _verify_dkim(resolver: dns.resolver.Resolver, message: bytes) -> tuple[DkimVerdict, ...]:
    """One verdict per DKIM-Signature, topmost first (up to MAX_DKIM_SIGNATURES)."""
    try:
        signed = dkim.DKIM(message)
    except Exception as e:  # dkimpy's parser raises more than DKIMException on garbage
        log.info("DKIM: message not parseable (%s)", type(e).__name__)
        return ()
    headers = [value for name, value in signed.headers if name.lower() == b"dkim-signature"]
    lookup = _key_lookup(resolver)
    return tuple(_verify_signature(signed, index, value, lookup)
                 for index, value in enumerate(headers[:MAX_DKIM_SIGNATURES]))


def _verify_signature(signed: dkim.DKIM, index: int, value: bytes,
                      lookup: Callable[..., bytes]) -> DkimVerdict:
    domain, selector = _signature_ids(value)
    try:
        result = "pass" if signed.verify(idx=index, dnsfunc=lookup) else "fail"
    except LookupFailed as e:
        log.info("DKIM d=%s s=%s: %s", domain, selector, e)
        result = e.result
    except dkim.ValidationError as e:  # body hash mismatch and the like
        log.info("DKIM d=%s s=%s: fail (%s)", domain, selector, type(e).__name__)
        result = "fail"
    except Exception as e:  # malformed signature or key; dkimpy has no narrower contract
        log.info("DKIM d=%s s=%s: permerror (%s)", domain, selector, type(e).__name__)
        result = "permerror"
    return DkimVerdict(result, domain, selector)


def _signature_ids(value: bytes) -> tuple[str, str]:
    """d= and s= of a DKIM-Signature, "" when absent or unparseable."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:  # InvalidTagValueList, bad bytes: the verdict will say permerror
        return "", ""
    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    return domain, tags.get(b"s", b"").decode("ascii", "replace")


def _verify_arc(resolver: dns.resolver.Resolver, message: bytes) -> str:
    """The incoming chain's state for our ``arc=`` result: none, pass or fail."""
    try:
        state, _, _ = dkim.arc_verify(message, dnsfunc=_arc_key_lookup(resolver))
    except Exception as e:  # dkimpy catches only its own exceptions
        log.info("ARC: verification failed (%s)", type(e).__name__)
        return "fail"
    if state in (dkim.CV_Pass, dkim.CV_None):
        return str(state.decode("ascii"))
    log.info("ARC: incoming chain fails")
    return "fail"  # includes None: a seal already reported cv=fail


# --- DMARC -----------------------------------------------------------------

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


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): one label below the public suffix.

    Unlisted TLDs (``.test``) follow the list's implicit ``*`` rule.
    """
    domain = domain.lower().rstrip(".")
    labels = domain.split(".")
    suffix = _suffix_list().get_tld(domain, strict=True) or labels[-1]
    size = suffix.count(".") + 2
    return ".".join(labels[-size:]) if len(labels) >= size else domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): same domain when strict, same org when relaxed."""
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return org_domain(identifier) == org_domain(from_domain)


@dataclass(frozen=True)
class DmarcRecord:
    policy: str  # effective for the From domain: p=, or sp= when found at the org domain
    adkim: str
    aspf: str


def parse_dmarc(text: bytes) -> dict[str, str] | None:
    """The tags of a DMARC record, or None when it is not one (must start v=DMARC1)."""
    try:
        fields = text.decode("ascii").split(";")
    except UnicodeDecodeError:
        return None
    tags = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    if fields[0].replace(" ", "") != "v=DMARC1":
        return None
    return tags


def _dmarc_record(resolver: dns.resolver.Resolver, from_domain: str) -> DmarcRecord | None:
    """Policy discovery (RFC 7489 6.6.3): the From domain's record, else its org domain's."""
    tags = _dmarc_tags(resolver, from_domain)
    subdomain = False
    if tags is None and org_domain(from_domain) != from_domain:
        tags, subdomain = _dmarc_tags(resolver, org_domain(from_domain)), True
    if tags is None:
        return None
    policy = tags.get("p", "").lower()
    policy = policy if policy in DMARC_POLICIES else "none"  # invalid p=: monitor only
    if subdomain and tags.get("sp", "").lower() in DMARC_POLICIES:
        policy = tags["sp"].lower()
    return DmarcRecord(policy, tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower())


def _dmarc_tags(resolver: dns.resolver.Resolver, domain: str) -> dict[str, str] | None:
    """The one DMARC record at _dmarc.domain; several count as none (RFC 7489 6.6.3)."""
    records = [tags for text in _txt_records(resolver, f"_dmarc.{domain}")
               if (tags := parse_dmarc(text)) is not None]
    return records[0] if len(records) == 1 else None


def from_domain_of(message: bytes) -> tuple[str, str]:
    """(domain, problem) of the RFC 5322 From: "" and "none" when there is no From,
    "" and "permerror" when it is repeated, unparseable, or names several domains
    (RFC 7489 6.6.1), the lower-cased domain and "" otherwise.
    """
    values = _header_values(message, b"from")
    if not values:
        return "", "none"
    addresses = email.utils.getaddresses(values) if len(values) == 1 else []
    if not addresses or not all("@" in address for _, address in addresses):
        return "", "permerror"
    try:
        domains = {normalize_domain(address.rpartition("@")[2]) for _, address in addresses}
    except AddressError:
        return "", "permerror"
    return (domains.pop(), "") if len(domains) == 1 else ("", "permerror")


def _header_values(message: bytes, wanted: bytes) -> list[str]:
    """Unfolded values of every header field named ``wanted`` (lower case)."""
    values = []
    for field in _header_fields(message)[0]:
        name, sep, value = field.partition(b":")
        if sep and name.rstrip(b" \t").lower() == wanted:
            values.append(re.sub(rb"\r?\n", b"", value).decode("utf-8", "replace").strip())
    return values


def _check_dmarc(resolver: dns.resolver.Resolver, message: bytes, spf_verdict: SpfVerdict,
                 dkim_verdicts: Sequence[DkimVerdict]) -> tuple[str, str, str]:
    """(result, policy, from domain): pass when SPF or a DKIM signature passes aligned."""
    from_domain, problem = from_domain_of(message)
    if problem:
        return problem, "", from_domain
    try:
        record = _dmarc_record(resolver, from_domain)
    except LookupFailed as e:
        log.info("DMARC for %s: %s", from_domain, e)
        return "temperror", "", from_domain
    if record is None:
        return "none", "", from_domain
    spf_ok = spf_verdict.result == "pass" and aligned(spf_verdict.domain, from_domain,
                                                       record.aspf)
    dkim_ok = any(v.result == "pass" and aligned(v.domain, from_domain, record.adkim)
                  for v in dkim_verdicts)
    return ("pass" if spf_ok or dkim_ok else "fail"), record.policy, from_domain


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

def _header_fields(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields with their folded lines and line ends, the rest verbatim)."""
    fields: list[bytes] = []
    rest = b""
    lines = re.findall(rb"[^\n]*\n|[^\n]+\Z", message)  # LF ends a line; a lone CR does not
    for number, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            rest = b"".join(lines[number:])
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


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
    Only the header section is touched; everything else stays byte for byte.
    """
    fields, rest = _header_fields(message)
    ours = authserv_id.lower()
    kept = [field for field in fields if not _claims(field, ours)]
    return b"".join(kept) + rest


def _claims(field: bytes, authserv_id: str) -> bool:
    name, sep, value = field.partition(b":")
    if not sep or name.rstrip(b" \t").lower() != b"authentication-results":
        return False
    claimed = authserv_id_of(value)
    return claimed is not None and claimed.lower() == authserv_id


# --- Everything together ---------------------------------------------------

class Verifier:
    """Computes an AuthVerdict per message with one resolver, shared across threads."""

    def __init__(self, authserv_id: str, nameservers: Sequence[str], timeout: float) -> None:
        self.authserv_id = authserv_id
        self.resolver = make_sync_resolver(nameservers, timeout)

    async def verify(self, message: bytes, client_ip: str, helo: str,
                     mail_from: str) -> AuthVerdict:
        """SPF, DKIM and ARC side by side in threads (the libraries block), then DMARC."""
        spf_verdict, dkim_verdicts, arc = await asyncio.gather(
            asyncio.to_thread(_check_spf, self.resolver, client_ip, mail_from, helo),
            asyncio.to_thread(_verify_dkim, self.resolver, message),
            asyncio.to_thread(_verify_arc, self.resolver, message))
        dmarc, policy, from_domain = await asyncio.to_thread(
            _check_dmarc, self.resolver, message, spf_verdict, dkim_verdicts)
        header = _header(self.authserv_id, mail_from, spf_verdict, dkim_verdicts, dmarc,
                         policy, from_domain, arc)
        return AuthVerdict(spf_verdict, dkim_verdicts, dmarc, policy, from_domain, arc, header)
