"""The deliverability corpus (issue 11): legitimate signed mail survives forwarding intact.

Each message is DKIM-signed by sender.test (dkimpy) and sent by an outsider
(127.0.0.1) to alice@example.org.  At the destination (the sink), judged by
Perl's Mail::DKIM: the original sender.test signature still verifies, our
fwd.test signature verifies, the ARC chain passes, the envelope sender is
SRS in srs.fwd.test, and SPF passes for it from our address.  The bytes sent
are the bytes that arrive, after the headers we prepend.

Most messages come with an envelope sender in sender.test (SPF passes and
is aligned); those marked ``dkim_only`` come from bounces@attacker.test, so
only the DKIM signature authenticates them: a verifier that fails to read a
valid signature refuses them under sender.test's ``p=reject``.

Also here: envelope senders SRS cannot rewrite are refused at MAIL FROM,
never accepted and then stuck in the spool.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from mailforward.smtpd import replies

from trust_world import Arrival, TrustWorld, new_marker, sign, world

__all__ = ["world"]  # the module-scoped fixture, imported for pytest

SENDER = "sender@sender.test"
LIST_BOUNCES = "bounces@attacker.test"
SRS_SENDER = re.compile(r"SRS0=[^@]+@srs\.fwd\.test")

HEADERS = (b"From: Sender <sender@sender.test>\r\n"
           b"To: Alice <alice@example.org>\r\n"
           b"Subject: corpus {m}\r\n"
           b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <{m}@sender.test>\r\n")
BODY = b"Hello Alice,\r\n\r\nthis is message {m}.\r\n-- \r\nSender\r\n"

RELAXED_SIMPLE = (b"relaxed", b"simple")
RELAXED_RELAXED = (b"relaxed", b"relaxed")
SIMPLE_SIMPLE = (b"simple", b"simple")
SIMPLE_RELAXED = (b"simple", b"relaxed")

LONG_WORDS = b" ".join(b"word%04d" % i for i in range(170))  # ~1500 bytes, one line


@dataclass(frozen=True)
class Case:
    id: str
    headers: bytes = HEADERS
    body: bytes = BODY
    canonicalize: tuple[bytes, bytes] = RELAXED_SIMPLE
    include_headers: tuple[bytes, ...] | None = None
    length: bool = False
    dkim_only: bool = False
    mail_params: str = ""
    # how the signed (CRLF-clean) message is altered on the wire, for line ends and obsolete syntax
    on_the_wire: Callable[[bytes], bytes] | None = None

    def signed(self, world: TrustWorld, marker: str) -> bytes:
        message = (self.headers + b"\r\n" + self.body).replace(b"{m}", marker.encode())
        return sign(message, world.keys["sender.test"], canonicalize=self.canonicalize,
                    include_headers=self.include_headers, length=self.length)


def _replace(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def alter(message: bytes) -> bytes:
        assert old in message, f"corpus bug: {old!r} not in the message"
        return message.replace(old, new, 1)
    return alter


MULTIPART_ALTERNATIVE = (
    b"This is a multi-part message in MIME format.\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe {m}\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"<p>Gr=C3=BC=C3=9Fe {m}, a long line soft-broken with quoted-printable =\r\nencoding</p>\r\n"
    b"--b1--\r\n")
MULTIPART_MIXED = (
    b"--m1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee attached {m}.\r\n"
    b"--m1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=\"data.bin\"\r\n\r\n"
    + b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4\r\n" * 20
    + b"--m1--\r\n")
MULTIPART_NESTED = (
    b"--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
    b"--inner\r\nContent-Type: text/plain\r\n\r\nplain {m}\r\n"
    b"--inner\r\nContent-Type: text/html\r\n\r\n<b>html {m}</b>\r\n--inner--\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: someone@lax.test\r\nSubject: inner\r\n\r\n.inner body\r\n"
    b"--outer--\r\n")


def _with(extra: bytes, headers: bytes = HEADERS) -> bytes:
    return headers + extra


CORPUS = [
    Case("relaxed-simple"),
    Case("relaxed-relaxed", canonicalize=RELAXED_RELAXED),
    Case("simple-simple", canonicalize=SIMPLE_SIMPLE),
    Case("simple-relaxed", canonicalize=SIMPLE_RELAXED),
    Case("simple-simple-dkim-only", canonicalize=SIMPLE_SIMPLE, dkim_only=True),
    Case("length-tag-relaxed-simple", length=True),
    Case("length-tag-simple-simple", canonicalize=SIMPLE_SIMPLE, length=True, dkim_only=True),
    Case("length-tag-relaxed-relaxed", canonicalize=RELAXED_RELAXED, length=True),
    Case("folded-subject", headers=HEADERS.replace(
        b"Subject: corpus {m}\r\n", b"Subject: corpus\r\n {m} with a subject\r\n\tfolded twice\r\n")),
    Case("folded-subject-simple-headers", canonicalize=SIMPLE_SIMPLE, dkim_only=True,
         headers=HEADERS.replace(b"Subject: corpus {m}\r\n",
                                 b"Subject: corpus\r\n {m} folded\r\n")),
    Case("folded-to-with-tabs", canonicalize=SIMPLE_RELAXED, headers=HEADERS.replace(
        b"To: Alice <alice@example.org>\r\n", b"To: Alice\r\n\t<alice@example.org>,\r\n\tBob <bob@lax.test>\r\n")),
    Case("obsolete-header-signed", headers=_with(b"X-Spaces: value\r\n"), dkim_only=True,
         on_the_wire=_replace(b"\r\nX-Spaces: value\r\n", b"\r\nX-Spaces  :   value\r\n")),
    Case("obsolete-header-signed-spf-too", headers=_with(b"X-Spaces: value\r\n"),
         on_the_wire=_replace(b"\r\nX-Spaces: value\r\n", b"\r\nX-Spaces  :   value\r\n")),
    Case("obsolete-header-unsigned", headers=_with(b"X-Spaces: value\r\n"), canonicalize=SIMPLE_SIMPLE,
         include_headers=(b"from", b"to", b"subject", b"date", b"message-id"), dkim_only=True,
         on_the_wire=_replace(b"\r\nX-Spaces: value\r\n", b"\r\nX-Spaces  :   value\r\n")),
    Case("8bit-utf8-body", mail_params="BODY=8BITMIME",
         headers=_with(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                       b"Content-Transfer-Encoding: 8bit\r\n"),
         body=b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln {m} \xe2\x82\xac \xf0\x9f\x93\xa7\r\n"),
    Case("8bit-utf8-body-simple", mail_params="BODY=8BITMIME", canonicalize=SIMPLE_SIMPLE,
         dkim_only=True, headers=_with(b"Content-Type: text/plain; charset=utf-8\r\n"),
         body=b"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e {m}\r\n\xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82\r\n"),
    Case("utf8-header-smtputf8", mail_params="BODY=8BITMIME SMTPUTF8",
         headers=HEADERS.replace(b"Subject: corpus {m}", b"Subject: J\xc3\xb6rg's corpus {m}")),
    Case("multipart-alternative", mail_params="BODY=8BITMIME", body=MULTIPART_ALTERNATIVE,
         headers=_with(b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n")),
    Case("multipart-mixed-base64", canonicalize=SIMPLE_SIMPLE, dkim_only=True, body=MULTIPART_MIXED,
         headers=_with(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m1\"\r\n")),
    Case("multipart-nested", canonicalize=RELAXED_RELAXED, body=MULTIPART_NESTED,
         headers=_with(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n")),
    Case("long-body-line-1500", canonicalize=SIMPLE_SIMPLE, body=b"start {m}\r\n" + LONG_WORDS + b"\r\nend\r\n"),
    Case("long-body-line-6000", canonicalize=RELAXED_RELAXED, dkim_only=True,
         body=b"start {m}\r\n" + b"x" * 6000 + b"\r\nend\r\n"),
    Case("long-header-line", headers=_with(b"X-Long: " + LONG_WORDS[:1200] + b"\r\n")),
    Case("lone-cr-in-body", body=b"line one\r\nline two {m}\r\nline three\r\n",
         on_the_wire=_replace(b"line one\r\nline two", b"line one\rline two")),
    Case("lone-cr-in-body-simple", canonicalize=SIMPLE_SIMPLE, dkim_only=True,
         body=b"first\r\nsecond\r\nthird {m}\r\n", on_the_wire=_replace(b"first\r\nsecond", b"first\rsecond")),
    Case("lone-lf-in-body", body=b"first\r\nsecond\r\nthird {m}\r\n",
         on_the_wire=_replace(b"first\r\nsecond", b"first\nsecond")),
    Case("dot-lines-simple", canonicalize=SIMPLE_SIMPLE,
         body=b".hidden {m}\r\n..two dots\r\n.\r\nmiddle\r\n. space\r\n.\r\n"),
    Case("dot-lines-relaxed", canonicalize=RELAXED_RELAXED, dkim_only=True,
         body=b"text {m}\r\n.\r\n..\r\n...\r\n.end\r\n"),
    Case("trailing-empty-lines-simple", canonicalize=SIMPLE_SIMPLE, body=BODY + b"\r\n\r\n\r\n"),
    Case("trailing-empty-lines-relaxed", canonicalize=RELAXED_RELAXED, dkim_only=True,
         body=BODY + b"  \r\n\t\r\n\r\n"),
    Case("no-final-newline", canonicalize=SIMPLE_SIMPLE, body=b"no newline at the end {m}"),
    Case("empty-body", canonicalize=SIMPLE_SIMPLE, body=b""),
    Case("header-order-date-first", canonicalize=SIMPLE_SIMPLE, dkim_only=True,
         headers=(b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{m}@sender.test>\r\n"
                  b"Subject: corpus {m}\r\nTo: alice@example.org\r\nFrom: sender@sender.test\r\n"),
         include_headers=(b"subject", b"from", b"message-id", b"date", b"to")),
    Case("lower-case-header-names", canonicalize=SIMPLE_SIMPLE,
         headers=HEADERS.lower()),
    Case("oversigned-from-and-subject", dkim_only=True,
         include_headers=(b"from", b"from", b"subject", b"subject", b"to", b"date", b"message-id")),
    Case("repeated-signed-headers", canonicalize=SIMPLE_SIMPLE,
         headers=_with(b"X-Seen: first\r\nX-Other: a\r\nX-Seen: second\r\n"),
         include_headers=(b"from", b"subject", b"x-seen", b"x-seen", b"x-other")),
    Case("colon-spacing-variants", canonicalize=SIMPLE_SIMPLE, dkim_only=True,
         headers=HEADERS.replace(b"Subject: ", b"Subject:").replace(b"Date: ", b"Date:\t")),
    Case("trailing-whitespace", canonicalize=SIMPLE_SIMPLE,
         headers=HEADERS.replace(b"Subject: corpus {m}", b"Subject: corpus {m}  \t"),
         body=b"trailing spaces {m}   \r\ntab\t\r\n"),
    Case("foreign-authentication-results", dkim_only=True,
         headers=_with(b"Authentication-Results: mx.lax.test; spf=pass smtp.mailfrom=lax.test\r\n")),
    Case("quoted-printable-soft-breaks", canonicalize=RELAXED_RELAXED,
         headers=_with(b"Content-Type: text/plain; charset=utf-8\r\n"
                       b"Content-Transfer-Encoding: quoted-printable\r\n"),
         body=b"caf=C3=A9 {m} and a very long line that is soft =\r\nbroken here =\r\nand here=\r\n\r\n"),
]

def normalised(message: bytes) -> bytes:
    """What a compliant forwarder transmits: every line end CRLF, a final CRLF."""
    message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def assert_forwarded_intact(world: TrustWorld, arrival: Arrival, sent: bytes) -> None:
    dkim = world.judge.dkim(arrival.content)
    original = [result for result, domain in dkim if domain == "sender.test"]
    assert original and all(r == "pass" for r in original), f"the original signature broke: {dkim}"
    assert ("pass", "fwd.test") in dkim, f"our signature is missing or fails: {dkim}"
    assert world.judge.arc(arrival.content) == "pass", "the ARC chain does not verify"
    assert SRS_SENDER.fullmatch(arrival.mail_from), f"envelope sender {arrival.mail_from!r} is not SRS"
    assert world.spf(arrival.mail_from) == "pass", "SPF fails for the SRS envelope sender"
    assert arrival.content.endswith(normalised(sent)), "the message was altered on the way"


def test_the_corpus_is_large_enough() -> None:
    assert len({case.id for case in CORPUS}) == len(CORPUS) >= 30


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_signed_mail_is_forwarded_with_every_signature_intact(world: TrustWorld, case: Case) -> None:
    marker = new_marker()
    signed = case.signed(world, marker)
    sent = case.on_the_wire(signed) if case.on_the_wire else signed
    # the corpus itself is valid: Mail::DKIM accepts what a compliant forwarder would pass on
    assert ("pass", "sender.test") in world.judge.dkim(normalised(sent)), "corpus bug: bad signature"
    outcome = world.send(LIST_BOUNCES if case.dkim_only else SENDER, sent, marker=marker,
                         mail_params=case.mail_params)
    assert outcome.final.code == 250, f"refused: {outcome.final}"
    assert_forwarded_intact(world, outcome.arrived, sent)
    if "SMTPUTF8" in case.mail_params:
        assert "SMTPUTF8" in [o.upper() for o in outcome.arrived.mail_options]


# --------------------------------------------------------------------------- envelope senders


UNFORWARDABLE = {
    "quoted-space": b'"john doe"@sender.test',
    "quoted-at": b'"a@b"@sender.test',
    "control-character": b"a\x01b@sender.test",
    "terminal-escape": b"a\x1b[31mb@sender.test",
    "delete-character": b"ab\x7f@sender.test",
    "two-at-signs": b"a@b@sender.test",
    "unquoted-space": b"a b@sender.test",
}


@pytest.mark.parametrize("name", list(UNFORWARDABLE))
def test_a_sender_srs_cannot_rewrite_is_refused_at_mail_from(world: TrustWorld, name: str) -> None:
    with world.client() as client:
        assert client.command("EHLO client.sender.test").code == 250
        reply = client.command(b"MAIL FROM:<" + UNFORWARDABLE[name] + b">")
        assert (reply.code, reply.status) in ((553, "5.1.7"), (501, "5.1.7")), \
            f"expected 553 5.1.7 (or 501 5.1.7), got {reply}"
        if reply.code == 553:
            expected = replies.UNFORWARDABLE_SENDER
            assert reply.text == f"{expected.status} {expected.text}"
    assert world.spooled() == []


def test_a_utf8_sender_without_smtputf8_is_refused(world: TrustWorld) -> None:
    with world.client() as client:
        assert client.command("EHLO client.sender.test").code == 250
        reply = client.command("MAIL FROM:<sénder@sender.test>".encode())
        expected = replies.SMTPUTF8_REQUIRED
        assert (reply.code, reply.text) == (expected.code, f"{expected.status} {expected.text}"), reply


def test_a_utf8_sender_with_smtputf8_is_delivered_or_refused_never_stuck(world: TrustWorld) -> None:
    marker = new_marker()
    content = (HEADERS + b"\r\n" + BODY).replace(b"{m}", marker.encode())
    outcome = world.send("sénder@sender.test", content, marker=marker, mail_params="SMTPUTF8")
    if outcome.mail.code != 250:
        assert 500 <= outcome.mail.code < 600, f"refused, but not permanently: {outcome.mail}"
    else:
        assert outcome.final.code == 250, f"accepted at MAIL FROM, then refused: {outcome.final}"
        arrival = outcome.arrived
        assert "SMTPUTF8" in [o.upper() for o in arrival.mail_options]
        assert SRS_SENDER.fullmatch(arrival.mail_from), arrival.mail_from
        assert world.spf(arrival.mail_from) == "pass"
    assert world.spooled() == [], "accepted, then stuck in the spool"


def test_after_all_this_nothing_sits_in_the_spool_and_nothing_crashed(world: TrustWorld) -> None:
    """Runs last: the destination accepts everything, so whatever was acknowledged was delivered."""
    marker = new_marker()
    content = (HEADERS + b"\r\n" + BODY).replace(b"{m}", marker.encode())
    assert world.send(SENDER, content, marker=marker).final.code == 250
    assert world.spooled() == []
    assert "Traceback" not in world.log_text()

