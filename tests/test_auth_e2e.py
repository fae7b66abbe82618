"""Authentication end to end: ``mailforward serve`` between a client and a sink, judged by Mail::DKIM.

The server resolves through a DNS server on loopback that publishes the
senders' SPF and DMARC records and our own DKIM/ARC key; Perl's Mail::DKIM,
a second implementation, verifies what arrives at the sink.
"""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest

from mailforward.auth.dkim import DkimKey, generate_key
from mailforward.config import DatabaseSettings
from mailforward.smtpd import replies

from conftest import seed_reference_data
from dns_server import LoopbackDNSServer
from mail_dkim import mail_dkim_verify, mail_dkim_verify_arc
from smtp_harness import HOSTNAME, ServeProcess, Sink, serve_zone

ZONES = """
ext.test.          300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.ext.test.   300 IN TXT "v=DMARC1; p=reject"
bank.test.         300 IN TXT "v=spf1 ip4:192.0.2.1 -all"
_dmarc.bank.test.  300 IN TXT "v=DMARC1; p=reject"
lax.test.          300 IN TXT "v=spf1 ip4:192.0.2.1 -all"
_dmarc.lax.test.   300 IN TXT "v=DMARC1; p=none"
upstream.test.     300 IN TXT "v=spf1 ip4:192.0.2.1 -all"
_dmarc.upstream.test. 300 IN TXT "v=DMARC1; p=reject"
"""


def message(from_header: str, extra: str = "") -> bytes:
    return (f"From: {from_header}\r\nTo: alice@example.org\r\nSubject: e2e\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <e2e@ext.test>\r\n"
            f"{extra}\r\nHello through the forwarder.\r\n").encode()


class World:
    def __init__(self, port: int, sink: Sink, dns: LoopbackDNSServer,
                 upstream: DkimKey, log: Path) -> None:
        self.port, self.sink, self.dns, self.upstream, self.log = port, sink, dns, upstream, log

    def send(self, mail_from: str, content: bytes) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.ext.test",
                          timeout=30) as client:
            return client.sendmail(mail_from, ["alice@example.org"], content)

    def arrived(self) -> bytes:
        (arrival,) = self.sink.arrivals
        return arrival.content


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    database = DatabaseSettings(url=f"sqlite:///{tmp_path / 'mf.db'}")  # lookups are not under test
    asyncio.run(seed_reference_data(database))
    key = generate_key("example.org", "fwd", tmp_path, bits=1024)
    upstream = generate_key("upstream.test", "arc", tmp_path, bits=1024)
    zone = ZONES + key.zone_lines() + "\n" + upstream.zone_lines() + "\n"
    with Sink() as sink, serve_zone(zone) as dns:
        config = tmp_path / "mf.toml"
        config.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:0"]
