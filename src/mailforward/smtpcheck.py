"""``mailforward check --smtp``: the seed's checklist items only a running server can prove.

The probe talks to the server from outside, like any stranger on the
Internet, and checks: SRS rewrite visible in what arrives, no local
delivery, external spoofing rejected, no open relay, VRFY disabled.

Only one message is ever sent (the SRS item), and it goes to a sink this
command starts itself on loopback; the server under test must deliver there
(for example ``[delivery] relay_host = "[127.0.0.1]:PORT"`` on a staging
instance, see docs/checklist.md).  Every other item stops at RCPT or VRFY
and resets, so the probe cannot make the server send mail anywhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

from .dnstools import CheckResult
from .errors import ConfigError
from .hostport import parse_host_port
from .reply import Reply as ServerReply
from .smtpd import replies
from .smtpd.engine import EngineSettings, SmtpConnection, Wire
from .smtpd.session import ClientSession, Transaction

PROBE_DOMAIN = "mailforward-check.invalid"  # RFC 2606: never a real destination
DEFAULT_SENDER = f"checker@{PROBE_DOMAIN}"
EXTERNAL = f"relaytest@{PROBE_DOMAIN}"
MYNETWORKS_HINT = "(if this client is in the server's [server] mynetworks, run the check from elsewhere)"
_SRS_ADDRESS = re.compile(r"srs[01][=+-]", re.IGNORECASE)


@dataclass(frozen=True)
class SmtpProbe:
    """Where to probe and with what: ``recipient`` is an active alias of the hosted ``domain``."""

    host: str
    port: int
    recipient: str
    domain: str
    sink: tuple[str, int] | None = None
    srs_domain: str = ""
    sender: str = DEFAULT_SENDER
    helo: str = PROBE_DOMAIN
    timeout: float = 10.0


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ProbeError(Exception):
    """The server could not be talked to: every item that needed it fails with this reason."""


def relay_tricks(domain: str) -> list[str]:
    """Classic ways to smuggle an outside recipient through a hosted domain (RFC 2505, RFC 3974)."""
    local, external = EXTERNAL.split("@")
    return [EXTERNAL,
            f"{local}%{external}@{domain}",
            f"{external}!{local}@{domain}",
            f'"{EXTERNAL}"@{domain}',
            f"{EXTERNAL}@{domain}",
            f"@{domain}:{EXTERNAL}"]


# ---------------------------------------------------------------- talking SMTP


class Session:
    """One SMTP connection, always left with QUIT; commands sent verbatim (no smtplib quoting)."""

    def __init__(self, probe: SmtpProbe) -> None:
        try:
            self.smtp = smtplib.SMTP(probe.host, probe.port, local_hostname=probe.helo,
                                     timeout=probe.timeout)
            code, text = self.smtp.ehlo()
        except (OSError, smtplib.SMTPException) as e:
            raise ProbeError(f"cannot talk to {probe.host}:{probe.port}: {e}") from None
        if code != 250:
            self.close()
            raise ProbeError(f"EHLO refused: {code} {text.decode(errors='replace')}")

    def command(self, verb: str, argument: str = "") -> Reply:
        try:
            code, text = self.smtp.docmd(verb, argument)
        except (OSError, smtplib.SMTPException) as e:
            raise ProbeError(f"connection lost after {verb}: {e}") from None
        return Reply(code, text.decode("utf-8", "replace").replace("\n", " "))

    def envelope(self, sender: str, recipient: str) -> Reply:
        """RSET, MAIL, RCPT: the first refusal, or the RCPT reply."""
        self.command("RSET")
        reply = self.command("MAIL", f"FROM:<{sender}>")
        if reply.code != 250:
            return reply
        return self.command("RCPT", f"TO:<{recipient}>")

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            self.smtp.close()


def in_session(probe: SmtpProbe, item: str, check: Callable[[Session], CheckResult]) -> CheckResult:
    """Run one item on its own connection, so one item's errors never count against the next."""
    try:
        session = Session(probe)
        try:
            return check(session)
        finally:
            session.close()
    except ProbeError as e:
        return CheckResult(item, False, str(e))


def refused(reply: Reply, what: str) -> str:
    """"" when the reply is a permanent refusal; otherwise what went wrong."""
    if reply.code >= 500:
        return ""
    if 400 <= reply.code < 500:
        return f"{what}: only a temporary refusal ({reply}); it must be permanent (5xx)"
    return f"{what} was accepted ({reply})"


# ---------------------------------------------------------------- items


