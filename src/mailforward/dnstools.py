"""``mailforward dns`` and ``mailforward check``: the seed's DNS section and checklist, automated.

The seed lists the records to publish and a "Validation Checklist" as
manual steps, and operators get them wrong.  This module turns both into
code: :func:`records_for` says exactly what to publish (pure functions,
rendered as zone lines or JSON), and :func:`run_dns_checks` proves each
checklist item against live DNS, returning one :class:`CheckResult` per item
with a reason a newcomer can act on.

All DNS goes through ``mailforward.dns`` with ``[delivery] nameservers``
and ``[delivery] dns_timeout``, like delivery itself, so a split-horizon or
test resolver sees the same answers the server does, under the same error
policy.  A DNS failure is a failed item ("DNS lookup failed (temporary):
..."), never a crash.  DMARC records are read by ``auth.dmarc``, the parser
the inbound verifier enforces them with, so the two cannot disagree.

Both commands also warn when forwarded mail would be sent or signed as a
hosted domain (see :func:`shared_identity_warnings`): a warning, not a
failure, because mail flows either way, but it is unsafe.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.name
import dns.reversename
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from .addresses import normalize_domain
from .admin import Admin
from .auth.dkim import DkimKey, load_dkim
from .auth.dmarc import aligned, dmarc_records, parse_record
from .auth.verify import check_spf as evaluate_spf
from .config import ServerSettings, Settings
from .dns import DnsTemporaryError, make_resolver, resolve, txt_records
from .errors import AddressError, ConfigError, MailforwardError
from .tables import open_admin_database, open_table

TTL = 3600
TXT_CHUNK = 255  # RFC 1035: one character-string holds at most 255 octets
NO_PUBLIC_IPS = "set [server] public_ips (this server's public addresses) to check this"
SPF_TOO_MANY_LOOKUPS = "SPF needs more than 10 DNS lookups (RFC 7208 limit)"
DEDICATED_DOMAIN_ITEM = "dedicated forwarding domain"


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class CheckResult:
    """One checklist item: ``item`` is a stable short label, ``reason`` says why in plain words.

    A ``warning`` is an item that passes (``ok``: mail flows, the exit code
    stays 0) but is set up in a way we advise against; it is marked ``!``.
    """

    item: str
    ok: bool
    reason: str
    warning: bool = False

    def line(self) -> str:
        mark = "✗" if not self.ok else "!" if self.warning else "✓"
        return f"{mark} {self.item} — {self.reason}"


def all_ok(results: Sequence[CheckResult]) -> bool:
    """Whether every item passed; warnings pass."""
    return all(r.ok for r in results)


# ---------------------------------------------------------------- records to publish


@dataclass(frozen=True)
class Record:
    """One DNS record to publish; ``purpose`` becomes a zone-file comment."""

    name: str  # absolute, with the trailing dot
    rtype: str
    value: str  # TXT values unquoted, other types in zone-file syntax
    purpose: str
    ttl: int = TTL

    def zone_line(self) -> str:
        return f"{self.name}\t{self.ttl}\tIN\t{self.rtype}\t{self.zone_value()}"

    def zone_value(self) -> str:
        """TXT values split into quoted 255-octet strings, as RFC 1035 needs for DKIM keys."""
        if self.rtype != "TXT":
            return self.value
        chunks = [self.value[i:i + TXT_CHUNK] for i in range(0, len(self.value), TXT_CHUNK)]
        return " ".join(f'"{chunk}"' for chunk in chunks or [""])

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "type": self.rtype, "ttl": self.ttl, "value": self.value,
                "purpose": self.purpose}


@dataclass(frozen=True)
class RecordSet:
    """What ``mailforward dns`` prints: records, plus notes for what cannot be a record."""

    domain: str
    records: tuple[Record, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    def zone_text(self) -> str:
        lines = [f"; DNS records for {self.domain}, forwarded by this mailforward server"]
        lines += [f"; WARNING: {warning}" for warning in self.warnings]
        lines += [f"; NOTE: {note}" for note in self.notes]
        purpose = ""
        for record in self.records:
            if record.purpose != purpose:
                purpose = record.purpose
                lines.append(f"; {purpose}")
            lines.append(record.zone_line())
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, object]:
        return {"domain": self.domain, "records": [r.as_json() for r in self.records],
                "notes": list(self.notes), "warnings": list(self.warnings)}


def absolute(name: str) -> str:
    return name.rstrip(".") + "."


def server_ips(server: ServerSettings) -> tuple[str, ...]:
    """This host's addresses as the world sees them.

    ``[server] public_ips`` when set; otherwise the specific listen
    addresses, minus loopback, wildcard and link-local ones, which say
    nothing about where the Internet reaches us.
    """
    if server.public_ips:
        return tuple(str(ipaddress.ip_address(ip)) for ip in server.public_ips)
    found: list[str] = []
    for host, _ in server.listen_addresses():
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local) and str(ip) not in found:
            found.append(str(ip))
    return tuple(found)


def spf_value(ips: Sequence[str]) -> str:
    """Explicit ip4:/ip6: terms when our addresses are known (no lookups), else the seed's ``mx``."""
    if not ips:
        return "v=spf1 mx -all"
    terms = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips]
    return "v=spf1 " + " ".join(terms) + " -all"


