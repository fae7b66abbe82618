"""The world of issue 11 ("Trust"): a running ``mailforward serve`` judged as a destination would.

One module-scoped fixture, :func:`world`, gives a test module:

* a loopback DNS server with the senders' SPF/DKIM/DMARC records and our
  own (``fwd.test`` signing and ARC key, ``srs.fwd.test`` SPF);
* a sink (``smtp_harness.Sink``) that keeps the exact bytes it was sent, lines
  of any length (up to 1 MiB);
* ``mailforward serve`` as a subprocess, its log in a file, its spool in a
  directory the tests can look into;
* a raw SMTP client that can connect as an outsider (127.0.0.1) or as a
  ``mynetworks`` client (source address 127.0.0.2);
* Perl's Mail::DKIM as the destination's judge, kept running for the whole
  module (one process, one request per message), plus SPF and a DMARC
  alignment computation of our own (:meth:`TrustWorld.aligned_pass`).

Import the fixture into a test module with ``from trust_world import world``.
"""

from __future__ import annotations

import asyncio
import email.header
import re
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from mailforward.admin import Admin
from mailforward.auth.dkim import DkimKey, generate_key
from mailforward.config import DatabaseSettings
from mailforward.srs import generate_secret_file
from mailforward.tables import open_admin_database

from dns_server import LoopbackDNSServer
from smtp_harness import Arrival, ServeProcess, Sink, serve_zone

HOSTNAME = "mail.example.com"
UNTRUSTED_IP = "127.0.0.1"
TRUSTED_IP = "127.0.0.2"  # in [server] mynetworks
SRS_DOMAIN = "srs.fwd.test"
SIGNING_DOMAIN = "fwd.test"  # sign_forwarded_as and the ARC domain
HOSTED_DOMAIN = "example.org"
ALIAS = "alice@example.org"
ALIAS_TARGET = "alice@dest.test"
OUR_DOMAINS = (HOSTED_DOMAIN, SRS_DOMAIN, SIGNING_DOMAIN)

SPF_LOOPBACK = '"v=spf1 ip4:127.0.0.0/8 -all"'
ZONE = f"""
sender.test.           300 IN TXT {SPF_LOOPBACK}
_dmarc.sender.test.    300 IN TXT "v=DMARC1; p=reject"
lax.test.              300 IN TXT {SPF_LOOPBACK}
_dmarc.lax.test.       300 IN TXT "v=DMARC1; p=none"
nopolicy.test.         300 IN TXT {SPF_LOOPBACK}
attacker.test.         300 IN TXT {SPF_LOOPBACK}
_dmarc.example.org.    300 IN TXT "v=DMARC1; p=none"
fwd.test.              300 IN TXT {SPF_LOOPBACK}
srs.fwd.test.          300 IN TXT {SPF_LOOPBACK}
"""

# --------------------------------------------------------------------------- the judge

_JUDGE_SCRIPT = r"""
use strict;
use warnings;
use Net::DNS::Resolver;
use Mail::DKIM::Verifier;
use Mail::DKIM::ARC::Verifier;
my $port = shift @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 1, defnames => 0,
    dnsrch => 0, searchlist => [], retry => 1, udp_timeout => 5, tcp_timeout => 5));
binmode STDIN;
binmode STDOUT;
$| = 1;
while (my $request = <STDIN>) {
    chomp $request;
    my ($kind, $length) = split / /, $request;
    my $data = '';
    while (length($data) < $length) {
        my $n = read(STDIN, $data, $length - length($data), length($data));
        die "short read" unless $n;
    }
    my $ok = eval {
        my $verifier = $kind eq 'ARC' ? Mail::DKIM::ARC::Verifier->new()
                                      : Mail::DKIM::Verifier->new();
        # as tests/mail_dkim.py feeds it: line by line, each line ending CRLF
        foreach my $line (split /(?<=\n)/, $data) {
            $line =~ s/\r?\n\z/\015\012/;
            $verifier->PRINT($line);
        }
        $verifier->CLOSE;
        if ($kind eq 'ARC') {
            print $verifier->result, "\n";
        } else {
            my @signatures = $verifier->signatures;
            print "none\t\n" unless @signatures;
            foreach my $signature (@signatures) {
                print $signature->result, "\t", ($signature->domain // ""), "\n";
            }
        }
        1;
    };
    unless ($ok) {
        my $error = $@ // 'unknown';
        $error =~ s/\s+/ /g;
        print "error\t$error\n";
    }
    print "END\n";
}
"""