def check_recipient(session: Session, probe: SmtpProbe) -> CheckResult:
    """The baseline: without it, the refusals below could be "user unknown", proving nothing."""
    reply = session.envelope(probe.sender, probe.recipient)
    if reply.code != 250:
        return CheckResult("recipient", False, f"RCPT TO:<{probe.recipient}> from an outside sender "
                                               f"was refused ({reply}); give --to an active alias")
    return CheckResult("recipient", True, f"<{probe.recipient}> is accepted from outside")


def check_local_delivery(session: Session, probe: SmtpProbe, hostname: str) -> CheckResult:
    """The seed's "no local delivery": mailboxes of the host itself must not exist."""
    for recipient in (f"root@{hostname}", "postmaster"):
        problem = refused(session.envelope(probe.sender, recipient), f"RCPT TO:<{recipient}>")
        if problem:
            return CheckResult("no local delivery", False, f"{problem} {MYNETWORKS_HINT}")
    return CheckResult("no local delivery", True, f"root@{hostname} and <postmaster> are refused")


def check_spoofing(session: Session, probe: SmtpProbe) -> CheckResult:
    """An outsider using one of our hosted domains as MAIL FROM must be refused."""
    forged = f"postmaster@{probe.domain}"
    problem = refused(session.envelope(forged, probe.recipient),
                      f"MAIL FROM:<{forged}> to <{probe.recipient}> from outside")
    if problem:
        return CheckResult("spoofing rejected", False, f"{problem} {MYNETWORKS_HINT}")
    return CheckResult("spoofing rejected", True, f"MAIL FROM:<{forged}> from outside is refused")


def check_open_relay(session: Session, probe: SmtpProbe) -> CheckResult:
    for recipient in relay_tricks(probe.domain):
        problem = refused(session.envelope(probe.sender, recipient), f"RCPT TO:<{recipient}>")
        if problem:
            return CheckResult("no open relay", False, f"{problem} {MYNETWORKS_HINT}")
    return CheckResult("no open relay", True,
                       f"all {len(relay_tricks(probe.domain))} relay tricks are refused")


def check_vrfy(session: Session, probe: SmtpProbe) -> CheckResult:
    """VRFY lets spammers harvest aliases; 252 without naming the address is harmless (RFC 5321 3.5.3)."""
    reply = session.command("VRFY", probe.recipient)
    if reply.code in (250, 251) or (reply.code == 252 and "@" in reply.text):
        return CheckResult("VRFY disabled", False, f"VRFY {probe.recipient} answered {reply}; "
                                                   "it must not confirm addresses")
    return CheckResult("VRFY disabled", True, f"VRFY answers {reply}")


# ---------------------------------------------------------------- the sink