def domain_records(domain: str, hostname: str, ips: Sequence[str]) -> list[Record]:
    """The seed's three required records for a forwarded domain."""
    name = absolute(domain)
    return [
        Record(name, "MX", f"10 {absolute(hostname)}", f"mail for {domain} arrives at this server"),
        Record(name, "TXT", spf_value(ips), f"SPF: this server may send as {domain}"),
        Record(f"_dmarc.{name}", "TXT", "v=DMARC1; p=none",
               "DMARC: p=none as in the seed; tighten to quarantine/reject once reports look clean"),
    ]


def dkim_keys(domain: str, settings: Settings) -> list[DkimKey]:
    """The keys mail from ``domain`` is signed with: its own selectors, plus the forwarding key."""
    config = load_dkim(settings.dkim)
    if config is None:
        return []
    keys = [k for k in config.keys.values() if normalize_domain(k.domain) == domain]
    if config.sign_forwarded_as is not None and config.sign_forwarded_as not in keys:
        keys.append(config.sign_forwarded_as)
    return sorted(keys, key=lambda k: k.name)


def dkim_records(keys: Sequence[DkimKey]) -> list[Record]:
    """One TXT per selector, built from the private key itself, never copied by hand."""
    return [Record(absolute(key.name), "TXT", key.public_record(),
                   f"DKIM selector {key.selector} of {key.domain} (from its private key)")
            for key in keys]


def host_records(hostname: str, ips: Sequence[str]) -> list[Record]:
    purpose = f"this server's own name ({hostname}); also ask your provider for PTR records"
    return [Record(absolute(hostname), "A" if ipaddress.ip_address(ip).version == 4 else "AAAA",
                   ip, purpose) for ip in ips]


def ptr_records(hostname: str, ips: Sequence[str]) -> list[Record]:
    """PTRs live in the provider's reverse zone; printed so the request can be copied."""
    return [Record(dns.reversename.from_address(ip).to_text(), "PTR", absolute(hostname),
                   "reverse DNS: set by whoever owns the IP block (your hosting provider)")
            for ip in ips]


def srs_records(srs_domain: str, hostname: str, ips: Sequence[str]) -> list[Record]:
    """The SRS domain signs every forwarded envelope: it needs SPF, and MX so bounces come back."""
    name = absolute(srs_domain)
    purpose = f"SRS domain {srs_domain}: forwarded mail is sent as it, bounces return to it"
    return [Record(name, "MX", f"10 {absolute(hostname)}", purpose),
            Record(name, "TXT", spf_value(ips), purpose)]