class MailDkimJudge:
    """Perl Mail::DKIM, kept running: the same verdicts as ``tests/mail_dkim.py``, without a
    process per message.  Its resolver asks the loopback DNS server only."""

    def __init__(self, dns_port: int, stderr: Path) -> None:
        if shutil.which("perl") is None:
            pytest.fail("perl is not installed (apt-get install perl libmail-dkim-perl)")
        self._stderr_path = stderr
        with stderr.open("wb") as errors:  # a file, not a pipe: perl's warnings never block it
            self._proc = subprocess.Popen(["perl", "-e", _JUDGE_SCRIPT, str(dns_port)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        self._lock = threading.Lock()

    def _ask(self, kind: str, message: bytes) -> list[str]:
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        with self._lock:
            try:
                stdin.write(f"{kind} {len(message)}\n".encode() + message)
                stdin.flush()
                lines = []
                while (line := stdout.readline()) != b"END\n":
                    if not line:
                        raise BrokenPipeError
                    lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            except BrokenPipeError:
                stderr = self._stderr_path.read_text(errors="replace")
                pytest.fail(f"perl Mail::DKIM judge died (apt-get install libmail-dkim-perl): {stderr}")
        if lines and lines[0].startswith("error\t"):
            pytest.fail(f"Mail::DKIM died on a message: {lines[0]}")
        return lines

    def dkim(self, message: bytes) -> list[tuple[str, str]]:
        """[(result, domain)] per DKIM-Signature; [("none", "")] when there is none."""
        return [(r, d.lower()) for r, _, d in (line.partition("\t") for line in self._ask("DKIM", message))]

    def arc(self, message: bytes) -> str:
        """The ARC chain's result: "pass", "fail" or "none"."""
        return self._ask("ARC", message)[0].strip()

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


# --------------------------------------------------------------------------- SMTP client


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the last line after the code and separator: "5.7.1 Message rejected: ..."
    lines: tuple[bytes, ...]  # every line as received, CRLF removed

    @property
    def status(self) -> str:
        """The enhanced status code, "" when the reply has none."""
        first = self.text.split(" ", 1)[0]
        return first if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", first) else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


CLOSED = Reply(0, "(connection closed)", ())


class Client:
    """SMTP spoken by hand over a socket: bytes in, every reply line kept."""

    def __init__(self, port: int, *, trusted: bool = False, timeout: float = 30) -> None:
        source = TRUSTED_IP if trusted else UNTRUSTED_IP
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.file: IO[bytes] = self.sock.makefile("rb")
        self.banner = self.read_reply()

    def read_reply(self) -> Reply:
        lines: list[bytes] = []
        while True:
            try:
                raw = self.file.readline()
            except (TimeoutError, ConnectionError):
                raw = b""
            if not raw:
                return Reply(0, "(connection closed)", tuple(lines)) if not lines else \
                    Reply(_code(lines[-1]), _text(lines[-1]), tuple(lines))
            line = raw.rstrip(b"\r\n")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return Reply(_code(line), _text(line), tuple(lines))

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up; the next read says so

    def command(self, line: bytes | str) -> Reply:
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.read_reply()

    def data(self, content: bytes) -> Reply:
        """DATA, then the content dot-stuffed (as smtplib does) and ``<CRLF>.<CRLF>``."""
        reply = self.command("DATA")
        if reply.code != 354:
            return reply
        stuffed = re.sub(rb"(?m)^\.", b"..", content)
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.send(stuffed + b".\r\n")
        return self.read_reply()

    def close(self) -> None:
        try:
            self.send(b"QUIT\r\n")
        finally:
            self.file.close()
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _code(line: bytes) -> int:
    return int(line[:3]) if line[:3].isdigit() else -1


def _text(line: bytes) -> str:
    return line[4:].decode("utf-8", "replace")


@dataclass
class Outcome:
    """One transaction: the replies it got and what reached the sink."""

    mail: Reply
    rcpts: list[Reply] = field(default_factory=list)
    data: Reply | None = None
    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def final(self) -> Reply:
        """The reply that decided the transaction."""
        if self.data is not None:
            return self.data
        refused = [r for r in self.rcpts if r.code != 250]
        return refused[0] if refused else self.mail

    @property
    def arrived(self) -> Arrival:
        assert len(self.arrivals) == 1, f"expected one message at the sink, got {len(self.arrivals)}"
        return self.arrivals[0]


# --------------------------------------------------------------------------- the world


def org_domain(domain: str) -> str:
    """Organizational domain for this world's names (no multi-label public suffixes here)."""
    return ".".join(domain.lower().rstrip(".").split(".")[-2:])


def is_ours(domain: str) -> bool:
    return any(org_domain(domain) == org_domain(ours) for ours in OUR_DOMAINS)


def new_marker() -> str:
    return uuid.uuid4().hex


class TrustWorld:
    def __init__(self, port: int, sink: Sink, dns: LoopbackDNSServer,
                 judge: MailDkimJudge, keys: dict[str, DkimKey], log: Path, spool: Path,
                 proc: subprocess.Popen[bytes]) -> None:
        self.port, self.sink, self.dns, self.judge = port, sink, dns, judge
        self.keys, self.log, self.spool, self.proc = keys, log, spool, proc

    # --- talking to the server

    def client(self, *, trusted: bool = False) -> Client:
        return Client(self.port, trusted=trusted)

    def send(self, mail_from: str, content: bytes, *, marker: str, trusted: bool = False,
             rcpts: Sequence[str] = (ALIAS,), mail_params: str = "",
             helo: str = "client.sender.test") -> Outcome:
        """One transaction over a fresh connection; ``marker`` (in the content) finds its arrivals."""
        with self.client(trusted=trusted) as client:
            assert client.banner.code == 220, client.banner
            assert client.command(f"EHLO {helo}").code == 250
            params = f" {mail_params}" if mail_params else ""
            outcome = Outcome(client.command(f"MAIL FROM:<{mail_from}>{params}".encode()))
            if outcome.mail.code != 250:
                return outcome
            outcome.rcpts = [client.command(f"RCPT TO:<{rcpt}>".encode()) for rcpt in rcpts]
            if not any(r.code == 250 for r in outcome.rcpts):
                return outcome
            outcome.data = client.data(content)
        outcome.arrivals = self.arrivals(marker, expect=outcome.data.code == 250)
        return outcome

    def arrivals(self, marker: str | bytes, *, expect: bool = True, timeout: float = 5) -> list[Arrival]:
        """Messages at the sink containing ``marker``; waits for one when ``expect``.

        Delivery is pass-through (the 250 comes after the sink's), so the
        wait only matters when something went wrong.
        """
        needle = marker.encode() if isinstance(marker, str) else marker

        def found(arrivals: list[Arrival]) -> list[Arrival]:
            return [a for a in arrivals if needle in a.content]

        return self.sink.wait_for(found, timeout if expect else 0)

    # --- the destination's view

    def spf(self, mail_from: str, ip: str = UNTRUSTED_IP) -> str:
        """SPF at the destination for our forwarding host's IP (loopback DNS only)."""
        from mailforward.auth.verify import check_spf  # imported late: the module is being reworked

        return check_spf(ip, mail_from, HOSTNAME, nameservers=[self.dns.nameserver], timeout=5).result

    def aligned_pass(self, arrival: Arrival, from_domain: str,
                     dkim: list[tuple[str, str]] | None = None) -> list[str]:
        """Why DMARC for ``from_domain`` would pass at the destination ([] when it would not).

        Relaxed alignment (RFC 7489 3.1): a passing DKIM signature, or an SPF
        pass for the envelope sender, in the same organizational domain.
        """
        reasons = []
        for result, domain in dkim if dkim is not None else self.judge.dkim(arrival.content):
            if result == "pass" and org_domain(domain) == org_domain(from_domain):
                reasons.append(f"dkim pass d={domain}")
        envelope_domain = arrival.mail_from.rpartition("@")[2]
        if envelope_domain and org_domain(envelope_domain) == org_domain(from_domain):
            if self.spf(arrival.mail_from) == "pass":
                reasons.append(f"spf pass {arrival.mail_from}")
        return reasons

    # --- the server's own state

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def spooled(self) -> list[Path]:
        """Messages sitting in the spool (lock and temp files are not messages)."""
        return sorted(p for p in self.spool.rglob("*") if p.is_file() and not p.name.startswith("."))


def header_section(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0]


def from_domains(content: bytes) -> set[str]:
    """Every domain a destination could take as the From domain: each address in each From
    field (obsolete ``From :`` spelling too), raw and after decoding encoded-words."""
    unfolded = re.sub(rb"\r\n[ \t]", b" ", header_section(content))
    domains: set[str] = set()
    for line in unfolded.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or name.strip().lower() != b"from":
            continue
        text = value.decode("utf-8", "replace")
        try:
            decoded = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:  # undecodable encoded-words: the raw text is enough
            decoded = text
        for candidate in (text, decoded):
            for match in re.finditer(r"@([A-Za-z0-9.-]+)", candidate):
                domain = match.group(1).strip(".").lower()
                if "." in domain:
                    domains.add(domain)
    return domains


# --------------------------------------------------------------------------- start-up


async def _seed(database: DatabaseSettings) -> None:
    db = await open_admin_database(database)
    try:
        admin = Admin(db)
        await admin.init_schema()
        await admin.add_domain(HOSTED_DOMAIN)
        await admin.add_alias(ALIAS, ALIAS_TARGET)
    finally:
        await db.close()


def _key(directory: Path, domain: str, selector: str) -> DkimKey:
    directory.mkdir(parents=True, exist_ok=True)
    return generate_key(domain, selector, directory, bits=1024)


def start_world(base: Path, server_options: str = "") -> Iterator[TrustWorld]:
    """Generator behind the fixtures: builds the world in ``base``, tears it down after."""
    keys = {
        "fwd.test": _key(base / "keys" / "fwd", "fwd.test", "fwd"),
        "sender.test": _key(base / "keys" / "sender", "sender.test", "s1"),
        "example.org": _key(base / "keys" / "example", "example.org", "s1"),
        "attacker.test": _key(base / "keys" / "attacker", "attacker.test", "s1"),
    }
    zone = ZONE + "\n".join(key.zone_lines() for key in keys.values()) + "\n"
    database = DatabaseSettings(url=f"sqlite:///{base / 'mf.db'}")
    asyncio.run(_seed(database))
    generate_secret_file(base / "srs.secret")
    with ExitStack() as stack:
        sink = stack.enter_context(Sink(line_length_limit=1 << 20))  # we judge what we send,
        dns = stack.enter_context(serve_zone(zone))                  # not RFC 5321's 1000
        judge = MailDkimJudge(dns.port, base / "mail-dkim.stderr")
        stack.callback(judge.close)
        config = _write_config(base, server_options, database, sink.port, dns.nameserver, keys)
        try:
            served = stack.enter_context(ServeProcess(config, base / "serve.log"))
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"mailforward serve did not start: {e}")
        yield TrustWorld(served.port, sink, dns, judge, keys, served.log, base / "spool", served.proc)


def _write_config(base: Path, server_options: str, database: DatabaseSettings, sink_port: int,
                  nameserver: str, keys: dict[str, DkimKey]) -> Path:
    config = base / "mf.toml"
    config.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:0"]
mynetworks = ["{TRUSTED_IP}/32"]
client_connection_count_limit = 1000
client_connection_rate_limit = 1000000
{server_options}
[database]
url = "{database.url}"
[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
nameservers = ["{nameserver}"]
spool_directory = "{base / 'spool'}"
retry_first = 3600
[srs]
domain = "{SRS_DOMAIN}"
secret_file = "{base / 'srs.secret'}"
[dkim]
keys = ["fwd._domainkey.fwd.test fwd.test:fwd:{keys['fwd.test'].path}"]
sign_forwarded_as = "{SIGNING_DOMAIN}"
[arc]
domain = "{SIGNING_DOMAIN}"
selector = "fwd"
[auth]
verify = true
""")
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustWorld]:
    """One running server (and its DNS, sink and judge) for the whole test module."""
    yield from start_world(tmp_path_factory.mktemp("trust"))


def sign(message: bytes, key: DkimKey, *, canonicalize: tuple[bytes, bytes] = (b"relaxed", b"simple"),
         include_headers: Sequence[bytes] | None = None, length: bool = False) -> bytes:
    """``message`` with a DKIM-Signature by ``key`` (dkimpy) prepended."""
    import dkim  # type: ignore[import-untyped]

    signature = dkim.sign(message, key.selector.encode(), key.domain.encode(), key.private_pem,
                          canonicalize=canonicalize,
                          include_headers=list(include_headers) if include_headers else None,
                          length=length)
    return bytes(signature) + message


__all__ = ["ALIAS", "Arrival", "CLOSED", "Client", "HOSTNAME", "Outcome", "Reply", "TrustWorld",
           "from_domains", "header_section", "is_ours", "new_marker", "org_domain", "sign",
           "start_world", "world"]