[database]
url = "{database.url}"
[delivery]
relay_host = "[127.0.0.1]:{sink.port}"
nameservers = ["{dns.nameserver}"]
spool_directory = "{tmp_path / 'spool'}"
[dkim]
keys = ["fwd._domainkey.example.org example.org:fwd:{key.path}"]
sign_forwarded_as = "example.org"
[arc]
domain = "example.org"
selector = "fwd"
""")
        with ServeProcess(config, tmp_path / "serve.log") as served:
            yield World(served.port, sink, dns, upstream, served.log)


def test_forwarded_mail_carries_a_dkim_signature_mail_dkim_accepts(world: World) -> None:
    assert world.send("sender@ext.test", message("Sender <sender@ext.test>")) == {}
    assert ("pass", "example.org") in mail_dkim_verify(world.arrived(), world.dns.port)


def test_forwarded_mail_carries_an_arc_chain_mail_dkim_accepts(world: World) -> None:
    world.send("sender@ext.test", message("Sender <sender@ext.test>"))
    assert mail_dkim_verify_arc(world.arrived(), world.dns.port) == "pass"


def sealed_upstream(world: World, content: bytes) -> bytes:
    """The message as an earlier forwarder (upstream.test) sealed it."""
    content = b"Authentication-Results: upstream.test; arc=none\r\n" + content
    seal = dkim.arc_sign(content, b"arc", b"upstream.test", world.upstream.private_pem,
                         b"upstream.test")
    return b"".join(h.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for h in seal) + content


def test_an_intact_arc_chain_is_continued(world: World) -> None:
    world.send("sender@ext.test", sealed_upstream(world, message("Sender <sender@ext.test>")))
    arrived = world.arrived()
    assert b"ARC-Seal: i=2; cv=pass" in arrived
    assert mail_dkim_verify_arc(arrived, world.dns.port) == "pass"


def test_a_broken_arc_chain_is_sealed_as_failed(world: World) -> None:
    sealed = sealed_upstream(world, message("Sender <sender@ext.test>"))
    world.send("sender@ext.test", sealed.replace(b"Hello", b"Tampered"))
    arrived = world.arrived()
    assert b"ARC-Seal: i=2; cv=fail" in arrived
    assert mail_dkim_verify_arc(arrived, world.dns.port) == "fail"


def test_failed_verifications_log_no_message_content(world: World) -> None:
    sealed = sealed_upstream(world, message("Sender <sender@ext.test>",
                                            extra="X-Marker: hdr-marker-7c1e\r\n"))
    world.send("sender@ext.test", sealed.replace(b"Hello", b"body-marker-7c1e"))
    log = world.log.read_text()
    assert "status=250" in log  # the transaction was logged, and nothing of its content
    assert "marker-7c1e" not in log and "Subject" not in log


def test_authentication_results_are_added_under_our_authserv_id(world: World) -> None:
    world.send("sender@ext.test", message("Sender <sender@ext.test>"))
    header = world.arrived().split(b"\r\n\r\n")[0]
    assert f"Authentication-Results: {HOSTNAME};".encode() in header
    assert b"spf=pass" in header and b"dmarc=pass" in header


def test_dmarc_reject_policy_is_enforced_at_data(world: World) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        world.send("ceo@bank.test", message("CEO <ceo@bank.test>"))
    expected = replies.dmarc_rejected("bank.test")
    assert (refused.value.smtp_code, refused.value.smtp_error.decode()) == (
        expected.code, f"{expected.status} {expected.text}")
    assert world.sink.arrivals == []


def test_dmarc_failure_with_p_none_is_forwarded_and_labelled(world: World) -> None:
    assert world.send("someone@lax.test", message("<someone@lax.test>")) == {}
    assert b"dmarc=fail" in world.arrived().split(b"\r\n\r\n")[0]


def test_forged_authentication_results_are_removed(world: World) -> None:
    forged = f"Authentication-Results: {HOSTNAME}; dmarc=pass header.from=bank.test\r\n"
    world.send("sender@ext.test", message("Sender <sender@ext.test>", extra=forged))
    assert b"header.from=bank.test" not in world.arrived()


def test_world_readable_key_stops_the_server_naming_the_file(tmp_path: Path) -> None:
    key = generate_key("example.org", "open", tmp_path, bits=1024)
    Path(key.path).chmod(0o644)
    config = tmp_path / "mf.toml"
    config.write_text(f'[dkim]\nkeys = ["open._domainkey.example.org example.org:open:{key.path}"]\n'
                      f'[delivery]\nspool_directory = "{tmp_path / "spool"}"\n')
    result = subprocess.run([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert key.path in result.stderr


def test_forged_results_with_a_trailing_dot_in_our_id_are_removed(world: World) -> None:
    forged = f"Authentication-Results: {HOSTNAME.upper()}.; dmarc=pass header.from=bank.test\r\n"
    world.send("sender@ext.test", message("Sender <sender@ext.test>", extra=forged))
    assert b"header.from=bank.test" not in world.arrived()


def signed_by_upstream(world: World, content: bytes) -> bytes:
    """Signed by upstream.test (p=reject, SPF authorises 192.0.2.1 only, not us)."""
    signature: bytes = dkim.sign(content, b"arc", b"upstream.test", world.upstream.private_pem)
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + content


def test_signed_mail_with_an_obsolete_header_is_forwarded_signed_and_sealed(
        world: World) -> None:
    signed = signed_by_upstream(world, message("Boss <boss@upstream.test>"))
    received = signed.replace(b"Subject: e2e\r\n", b"Subject: e2e\r\nX-Spaces  :   value\r\n")
    assert world.send("boss@upstream.test", received) == {}
    arrived = world.arrived()
    assert arrived.endswith(received)
    assert sorted(mail_dkim_verify(arrived, world.dns.port)) == [("pass", "example.org"),
                                                                   ("pass", "upstream.test")]
    assert mail_dkim_verify_arc(arrived, world.dns.port) == "pass"
