"""The spoofing matrix (issue 11): our signature and our SRS domain never vouch for a spoof.

Every From-field form is sent by an outsider (127.0.0.1) and by a
``mynetworks`` client (127.0.0.2), with the envelope sender ``x@attacker.test``
(SPF passes for it, aligned with nothing but attacker.test), for a sender
domain publishing ``p=reject`` (sender.test), ``p=none`` (lax.test) or no
DMARC record (nopolicy.test).  The reply must follow the From policy; and
every message that reaches the destination is judged there: Mail::DKIM for
each signature, SPF for the SRS envelope sender, and DMARC alignment for
each domain the From field(s) name.  No spoof may leave with an aligned pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mailforward.smtpd import replies

from trust_world import (
    ALIAS,
    Arrival,
    Outcome,
    Reply,
    TrustWorld,
    from_domains,
    header_section,
    is_ours,
    new_marker,
    org_domain,
    sign,
    world,
)

__all__ = ["world"]  # the module-scoped fixture, imported for pytest

ENVELOPE = "x@attacker.test"
POLICIES = {"reject": "sender.test", "none": "lax.test", "absent": "nopolicy.test"}
FORWARDED = "forwarded"
Expected = replies.Reply


@dataclass(frozen=True)
class Form:
    id: str
    fields: bytes  # the From field(s), CRLF-terminated; {d} is the sender domain, {D} upper-cased
    verdict: str  # "valid", or the name of the reply constant that refuses it
    domain: str = ""  # a valid form's From domain when it is not {d}

    def render(self, domain: str) -> bytes:
        return self.fields.replace(b"{d}", domain.encode()).replace(b"{D}", domain.upper().encode())


VALID = [
    Form("addr-spec", b"From: ceo@{d}\r\n", "valid"),
    Form("angle-addr", b"From: <ceo@{d}>\r\n", "valid"),
    Form("display-name", b"From: CEO <ceo@{d}>\r\n", "valid"),
    Form("quoted-display-with-comma", b'From: "CEO, Sender" <ceo@{d}>\r\n', "valid"),
    Form("encoded-word-display", b"From: =?utf-8?q?J=C3=B6rg?= <ceo@{d}>\r\n", "valid"),
    Form("comment-in-display", b"From: CEO (comment) <ceo@{d}>\r\n", "valid"),
    Form("trailing-comment", b"From: ceo@{d} (CEO)\r\n", "valid"),
    Form("folded-display-name", b"From: CEO\r\n Sender\r\n\t<ceo@{d}>\r\n", "valid"),
    Form("upper-case-domain", b"From: ceo@{D}\r\n", "valid"),
    Form("quoted-local-part", b'From: "ceo"@{d}\r\n', "valid"),
    Form("address-as-display-name", b'From: "ceo@{d}" <x@attacker.test>\r\n', "valid",
         domain="attacker.test"),
]

MALFORMED = [
    Form("no-from", b"Reply-To: ceo@{d}\r\n", "FROM_MISSING"),
    Form("two-from", b"From: ceo@{d}\r\nFrom: x@attacker.test\r\n", "FROM_REPEATED"),
    Form("two-from-reversed", b"From: x@attacker.test\r\nFrom: ceo@{d}\r\n", "FROM_REPEATED"),
    Form("two-from-apart", b"From: ceo@{d}\r\nX-Filler: 1\r\nFrom: x@attacker.test\r\n",
         "FROM_REPEATED"),
    Form("from-plus-empty-from", b"From: ceo@{d}\r\nFrom:\r\n", "FROM_REPEATED"),
    Form("empty-from-plus-from", b"From:\r\nFrom: ceo@{d}\r\n", "FROM_REPEATED"),
    Form("same-from-twice", b"From: ceo@{d}\r\nFrom: ceo@{d}\r\n", "FROM_REPEATED"),
    Form("case-variant-names", b"FROM: x@attacker.test\r\nfrom: ceo@{d}\r\n", "FROM_REPEATED"),
    Form("obsolete-second-from", b"From: x@attacker.test\r\nFrom : ceo@{d}\r\n", "FROM_REPEATED"),
    Form("mailbox-list", b"From: ceo@{d}, x@attacker.test\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("mailbox-list-reversed", b"From: x@attacker.test, ceo@{d}\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("mailbox-list-same-domain", b"From: ceo@{d}, cfo@{d}\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("group", b"From: Board: ceo@{d};\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("empty-group", b"From: undisclosed-recipients:;\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("addr-spec-then-angle", b"From: ceo@{d} <ceo>\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("encoded-word-address", b"From: =?utf-8?q?ceo=40{d}?=\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("nul-after-domain", b"From: ceo@{d}\x00x\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("invalid-utf8-after-domain", b"From: ceo@{d}\xff\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("unbalanced-comment", b"From: CEO (comment <ceo@{d}>\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("unbalanced-angle", b"From: CEO <ceo@{d}\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("unbalanced-quote", b'From: "CEO <ceo@{d}>\r\n', "FROM_NOT_ONE_MAILBOX"),
    Form("empty-value", b"From:\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("blank-value", b"From:    \r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("no-domain", b"From: ceo\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("two-at-signs", b"From: ceo@attacker.test@{d}\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("two-angle-addrs", b"From: <ceo@{d}> <x@attacker.test>\r\n", "FROM_NOT_ONE_MAILBOX"),
    Form("text-after-angle-addr", b"From: <ceo@{d}> trailing\r\n", "FROM_NOT_ONE_MAILBOX"),
]

FORMS = VALID + MALFORMED

# A header From in one of our domains: hosted, the SRS domain, the signing/ARC domain,
# and anything sharing their organizational domain.
OWN_DOMAIN_FORMS = [
    Form("hosted-postmaster", b"From: postmaster@example.org\r\n", "valid", "example.org"),
    Form("hosted-upper-case", b"From: CEO <ceo@EXAMPLE.ORG>\r\n", "valid", "example.org"),
    Form("hosted-the-alias-itself", b'From: "Alice" <alice@example.org>\r\n', "valid", "example.org"),
    Form("hosted-subdomain", b"From: x@sub.example.org\r\n", "valid", "sub.example.org"),
    Form("signing-domain", b"From: x@fwd.test\r\n", "valid", "fwd.test"),
    Form("srs-domain", b"From: x@srs.fwd.test\r\n", "valid", "srs.fwd.test"),
    Form("under-signing-domain", b"From: Support <x@deep.sub.fwd.test>\r\n", "valid",
         "deep.sub.fwd.test"),
    Form("signing-domain-folded", b"From: Fwd\r\n Team <x@FWD.test>\r\n", "valid", "fwd.test"),
]


def message(fields: bytes, marker: str, body: bytes = b"") -> bytes:
    return (fields + b"To: alice@example.org\r\n"
            + f"Subject: matrix {marker}\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
              f"Message-ID: <{marker}@attacker.test>\r\n\r\n".encode()
            + (body or f"Please wire the money. {marker}\r\n".encode()))


def assert_reply(got: Reply, expected: Expected | str) -> None:
    if expected == FORWARDED:
        assert got.code == 250, f"expected the message to be forwarded, got {got}"
        return
    assert isinstance(expected, Expected)
    assert (got.code, got.status) == (expected.code, expected.status), \
        f"expected {expected}, got {got}"
    assert got.text.lower() == f"{expected.status} {expected.text}".lower(), \
        f"expected {expected}, got {got}"


def expected_reply(form: Form, domain: str, trusted: bool) -> Expected | str:
    if trusted:
        return FORWARDED  # nothing in the From policy refuses our own clients
    if form.verdict != "valid":
        return getattr(replies, form.verdict)  # type: ignore[no-any-return]
    from_domain = form.domain or domain
    if from_domain == "sender.test":  # p=reject, and nothing authenticates sender.test
        return replies.dmarc_rejected("sender.test")
    return FORWARDED


def spoofed_domains(arrival: Arrival, trusted: bool, authenticated: str = "attacker.test") -> set[str]:
    """From domains the real sender did not authenticate on arrival.

    The matrix's messages carry no DKIM signature and come with an envelope
    sender in attacker.test, whose SPF passes: attacker.test is the only
    domain they authenticate.  A mynetworks client may legitimately write
    in our own domains, so those are not spoofs when it does.
    """
    return {d for d in from_domains(arrival.content)
            if org_domain(d) != org_domain(authenticated) and not (trusted and is_ours(d))}


def assert_no_aligned_pass(world: TrustWorld, arrival: Arrival, spoofed: set[str]) -> None:
    if not spoofed:
        return
    dkim = world.judge.dkim(arrival.content)
    for domain in sorted(spoofed):
        reasons = world.aligned_pass(arrival, domain, dkim)
        assert not reasons, (f"a spoof of {domain} left with a DMARC pass at the destination: "
                             f"{reasons} (envelope {arrival.mail_from}, DKIM {dkim})")


def check_sent(world: TrustWorld, outcome: Outcome, expected: Expected | str, trusted: bool) -> None:
    for arrival in outcome.arrivals:  # the gravest failure first
        assert_no_aligned_pass(world, arrival, spoofed_domains(arrival, trusted))
    assert_reply(outcome.final, expected)
    if expected == FORWARDED:
        assert len(outcome.arrivals) == 1
    else:
        assert outcome.arrivals == [], "a refused message reached the destination"


# --------------------------------------------------------------------------- the harness itself


def test_harness_judges_a_plain_forward_as_the_destination_would(world: TrustWorld) -> None:
    """Our own signature, ARC and SRS pass at the destination: the judge is sound."""
    from mail_dkim import mail_dkim_verify

    marker = new_marker()
    outcome = world.send(ENVELOPE, message(b"From: x@attacker.test\r\n", marker), marker=marker)
    assert outcome.final.code == 250
    arrival = outcome.arrived
    assert arrival.rcpt_tos == ["alice@dest.test"]
    assert world.judge.dkim(arrival.content) == [("pass", "fwd.test")]
    assert world.judge.dkim(arrival.content) == mail_dkim_verify(arrival.content, world.dns.port)
    assert world.judge.arc(arrival.content) == "pass"
    assert arrival.mail_from.startswith("SRS0") and arrival.mail_from.endswith("@srs.fwd.test")
    assert world.spf(arrival.mail_from) == "pass"
    assert world.aligned_pass(arrival, "fwd.test")  # what a spoof of fwd.test would get
    assert not world.aligned_pass(arrival, "sender.test")


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("source", ["untrusted", "trusted"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("form", FORMS, ids=[f.id for f in FORMS])
def test_from_field_matrix(world: TrustWorld, form: Form, policy: str, source: str) -> None:
    trusted = source == "trusted"
    domain = POLICIES[policy]
    marker = new_marker()
    outcome = world.send(ENVELOPE, message(form.render(domain), marker), marker=marker,
                         trusted=trusted)
    check_sent(world, outcome, expected_reply(form, domain, trusted), trusted)


@pytest.mark.parametrize("source", ["untrusted", "trusted"])
@pytest.mark.parametrize("form", OWN_DOMAIN_FORMS, ids=[f.id for f in OWN_DOMAIN_FORMS])
def test_from_in_our_own_domains(world: TrustWorld, form: Form, source: str) -> None:
    trusted = source == "trusted"
    marker = new_marker()
    outcome = world.send(ENVELOPE, message(form.fields, marker), marker=marker, trusted=trusted)
    if trusted:
        check_sent(world, outcome, FORWARDED, trusted)
        return
    for arrival in outcome.arrivals:  # none should arrive; judge what leaked, gravest first
        assert_no_aligned_pass(world, arrival, spoofed_domains(arrival, trusted))
    got, expected = outcome.final, replies.own_domain_unauthenticated(form.domain)
    assert (got.code, got.status) == (expected.code, expected.status), f"expected {expected}, got {got}"
    assert got.text.lower().startswith(f"{expected.status} Message rejected: From header in".lower())
    assert form.domain in got.text.lower() or org_domain(form.domain) in got.text.lower(), got
    assert outcome.arrivals == [], "a refused message reached the destination"


def _hosted_message(marker: str) -> bytes:
    return message(b"From: CEO <ceo@example.org>\r\n", marker)


def test_own_domain_mail_that_passes_dmarc_on_arrival_is_forwarded(world: TrustWorld) -> None:
    """A message really signed by example.org (key in DNS) authenticates example.org."""
    marker = new_marker()
    signed = sign(_hosted_message(marker), world.keys["example.org"])
    outcome = world.send(ENVELOPE, signed, marker=marker)
    assert outcome.final.code == 250, outcome.final
    dkim = world.judge.dkim(outcome.arrived.content)
    assert ("pass", "example.org") in dkim
    assert ("pass", "fwd.test") in dkim
    assert world.judge.arc(outcome.arrived.content) == "pass"


@pytest.mark.parametrize("how", ["signed-by-another-domain", "signature-broken"])
def test_own_domain_mail_with_an_unaligned_or_broken_signature_is_refused(
        world: TrustWorld, how: str) -> None:
    marker = new_marker()
    if how == "signed-by-another-domain":
        content = sign(_hosted_message(marker), world.keys["attacker.test"])
    else:
        content = sign(_hosted_message(marker), world.keys["example.org"]).replace(
            b"Please wire", b"Please send")
    outcome = world.send(ENVELOPE, content, marker=marker)
    expected = replies.own_domain_unauthenticated("example.org")
    assert (outcome.final.code, outcome.final.status) == (expected.code, expected.status), outcome.final
    assert outcome.arrivals == []


# --------------------------------------------------------------------------- line endings


SPLIT_HEADERS = {
    "bare-cr": (b"Subject: hi\rFrom: ceo@sender.test\r\r\nFrom: x@attacker.test\r\n"),
    "bare-lf": (b"Subject: hi\nFrom: ceo@sender.test\n\r\nFrom: x@attacker.test\r\n"),
    "bare-cr-crlf-mix": (b"Subject: hi\r\nX-A: 1\rFrom: ceo@sender.test\r\r\nFrom: x@attacker.test\r\n"),
}


def _split_message(prefix: bytes, marker: str) -> bytes:
    return prefix + (f"To: alice@example.org\r\nMessage-ID: <{marker}@attacker.test>\r\n\r\n"
                     f"body {marker}\r\n").encode()


@pytest.mark.parametrize("variant", list(SPLIT_HEADERS))
def test_bare_line_ends_cannot_split_the_header_for_an_outsider(world: TrustWorld, variant: str) -> None:
    """Normalised before verification, the message is From ceo@sender.test (p=reject): refused."""
    marker = new_marker()
    outcome = world.send(ENVELOPE, _split_message(SPLIT_HEADERS[variant], marker), marker=marker)
    assert_reply(outcome.final, replies.dmarc_rejected("sender.test"))
    assert outcome.arrivals == []


@pytest.mark.parametrize("variant", list(SPLIT_HEADERS))
def test_bare_line_ends_are_normalised_before_verifying_signing_and_sending(
        world: TrustWorld, variant: str) -> None:
    """From a trusted client the message is forwarded: the bytes verified, signed and sent agree."""
    marker = new_marker()
    outcome = world.send(ENVELOPE, _split_message(SPLIT_HEADERS[variant], marker), marker=marker,
                         trusted=True)
    assert outcome.final.code == 250, outcome.final
    content = outcome.arrived.content
    stripped = content.replace(b"\r\n", b"")
    assert b"\r" not in stripped and b"\n" not in stripped, "bare CR or LF reached the destination"
    header = header_section(content)
    assert b"header.from=sender.test" in header, "what was verified is not what was sent"
    assert b"\r\nFrom: ceo@sender.test\r\n" in header + b"\r\n"
    assert b"From: x@attacker.test" not in header
    assert ("pass", "fwd.test") in world.judge.dkim(content)
    assert world.judge.arc(content) == "pass"


# --------------------------------------------------------------------------- SMTP smuggling


FAKE_ENDS = {
    "lf-dot-lf": b"\n.\n",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr-crlf": b"\r\n.\r\r\n",
    "lf-cr-dot-crlf": b"\n\r.\r\n",
    "cr-dot-lf": b"\r.\n",
}


@pytest.mark.parametrize("fake_end", list(FAKE_ENDS))
def test_smuggled_second_message_is_never_sent_on_its_own(world: TrustWorld, fake_end: str) -> None:
    """Only <CRLF>.<CRLF> ends DATA: one message arrives (or none), never the smuggled one."""
    outer, inner = new_marker(), new_marker()
    smuggled = (b"MAIL FROM:<x@attacker.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
                + f"From: x@attacker.test\r\nTo: alice@example.org\r\nSubject: smuggled {inner}\r\n"
                  f"Message-ID: <{inner}@attacker.test>\r\n\r\nsmuggled {inner}\r\n".encode())
    body = (f"From: x@attacker.test\r\nTo: alice@example.org\r\nSubject: outer {outer}\r\n"
            f"Message-ID: <{outer}@attacker.test>\r\n\r\nouter {outer}".encode()
            + FAKE_ENDS[fake_end] + smuggled)
    with world.client() as client:
        assert client.command("EHLO client.attacker.test").code == 250
        assert client.command("MAIL FROM:<x@attacker.test>").code == 250
        assert client.command(f"RCPT TO:<{ALIAS}>").code == 250
        assert client.command("DATA").code == 354
        client.send(body + b"\r\n.\r\n" + b"QUIT\r\n")
        replies_seen = []
        while (reply := client.read_reply()).code != 0:
            replies_seen.append(reply)
    arrived = {id(a): a for a in world.arrivals(outer, expect=False) + world.arrivals(inner, expect=False)}
    assert len(arrived) <= 1, f"{len(arrived)} messages left from one DATA: {replies_seen}"
    for arrival in arrived.values():
        assert outer.encode() in arrival.content, "the smuggled message was sent on its own"
    assert sum(1 for r in replies_seen if r.code == 250 and "queued" in r.text) <= 1, replies_seen
    with world.client() as client:  # and the server still serves
        assert client.banner.code == 220
        assert client.command("EHLO x").code == 250
