"""``auth.dmarc``: one record parser, policy discovery, alignment, and the verdict.

The table at the end serves each record from a DNS server on loopback and
asks both ``mailforward check`` (``check_dmarc``) and the inbound verifier
about it: a record ``check`` calls valid is enforced as published, one it
calls invalid is not enforced at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from mailforward.auth.dmarc import (
    MISSING_VERSION,
    Authenticated,
    DmarcPolicy,
    aligned,
    discover_policy,
    dmarc_records,
    dmarc_result,
    from_domain_of,
    is_dmarc_record,
    org_domain,
    parse_record,
)
from mailforward.auth.verify import Verifier
from mailforward.dns import make_resolver
from mailforward.dnstools import check_dmarc

from smtp_harness import serve_zone

STRANGER = "192.0.2.66"  # authorised by no SPF record below
TIMEOUT = 2.0
REJECT = "v=DMARC1; p=reject"
P_MISSING = "the p= tag (none, quarantine or reject) is missing"


def lookup_from(zone: dict[str, Sequence[str]]) -> Callable[[str], list[bytes]]:
    """A TXT lookup answering from a dict, for discovery without DNS."""
    return lambda name: [text.encode() for text in zone.get(name, ())]


# --- is it a DMARC record at all


def test_record_with_upper_case_v_tag_is_a_dmarc_record() -> None:
    assert is_dmarc_record("V=DMARC1; p=reject")


def test_record_with_lower_case_version_value_is_not_a_dmarc_record() -> None:
    assert not is_dmarc_record("v=dmarc1; p=reject")


def test_record_whose_first_tag_is_not_v_is_not_a_dmarc_record() -> None:
    assert not is_dmarc_record("p=reject; v=DMARC1")


def test_white_space_around_the_version_tag_is_allowed() -> None:
    assert is_dmarc_record("v = DMARC1 ;p=none")


def test_other_txt_records_are_not_dmarc_records() -> None:
    assert dmarc_records([b"v=spf1 -all", b"v=DMARC1; p=none"]) == ["v=DMARC1; p=none"]


# --- problems, for check


def test_valid_record_has_no_problem() -> None:
    assert parse_record("v=DMARC1; p=reject; sp=none; adkim=s; aspf=r; pct=50").problem == ""


def test_not_a_dmarc_record_is_the_first_problem() -> None:
    assert parse_record("p=reject; v=DMARC1").problem == MISSING_VERSION


def test_missing_policy_is_a_problem() -> None:
    assert parse_record("v=DMARC1; rua=mailto:d@example.org").problem == P_MISSING


def test_unknown_policy_is_a_problem() -> None:
    assert parse_record("v=DMARC1; p=maybe").problem == \
        "p=maybe is not one of none, quarantine, reject"


def test_policy_value_is_case_insensitive() -> None:
    assert parse_record("v=DMARC1; p=Reject").problem == ""


def test_bad_alignment_mode_is_a_problem() -> None:
    assert parse_record("v=DMARC1; p=none; adkim=x").problem == "adkim=x must be r or s"


def test_pct_over_100_is_a_problem() -> None:
    assert parse_record("v=DMARC1; p=none; pct=101").problem == \
        "pct=101 must be a number from 0 to 100"


def test_part_without_equals_is_a_problem() -> None:
    assert parse_record("v=DMARC1; p=none; oops").problem == "'oops' is not tag=value"


def test_repeated_tag_is_a_problem() -> None:
    assert parse_record("v=DMARC1; p=none; p=reject").problem == \
        "the p= tag appears more than once"


# --- what the verifier applies


def test_policy_is_p_for_the_domain_itself() -> None:
    assert parse_record("v=DMARC1; p=reject; sp=none").requested_policy(subdomain=False) == \
        "reject"


def test_subdomain_gets_sp() -> None:
    assert parse_record("v=DMARC1; p=reject; sp=none").requested_policy(subdomain=True) == "none"


def test_subdomain_gets_p_without_sp() -> None:
    assert parse_record(REJECT).requested_policy(subdomain=True) == "reject"


def test_missing_policy_without_report_address_applies_nothing() -> None:
    assert parse_record("v=DMARC1; adkim=s").requested_policy(subdomain=False) is None


def test_invalid_policy_with_report_address_acts_as_p_none() -> None:
    record = parse_record("v=DMARC1; p=maybe; rua=mailto:d@example.org")
    assert record.requested_policy(subdomain=False) == "none"


def test_invalid_sp_applies_nothing_even_to_the_domain_itself() -> None:
    assert parse_record("v=DMARC1; p=reject; sp=bogus").requested_policy(False) is None


def test_invalid_alignment_mode_defaults_to_relaxed() -> None:
    assert parse_record("v=DMARC1; p=none; aspf=x").alignment("aspf") == "r"


def test_first_of_repeated_tags_is_applied() -> None:
    assert parse_record("v=DMARC1; p=reject; p=none").requested_policy(False) == "reject"


# --- policy discovery


def test_discovery_finds_the_from_domains_own_record() -> None:
    lookup = lookup_from({"_dmarc.example.test": ["v=DMARC1; p=quarantine; aspf=s"]})
    assert discover_policy(lookup, "example.test") == DmarcPolicy("example.test", "quarantine",
                                                                  "r", "s")


def test_discovery_falls_back_to_the_organizational_domain_with_sp() -> None:
    lookup = lookup_from({"_dmarc.example.test": ["v=DMARC1; p=reject; sp=quarantine"]})
    assert discover_policy(lookup, "news.example.test") == DmarcPolicy(
        "example.test", "quarantine", "r", "r")


def test_two_records_apply_no_policy() -> None:
    lookup = lookup_from({"_dmarc.example.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert discover_policy(lookup, "example.test") is None


def test_two_records_at_a_subdomain_do_not_fall_back_to_the_org_domain() -> None:
    lookup = lookup_from({"_dmarc.news.example.test": [REJECT, REJECT],
                          "_dmarc.example.test": [REJECT]})
    assert discover_policy(lookup, "news.example.test") is None


def test_no_record_anywhere_applies_no_policy() -> None:
    assert discover_policy(lookup_from({}), "news.example.test") is None


# --- organizational domain, alignment, the verdict


def test_org_domain_uses_public_suffix_list() -> None:
    assert org_domain("a.b.example.co.uk") == "example.co.uk"


def test_org_domain_of_unlisted_tld_is_last_two_labels() -> None:
    assert org_domain("news.example.test") == "example.test"


def test_relaxed_alignment_compares_org_domains() -> None:
    assert aligned("mail.example.co.uk", "example.co.uk", "r")
    assert not aligned("other.co.uk", "example.co.uk", "r")


def test_strict_alignment_needs_same_domain() -> None:
    assert not aligned("mail.example.test", "example.test", "s")
    assert aligned("EXAMPLE.test.", "example.test", "s")


RELAXED = DmarcPolicy("example.test", "reject", "r", "r")
NO_SPF = Authenticated("fail", "other.test")


def test_aligned_spf_pass_passes() -> None:
    assert dmarc_result(RELAXED, "example.test", Authenticated("pass", "mail.example.test"),
                        []) == "pass"


def test_aligned_dkim_pass_passes() -> None:
    assert dmarc_result(RELAXED, "example.test", NO_SPF,
                        [Authenticated("pass", "example.test")]) == "pass"


def test_unaligned_dkim_pass_fails() -> None:
    assert dmarc_result(RELAXED, "example.test", NO_SPF,
                        [Authenticated("pass", "other.test")]) == "fail"


def test_aligned_dkim_that_did_not_pass_fails() -> None:
    assert dmarc_result(RELAXED, "example.test", NO_SPF,
                        [Authenticated("permerror", "example.test")]) == "fail"


def test_from_domain_is_normalised() -> None:
    assert from_domain_of(b"From: A <a@EXAMPLE.test>\r\n\r\n") == ("example.test", "")


def test_from_field_in_obsolete_syntax_is_read() -> None:
    assert from_domain_of(b"From  : a@example.test\r\n\r\n") == ("example.test", "")


def test_two_from_fields_are_a_permerror() -> None:
    assert from_domain_of(b"From: a@example.test\r\nFrom: b@example.test\r\n\r\n") == (
        "", "permerror")


# --- check and the verifier agree on every record


@dataclass(frozen=True)
class Row:
    records: tuple[str, ...]
    check_ok: bool
    enforced: str  # the policy the verifier applies to a failing message; "" for none


TABLE = {
    "valid": Row((REJECT,), True, "reject"),
    "upper-case V tag": Row(("V=DMARC1; p=reject",), True, "reject"),
    "lower-case version value": Row(("v=dmarc1; p=reject",), False, ""),
    "missing v": Row(("p=reject",), False, ""),
    "v not first": Row(("p=reject; v=DMARC1",), False, ""),
    "two records": Row((REJECT, "v=DMARC1; p=none"), False, ""),
    "p missing": Row(("v=DMARC1; adkim=s",), False, ""),
    "bad p": Row(("v=DMARC1; p=rejected",), False, ""),
    "upper-case policy value": Row(("v=DMARC1; P=REJECT",), True, "reject"),
}


def zone_for(domain: str, records: tuple[str, ...]) -> str:
    return "".join(f'_dmarc.{domain}. 300 IN TXT "{record}"\n' for record in records)


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
async def test_check_and_verifier_agree_on_dmarc_record(row: Row) -> None:
    domain = "table.test"
    with serve_zone(zone_for(domain, row.records)) as server:
        checked = await check_dmarc(make_resolver([server.nameserver], TIMEOUT), domain)
        verdict = await Verifier("mx.test", [server.nameserver], TIMEOUT).verify(
            f"From: a@{domain}\r\n\r\nbody\r\n".encode(), STRANGER, "helo.test",
            f"a@{domain}")
    assert (checked.ok, verdict.dmarc_policy) == (row.check_ok, row.enforced)


async def test_dmarc_record_with_upper_case_v_tag_is_enforced() -> None:
    zone = zone_for("upper.test", ("V=DMARC1; p=reject",))
    with serve_zone(zone) as server:
        verdict = await Verifier("mx.test", [server.nameserver], TIMEOUT).verify(
            b"From: ceo@upper.test\r\n\r\nbody\r\n", STRANGER, "helo.test", "x@attacker.test")
    assert verdict.dmarc_rejects


async def test_check_explains_a_txt_record_that_is_not_a_dmarc_record() -> None:
    with serve_zone(zone_for("lower.test", ("v=dmarc1; p=reject",))) as server:
        checked = await check_dmarc(make_resolver([server.nameserver], TIMEOUT), "lower.test")
    assert checked.reason == ("the TXT record at _dmarc.lower.test is not a DMARC record, so "
                              f"receivers ignore it: {MISSING_VERSION} "
                              "(found 'v=dmarc1; p=reject')")