def public_hostname(settings: Settings) -> str:
    """``[server] hostname``, which MX records name: a bare host name (the default is the
    machine's, e.g. ``vm``) cannot be published, so it is refused."""
    hostname = normalize_domain(settings.server.hostname)
    if "." not in hostname:
        raise ConfigError(f"[server] hostname: {hostname!r} is not a fully qualified name; set it "
                          "to the public name your MX records will point to")
    return hostname


def records_for(domain: str, settings: Settings) -> RecordSet:
    """Everything ``domain`` and this server must publish, without asking DNS anything."""
    domain = normalize_domain(domain)
    hostname = public_hostname(settings)
    ips = server_ips(settings.server)
    records = domain_records(domain, hostname, ips) + dkim_records(dkim_keys(domain, settings))
    srs_domain = normalize_domain(settings.srs.domain) if settings.srs.domain else ""
    if srs_domain and srs_domain != domain:
        records += srs_records(srs_domain, hostname, ips)
    records += host_records(hostname, ips) + ptr_records(hostname, ips)
    notes: list[str] = []
    if not ips:
        notes.append(f"set [server] public_ips to print the A/AAAA and PTR records of {hostname}; "
                     "SPF uses 'mx' until then")
    if not srs_domain:
        notes.append("SRS is off ([srs] domain unset): forwarded mail will fail SPF at its destination")
    return RecordSet(domain, tuple(records), tuple(notes),
                     tuple(shared_identity_warnings(settings, [domain])))


# ---------------------------------------------------------------- a dedicated forwarding domain


_WHY_UNSAFE = {
    "[srs] domain": "every forwarded envelope passes SPF for it, so mail forged as From: "
                    "someone@{hosted} would pass DMARC at the destination",
    "[dkim] sign_forwarded_as": "every forwarded message carries a valid signature for it, so "
                                "mail forged as From: someone@{hosted} would pass DMARC at the "
                                "destination",
    "[arc] domain": "our ARC seal on mail forged as From: someone@{hosted} would vouch for it "
                    "to receivers that trust our seals",
}


def forwarding_identities(settings: Settings) -> list[tuple[str, str]]:
    """(setting, domain) for each domain forwarded mail is sent or signed as."""
    configured = [("[srs] domain", settings.srs.domain),
                  ("[dkim] sign_forwarded_as", settings.dkim.sign_forwarded_as),
                  ("[arc] domain", settings.arc.domain)]
    identities = []
    for key, value in configured:
        try:
            identities.append((key, normalize_domain(value)))
        except AddressError:  # unset, or refused by the configuration checks already
            continue
    return identities


def shared_identity_warnings(settings: Settings, hosted: Iterable[str]) -> list[str]:
    """Why each forwarding identity that is (or shares an organizational domain with)
    a hosted domain is unsafe.

    Our SRS envelope passes SPF for that domain, and our signature is valid
    for it: both align, under DMARC's relaxed rule, with a From in any domain
    of the same organization.  If users of a hosted domain write From in it,
    mail forged in their name and forwarded by us arrives with DMARC pass.
    """
    hosted = list(dict.fromkeys(hosted))
    warnings = []
    for key, domain in forwarding_identities(settings):
        for hosted_domain in hosted:
            if aligned(domain, hosted_domain, "r"):
                relation = ("is" if domain == hosted_domain
                            else "shares its organizational domain with")
                why = _WHY_UNSAFE[key].format(hosted=hosted_domain)
                warnings.append(
                    f"{key} {domain} {relation} the hosted domain {hosted_domain}: {why}; use a "
                    "dedicated domain no user writes From in, e.g. fwd.example.net when you "
                    "host example.org")
                break
    return warnings


