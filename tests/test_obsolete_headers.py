"""Obsolete header syntax (RFC 5322 4.5.3: ``Name  :  value``) is verified, signed and sealed.

dkimpy's parser refuses white space before a header colon; Perl's
Mail::DKIM, the independent judge here, accepts it.  Messages are signed by
dkimpy and, for signatures that cover the obsolete field itself, by
Mail::DKIM::Signer, with keys published on a loopback DNS server.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass

import dkim  # type: ignore[import-untyped]
import pytest

from mailforward.auth.arc import ArcSealer
from mailforward.auth.dkim import DkimKey, DkimSigner, generate_key, load_dkim
from mailforward.auth.pipeline import MessageAuthenticator
from mailforward.auth.verify import AuthVerdict, DkimVerdict, Verifier
from mailforward.config import DkimSettings
from mailforward.headerfields import dkimpy_view

from dns_server import LoopbackDNSServer
from mail_dkim import mail_dkim_verify, mail_dkim_verify_arc

AUTHSERV_ID = "mx.fwd.test"
SENDER_IP = "192.0.2.1"  # authorised by sender.test's SPF
STRANGER = "192.0.2.66"  # a forwarder upstream of us: SPF fails, DKIM must carry DMARC
TIMEOUT = 2.0
OBSOLETE = b"X-Spaces  :   value\r\n"

PLAIN = (b"From: Sender <a@sender.test>\r\n"
         b"To: b@example.org\r\n"
         b"Subject: hi\r\n"
         b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
         b"Message-ID: <obsolete@sender.test>\r\n"
         b"\r\n"
         b"Hello.\r\n")

_PERL_SIGNER = r"""
use strict;
use warnings;
use Mail::DKIM::Signer;
my ($keyfile, $domain, $selector, $method, $headers) = @ARGV;
my $signer = Mail::DKIM::Signer->new(Algorithm => "rsa-sha256", Method => $method,
    Domain => $domain, Selector => $selector, KeyFile => $keyfile, Headers => $headers);
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\015\012/; $signer->PRINT($line); }
$signer->CLOSE;
print $signer->signature->as_string;
"""


@dataclass(frozen=True)
class World:
    sender: DkimKey  # signs as sender.test (p=reject)
    forwarder: DkimKey  # our sign_forwarded_as and ARC key
    nameserver: str
    port: int


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, DkimKey]:
    """(sender.test's key, our forwarding key)."""
    directory = tmp_path_factory.mktemp("keys")
    (directory / "fwd").mkdir()
    return (generate_key("sender.test", "s1", directory, bits=1024),
            generate_key("fwd.test", "f1", directory / "fwd", bits=1024))


@pytest.fixture(scope="module")
def dns_zone(keys: tuple[DkimKey, DkimKey]) -> str:
    """Served on loopback by the ``loopback_dns`` fixture."""
    sender, forwarder = keys
    return (f'sender.test. 300 IN TXT "v=spf1 ip4:{SENDER_IP} -all"\n'
            '_dmarc.sender.test. 300 IN TXT "v=DMARC1; p=reject"\n'
            f"{sender.zone_lines()}\n{forwarder.zone_lines()}\n")


@pytest.fixture(scope="module")
def world(keys: tuple[DkimKey, DkimKey], loopback_dns: LoopbackDNSServer) -> World:
    return World(*keys, loopback_dns.nameserver, loopback_dns.port)


def with_field(message: bytes, field: bytes = OBSOLETE) -> bytes:
    """``message`` with ``field`` inserted after its Subject."""
    return message.replace(b"Subject: hi\r\n", b"Subject: hi\r\n" + field, 1)


def dkimpy_signed(world: World, message: bytes) -> bytes:
    """Signed by sender.test with dkimpy (relaxed/simple), before the obsolete field exists."""
    signature: bytes = dkim.sign(message, b"s1", b"sender.test", world.sender.private_pem)
    return signature + message


def mail_dkim_signed(world: World, message: bytes, method: str, headers: str) -> bytes:
    """Signed by sender.test with Perl's Mail::DKIM::Signer, over the bytes as they are."""
    if shutil.which("perl") is None:
        pytest.fail("perl is not installed (apt-get install perl libmail-dkim-perl)")
    done = subprocess.run(["perl", "-e", _PERL_SIGNER, world.sender.path, "sender.test", "s1",
                           method, headers], input=message, capture_output=True, timeout=30,
                          check=True)
    return done.stdout.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n") \
        + b"\r\n" + message


def verify(world: World, message: bytes, ip: str = STRANGER) -> AuthVerdict:
    verifier = Verifier(AUTHSERV_ID, [world.nameserver], TIMEOUT)
    return asyncio.run(verifier.verify(message, ip, "helo.test", "a@sender.test"))


def forwarder_config(world: World, canonicalization: str = "relaxed/simple") -> DkimSigner:
    key = world.forwarder
    config = load_dkim(DkimSettings(keys=(f"{key.name} {key.domain}:{key.selector}:{key.path}",),
                                    sign_forwarded_as=key.domain,
                                    canonicalization=canonicalization))
    assert config is not None
    return DkimSigner(config)


def forwarded(world: World, message: bytes, canonicalization: str = "relaxed/simple") -> bytes:
    """What we send: verified, labelled, signed and sealed, as the pipeline does it."""
    auth = MessageAuthenticator(Verifier(AUTHSERV_ID, [world.nameserver], TIMEOUT),
                                forwarder_config(world, canonicalization),
                                ArcSealer(world.forwarder, AUTHSERV_ID), authserv_id=AUTHSERV_ID)

    async def run() -> bytes:
        labelled = await auth.inbound(message, STRANGER, "helo.test", "a@sender.test")
        return await auth.outbound(labelled, STRANGER)

    return asyncio.run(run())


# --- the copy dkimpy parses


def test_dkimpy_view_removes_white_space_before_the_colon() -> None:
    assert dkimpy_view(with_field(PLAIN)) == with_field(PLAIN, b"X-Spaces:   value\r\n")


def test_dkimpy_view_is_the_message_itself_when_nothing_is_obsolete() -> None:
    assert dkimpy_view(PLAIN) is PLAIN


def test_dkimpy_view_leaves_folded_lines_and_the_body_alone() -> None:
    message = b"Subject: a\r\n  x  : folded\r\n\r\nBody  : not a header\r\n"
    assert dkimpy_view(message) is message


# --- verification


def test_signature_beside_an_obsolete_field_passes(world: World) -> None:
    message = with_field(dkimpy_signed(world, PLAIN))
    assert verify(world, message).dkim == (DkimVerdict("pass", "sender.test", "s1"),)


@pytest.mark.parametrize("method", ["relaxed", "simple"])
def test_signature_covering_an_obsolete_field_passes(world: World, method: str) -> None:
    message = mail_dkim_signed(world, with_field(PLAIN), method, "from:x-spaces:subject")
    assert mail_dkim_verify(message, world.port) == [("pass", "sender.test")]
    assert verify(world, message).dkim == (DkimVerdict("pass", "sender.test", "s1"),)


def test_obsolete_field_does_not_make_dmarc_fail(world: World) -> None:
    verdict = verify(world, with_field(dkimpy_signed(world, PLAIN)))
    assert (verdict.dmarc, verdict.dmarc_rejects) == ("pass", False)


def test_arc_is_none_for_an_obsolete_field_without_an_arc_set(world: World) -> None:
    assert verify(world, with_field(PLAIN)).arc == "none"


# --- what dkimpy still cannot read


GARBAGE_FIELD = b"this line is no header field\r\n"


def test_unreadable_message_without_an_arc_set_is_arc_none(world: World) -> None:
    assert verify(world, with_field(PLAIN, GARBAGE_FIELD)).arc == "none"


def test_unreadable_message_signatures_are_permerror(world: World) -> None:
    message = with_field(dkimpy_signed(world, PLAIN), GARBAGE_FIELD)
    assert verify(world, message).dkim == (DkimVerdict("permerror", "sender.test", "s1"),)


def test_unreadable_message_from_an_authorised_client_passes_dmarc_by_spf(world: World) -> None:
    verdict = verify(world, with_field(dkimpy_signed(world, PLAIN), GARBAGE_FIELD), SENDER_IP)
    assert verdict.dmarc == "pass"


def test_unreadable_message_cannot_get_around_p_reject(world: World) -> None:
    verdict = verify(world, with_field(dkimpy_signed(world, PLAIN), GARBAGE_FIELD))
    assert verdict.dmarc_rejects


# --- signing and sealing


OBSOLETE_SUBJECT = PLAIN.replace(b"Subject: hi", b"Subject   :  hi")  # a field we sign


@pytest.mark.parametrize("canonicalization", ["relaxed/simple", "simple/simple"])
def test_our_signature_over_an_obsolete_field_verifies_with_mail_dkim(
        world: World, canonicalization: str) -> None:
    signer = forwarder_config(world, canonicalization)
    signed = signer.signature_headers(OBSOLETE_SUBJECT, STRANGER) + OBSOLETE_SUBJECT
    assert signer.signing_failures == 0
    assert mail_dkim_verify(signed, world.port) == [("pass", "fwd.test")]


def test_our_seal_over_an_obsolete_field_verifies_with_mail_dkim(world: World) -> None:
    message = b"Authentication-Results: mx.fwd.test; arc=none\r\n" + OBSOLETE_SUBJECT
    sealer = ArcSealer(world.forwarder, AUTHSERV_ID)
    sealed = sealer.seal(message) + message
    assert sealer.sealing_failures == 0
    assert mail_dkim_verify_arc(sealed, world.port) == "pass"


def test_forwarded_bytes_are_the_received_bytes_with_our_fields_on_top(world: World) -> None:
    received = with_field(dkimpy_signed(world, PLAIN))
    assert forwarded(world, received).endswith(received)


def test_forwarded_message_keeps_the_original_and_our_signature_valid(world: World) -> None:
    sent = forwarded(world, with_field(dkimpy_signed(world, PLAIN)))
    assert sorted(mail_dkim_verify(sent, world.port)) == [("pass", "fwd.test"),
                                                            ("pass", "sender.test")]


def test_forwarded_message_carries_an_arc_chain_mail_dkim_accepts(world: World) -> None:
    sent = forwarded(world, with_field(dkimpy_signed(world, PLAIN)))
    assert b"arc=none" in sent.split(b"\r\n\r\n")[0]
    assert mail_dkim_verify_arc(sent, world.port) == "pass"