class Sink:
    """A loopback SMTP sink on our own engine: accepts anything, records (sender, content).

    It runs its own event loop in a thread because the probe is a plain
    blocking client.  The lock because the probe reads from that other thread.
    """

    ACCEPTED = ServerReply(250, "2.0.0", "Ok: received by mailforward check")

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.envelopes: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.settings = EngineSettings("mailforward-check.invalid", 10_240_000, timeout, 20)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(lambda: Wire(self._session), host, port), self.loop
        ).result(timeout)

    def _session(self, wire: Wire) -> None:
        self.loop.create_task(SmtpConnection(self, self.settings, None, wire).run())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    # the engine's SessionHandler
    def connected(self, session: ClientSession, peer: tuple[str, int],
                  local: tuple[str, int]) -> ServerReply | None:
        return None

    def disconnected(self, session: ClientSession) -> None:
        pass

    async def mail(self, session: ClientSession, txn: Transaction, path: str,
                   params: list[str]) -> ServerReply:
        txn.has_sender, txn.mail_from = True, path
        return replies.SENDER_OK

    async def rcpt(self, session: ClientSession, txn: Transaction, path: str,
                   params: list[str]) -> ServerReply:
        txn.rcpt_tos.append(path)
        return replies.RECIPIENT_OK

    async def data(self, session: ClientSession, txn: Transaction, content: bytearray) -> ServerReply:
        with self.lock:
            self.envelopes.append((txn.mail_from, bytes(content)))
        return self.ACCEPTED

    def wait_for(self, token: str, timeout: float) -> str | None:
        """The envelope sender of the message carrying ``token``, or None when it never came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for mail_from, content in self.envelopes:
                    if token.encode() in content:
                        return mail_from
            time.sleep(0.05)
        return None


def probe_message(sender: str, recipient: str, token: str) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = f"mailforward check {token}"
    message["Message-ID"] = f"<{token}@{PROBE_DOMAIN}>"
    message.set_content("A test message from 'mailforward check --smtp'. It should never leave "
                        "the checking host.\n")
    return message.as_bytes().replace(b"\n", b"\r\n")


def srs_problem(mail_from: str, sender: str, srs_domain: str) -> str:
    if mail_from.lower() == sender.lower():
        return (f"the envelope sender arrived unchanged as <{mail_from}>: SRS is off on the "
                "server ([srs] domain), so forwarded mail fails SPF")
    local, _, domain = mail_from.rpartition("@")
    if not _SRS_ADDRESS.match(local):
        return f"the envelope sender arrived as <{mail_from}>, which is not an SRS address"
    if srs_domain and domain.lower() != srs_domain.lower():
        return f"the envelope sender <{mail_from}> is not in the SRS domain {srs_domain}"
    return ""


def check_srs(probe: SmtpProbe) -> CheckResult:
    """Send one message through the server into our own sink and look at its envelope sender."""
    item = "SRS rewrite"
    if probe.sink is None:
        return CheckResult(item, False, "not checked: give --sink HOST:PORT, a loopback address "
                                        "the server delivers --to to")
    try:
        sink = Sink(probe.sink[0], probe.sink[1], probe.timeout)
    except (OSError, RuntimeError, TimeoutError) as e:
        return CheckResult(item, False, f"cannot start the sink on {probe.sink[0]}:{probe.sink[1]}: {e}")
    try:
        return send_through(probe, sink)
    finally:
        sink.close()


def send_through(probe: SmtpProbe, handler: Sink) -> CheckResult:
    item = "SRS rewrite"
    token = uuid.uuid4().hex
    try:
        session = Session(probe)
        try:
            reply = session.envelope(probe.sender, probe.recipient)
            if reply.code == 250:
                session.smtp.data(probe_message(probe.sender, probe.recipient, token))
        finally:
            session.close()
    except smtplib.SMTPResponseException as e:
        error = e.smtp_error.decode(errors="replace") if isinstance(e.smtp_error, bytes) else e.smtp_error
        return CheckResult(item, False, f"the server refused the test message: {e.smtp_code} {error}")
    except (ProbeError, OSError, smtplib.SMTPException) as e:
        return CheckResult(item, False, f"sending the test message failed: {e}")
    if reply.code != 250:
        return CheckResult(item, False, f"the server refused RCPT TO:<{probe.recipient}>: {reply}")
    mail_from = handler.wait_for(token, probe.timeout)
    if mail_from is None:
        return CheckResult(item, False, f"nothing arrived at the sink {probe.sink} within "
                                        f"{probe.timeout:g}s: make the server deliver <{probe.recipient}> "
                                        "there (e.g. its [delivery] relay_host)")
    problem = srs_problem(mail_from, probe.sender, probe.srs_domain)
    if problem:
        return CheckResult(item, False, problem)
    return CheckResult(item, True, f"<{probe.sender}> arrived as Return-Path: <{mail_from}>")


# ---------------------------------------------------------------- the whole probe


def server_name(probe: SmtpProbe) -> str:
    """The name the server greets with: its own hostname, for root@hostname."""
    try:
        with socket.create_connection((probe.host, probe.port), timeout=probe.timeout) as sock:
            banner = sock.makefile("rb").readline().decode("utf-8", "replace")
            sock.sendall(b"QUIT\r\n")
    except OSError as e:
        raise ProbeError(f"cannot connect to {probe.host}:{probe.port}: {e}") from None
    parts = banner.split()
    if len(parts) < 2 or not parts[0].startswith("220"):
        raise ProbeError(f"{probe.host}:{probe.port} did not greet with 220: {banner.strip()!r}")
    return parts[1]


def run_smtp_checks(probe: SmtpProbe, hostname: str = "") -> list[CheckResult]:
    """Every item, each on its own connection; ``hostname`` defaults to the greeting's name."""
    try:
        hostname = hostname or server_name(probe)
    except ProbeError as e:
        return [CheckResult("connect", False, str(e))]
    results = [in_session(probe, "recipient", lambda s: check_recipient(s, probe))]
    if results[0].ok:
        results.append(in_session(probe, "spoofing rejected", lambda s: check_spoofing(s, probe)))
    else:
        results.append(CheckResult("spoofing rejected", False, "cannot tell while the recipient "
                                                               "itself is refused"))
    results += [check_srs(probe),
                in_session(probe, "no local delivery",
                           lambda s: check_local_delivery(s, probe, hostname)),
                in_session(probe, "no open relay", lambda s: check_open_relay(s, probe)),
                in_session(probe, "VRFY disabled", lambda s: check_vrfy(s, probe))]
    return results


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sink_address(text: str) -> tuple[str, int]:
    """The --sink value; loopback only, so the test message cannot leave this host."""
    host, port = parse_host_port(text, "--sink")
    if not is_loopback(host):
        raise ConfigError(f"--sink {text}: must be a loopback address (127.0.0.1 or [::1])")
    return host, port