async def check_dedicated_domain(domain: str, settings: Settings) -> CheckResult | None:
    """A warning when forwarded mail is sent or signed as a hosted domain; None when
    SRS, ``sign_forwarded_as`` and ARC are all off (nothing to check).

    Compared with DOMAIN and every domain in the database (when it can be read).
    """
    identities = forwarding_identities(settings)
    if not identities:
        return None
    warnings = shared_identity_warnings(settings, [domain, *await database_domains(settings)])
    if warnings:
        return CheckResult(DEDICATED_DOMAIN_ITEM, True, "; ".join(warnings), warning=True)
    names = ", ".join(f"{key} {value}" for key, value in identities)
    return CheckResult(DEDICATED_DOMAIN_ITEM, True, f"{names}: no hosted domain shares "
                                                    "their organizational domain")


async def database_domains(settings: Settings) -> list[str]:
    """Every domain in the database, active or not; [] when it cannot be read
    (the ``database`` item reports that)."""
    try:
        db = await open_admin_database(settings.database)
        try:
            return [row.name for row in await Admin(db).list_domains()]
        finally:
            await db.close()
    except MailforwardError:
        return []


# ---------------------------------------------------------------- DNS lookups


async def addresses_of(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        answer = await resolve(resolver, host, rdtype)
        found += [str(ipaddress.ip_address(rd.address)) for rd in answer.records
                  if isinstance(rd, (A, AAAA))]
    return found


async def txt_texts(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """Each TXT record at ``name`` as one string (character-strings joined, RFC 7208 3.3)."""
    return [text.decode("utf-8", "replace") for text in await txt_records(resolver, name)]


def temporary(item: str, error: DnsTemporaryError) -> CheckResult:
    return CheckResult(item, False, f"DNS lookup failed (temporary): {error}")


# ---------------------------------------------------------------- MX


async def check_mx(resolver: dns.asyncresolver.Resolver, domain: str, hostname: str,
                   ips: Sequence[str], item: str = "MX") -> CheckResult:
    """Every MX host must reach this server: mail sent to any other one is not forwarded."""
    if not ips:
        return CheckResult(item, False, NO_PUBLIC_IPS)
    try:
        answer = await resolve(resolver, domain, "MX")
        if answer.nxdomain:
            return CheckResult(item, False, f"{domain} does not exist in DNS (NXDOMAIN)")
        exchanges = [rd.exchange for rd in answer.records if isinstance(rd, MX)]
        if not exchanges:
            return CheckResult(item, False, f"{domain} has no MX record; publish "
                                            f"'{absolute(domain)} MX 10 {absolute(hostname)}'")
        if all(name == dns.name.root for name in exchanges):
            return CheckResult(item, False, f"{domain} publishes a null MX: it accepts no mail")
        hosts = [name.to_text(omit_final_dot=True).lower() for name in exchanges
                 if name != dns.name.root]
        for host in hosts:
            found = await addresses_of(resolver, host)
            if not set(found) & set(ips):
                where = ", ".join(found) if found else "no address at all"
                return CheckResult(item, False, f"MX host {host} resolves to {where}, not to this "
                                                f"server ({', '.join(ips)}); point the MX at {hostname}")
    except DnsTemporaryError as e:
        return temporary(item, e)
    return CheckResult(item, True, f"{domain} MX {', '.join(hosts)} reaches this server")


# ---------------------------------------------------------------- SPF


def spf_reason(result: str, explanation: str, ip: str, domain: str) -> str:
    """Turn pyspf's verdict into advice: what is wrong and what to publish instead."""
    text = explanation.lower()
    if result == "permerror" and ("too many dns lookups" in text or "more than" in text):
        return SPF_TOO_MANY_LOOKUPS
    if result == "permerror" and "void lookup" in text:
        return "SPF has more than 2 lookups that find nothing (RFC 7208 void lookup limit)"
    if result == "none":
        return f"{domain} has no SPF record; publish '{absolute(domain)} TXT \"v=spf1 mx -all\"'"
    if result == "permerror":
        return f"the SPF record of {domain} is invalid: {explanation}"
    if result == "temperror":
        return f"DNS lookup failed (temporary): SPF of {domain}: {explanation}"
    return (f"SPF of {domain} does not authorise this server's address {ip} (result: {result}); "
            f"add ip{ipaddress.ip_address(ip).version}:{ip} to the record")


async def check_spf(domain: str, settings: Settings, ips: Sequence[str], item: str) -> CheckResult:
    """Evaluate the record as receivers will, once per address of ours (pyspf, RFC 7208)."""
    if not ips:
        return CheckResult(item, False, NO_PUBLIC_IPS)
    delivery = settings.delivery
    for ip in ips:
        verdict = await asyncio.to_thread(evaluate_spf, ip, f"postmaster@{domain}",
                                          settings.server.hostname, delivery.nameservers,
                                          delivery.dns_timeout)
        if verdict.result != "pass":
            return CheckResult(item, False, spf_reason(verdict.result, verdict.explanation, ip, domain))
    return CheckResult(item, True, f"SPF of {domain} passes for {', '.join(ips)}")


# ---------------------------------------------------------------- DMARC


async def check_dmarc(resolver: dns.asyncresolver.Resolver, domain: str) -> CheckResult:
    """The record at ``_dmarc.DOMAIN``, judged by the parser the verifier enforces it with."""
    item, name = "DMARC", f"_dmarc.{domain}"
    try:
        raw = await txt_records(resolver, name)
    except DnsTemporaryError as e:
        return temporary(item, e)
    records = dmarc_records(raw)
    if not records and raw:
        text = raw[0].decode("utf-8", "replace")
        return CheckResult(item, False, f"the TXT record at {name} is not a DMARC record, so "
                                        f"receivers ignore it: {parse_record(text).problem} "
                                        f"(found '{text}')")
    if not records:
        return CheckResult(item, False, f"no DMARC record at {name}; publish "
                                        f"'{absolute(name)} TXT \"v=DMARC1; p=none\"'")
    if len(records) > 1:
        return CheckResult(item, False, f"{name} has {len(records)} DMARC records; receivers "
                                        "ignore them all (RFC 7489 6.6.3): keep one")
    problem = parse_record(records[0]).problem
    if problem:
        return CheckResult(item, False, f"the DMARC record at {name} is malformed: {problem}")
    return CheckResult(item, True, f"{name}: {records[0]}")


# ---------------------------------------------------------------- DKIM


def dkim_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


async def check_dkim(resolver: dns.asyncresolver.Resolver, domain: str,
                     settings: Settings) -> list[CheckResult]:
    """Each selector's published p= must be the public half of the private key we sign with."""
    keys = dkim_keys(domain, settings)
    if not keys:
        return [CheckResult("DKIM", True, f"not enabled for {domain} (optional): no [dkim] key "
                                          "for it")]
    return [await check_dkim_key(resolver, key.name, key.selector, key.public_key_base64())
            for key in keys]


async def check_dkim_key(resolver: dns.asyncresolver.Resolver, name: str, selector: str,
                         expected: str) -> CheckResult:
    item = f"DKIM {selector}"
    try:
        texts = await txt_texts(resolver, name)
    except DnsTemporaryError as e:
        return temporary(item, e)
    published = [dkim_tags(t) for t in texts if "p" in dkim_tags(t)]
    if not published:
        return CheckResult(item, False, f"no DKIM record at {name}; publish the TXT record "
                                        "that 'mailforward dns' prints")
    if len(published) > 1:
        return CheckResult(item, False, f"{name} has {len(published)} DKIM records; keep one")
    if published[0]["p"] == "":
        return CheckResult(item, False, f"the key at {name} is revoked (empty p=)")
    if published[0]["p"] != expected:
        return CheckResult(item, False, f"the public key at {name} does not match our private "
                                        "key: receivers will reject our signatures; republish "
                                        "the record that 'mailforward dns' prints")
    return CheckResult(item, True, f"{name} publishes the public half of our private key")


# ---------------------------------------------------------------- database


async def check_hosted(domain: str, settings: Settings) -> CheckResult:
    """Ask the server's own query first; the admin listing only explains a "no"."""
    item = "database"
    try:
        table = await open_table(settings.database, cached=False)
        try:
            if await table.domain_is_hosted(domain):
                return CheckResult(item, True, f"{domain} is hosted and active")
        finally:
            await table.close()
        db = await open_admin_database(settings.database)
        try:
            rows = [r for r in await Admin(db).list_domains() if r.name == domain]
        finally:
            await db.close()
    except MailforwardError as e:
        return CheckResult(item, False, f"cannot read the database: {e}")
    if not rows:
        return CheckResult(item, False, f"{domain} is not in the database; add it with "
                                        f"'mailforward domain add {domain}'")
    return CheckResult(item, False, f"{domain} is in the database but inactive; enable it with "
                                    f"'mailforward domain enable {domain}'")


# ---------------------------------------------------------------- PTR


async def check_ptr(resolver: dns.asyncresolver.Resolver, hostname: str,
                    ips: Sequence[str]) -> CheckResult:
    """Forward-confirmed reverse DNS: many receivers refuse mail from an IP without it."""
    item = "PTR"
    if not ips:
        return CheckResult(item, False, NO_PUBLIC_IPS)
    try:
        for ip in ips:
            problem = await ptr_problem(resolver, hostname, ip)
            if problem:
                return CheckResult(item, False, problem)
    except DnsTemporaryError as e:
        return temporary(item, e)
    return CheckResult(item, True, f"{', '.join(ips)} ↔ {hostname} (forward-confirmed)")


async def ptr_problem(resolver: dns.asyncresolver.Resolver, hostname: str, ip: str) -> str:
    reverse = dns.reversename.from_address(ip).to_text()
    names = [rd.target.to_text(omit_final_dot=True).lower()
             for rd in (await resolve(resolver, reverse, "PTR")).records if isinstance(rd, PTR)]
    if not names:
        return (f"{ip} has no PTR record; ask your hosting provider to set it to {hostname}")
    if hostname not in names:
        return f"the PTR of {ip} is {', '.join(names)}, not {hostname}"
    if ip not in await addresses_of(resolver, hostname):
        return (f"{hostname} does not resolve back to {ip}: add '{absolute(hostname)} "
                f"{'A' if ipaddress.ip_address(ip).version == 4 else 'AAAA'} {ip}'")
    return ""


# ---------------------------------------------------------------- the checklist


async def run_dns_checks(domain: str, settings: Settings) -> list[CheckResult]:
    """The seed's checklist items that DNS and the database can prove, in the seed's order."""
    domain = normalize_domain(domain)
    hostname = public_hostname(settings)
    ips = server_ips(settings.server)
    resolver = make_resolver(settings.delivery.nameservers, settings.delivery.dns_timeout)
    results = [await check_mx(resolver, domain, hostname, ips),
               await check_spf(domain, settings, ips, "SPF")]
    srs_domain = normalize_domain(settings.srs.domain) if settings.srs.domain else ""
    if not srs_domain:
        results.append(CheckResult("SPF (SRS domain)", False, "SRS is off: set [srs] domain; "
                                   "forwarding without SRS breaks SPF at the destination"))
    elif srs_domain != domain:
        results.append(await check_spf(srs_domain, settings, ips, "SPF (SRS domain)"))
    results.append(await check_dmarc(resolver, domain))
    results += await check_dkim(resolver, domain, settings)
    results.append(await check_hosted(domain, settings))
    results.append(await check_ptr(resolver, hostname, ips))
    dedicated = await check_dedicated_domain(domain, settings)
    return results if dedicated is None else [*results, dedicated]


def valid_domain(text: str) -> str:
    """The domain argument, normalised; AddressError (a usage error) when it is not one."""
    domain = normalize_domain(text)
    if "." not in domain:
        raise AddressError(f"{text!r} is not a fully qualified domain name")
    return domain
