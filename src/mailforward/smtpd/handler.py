"""The thin handler between the SMTP engine and policy.

One method per SMTP phase (the engine's ``SessionHandler``).  Each parses
what the engine handed over, asks policy (``policy``, ``aliases``), and
returns a ``Reply``.  The DATA phase hands the accepted transaction to the
delivery interface, whose reply goes back to the client unchanged
(pass-through acknowledgement).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ipaddress
import logging
import time
from collections.abc import Sequence

from ..addresses import (
    Address,
    has_control_characters,
    is_sendable,
    normalize_domain,
    parse_mailbox,
    strip_source_route,
)
from ..aliases import NoDestination, expand_alias
from ..auth.dmarc import org_domain
from ..auth.pipeline import MessageAuthenticator
from ..auth.verify import AuthVerdict
from ..config import ServerSettings
from ..delivery.base import Delivery, Message, new_queue_id
from ..errors import AddressError, AuthenticationRefused, TemporaryLookupError
from ..from_field import FromField, read_from_field
from ..headerfields import header_block
from ..ops.logs import client_name, log_reject
from ..ops.metrics import count_connection, count_message, count_refusal
from ..reply import printable
from ..srs import SrsError, SrsRewriter, is_srs_address
from ..tables import LookupTable
from . import policy, replies
from .abuse import AbuseChecks, DuplicateQuestion
from .limits import ClientLimits
from .parameters import apply_mail_parameters, recipient_dsn
from .replies import Reply
from .session import ClientSession, RecipientDsn, Transaction

log = logging.getLogger("mailforward.smtpd")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SmtpHandler:
    def __init__(self, settings: ServerSettings, table: LookupTable, delivery: Delivery,
                 srs: SrsRewriter | None = None, auth: MessageAuthenticator | None = None,
                 own_domains: frozenset[str] = frozenset(),
                 abuse: AbuseChecks | None = None) -> None:
        self.settings = settings
        self.abuse = abuse  # bans, rate limits, duplicate suppression (abuse.py)
        self.table = table
        self.delivery = delivery
        self.srs = srs
        self.auth = auth
        self.srs_domain = normalize_domain(srs.domain) if srs is not None else ""
        # Domains our envelope, signature or seal speaks for: not for strangers' From.
        self.own_domains = frozenset(own_domains | ({self.srs_domain} - {""}))
        org_domain("warm-up.invalid")  # read the public suffix list now, not in a client's DATA
        self.mynetworks: Sequence[IpNetwork] = [
            ipaddress.ip_network(n, strict=False) for n in settings.mynetworks]
        self.postmaster = settings.postmaster or (
            f"postmaster@{self.srs_domain}" if self.srs_domain else "")
        self.limits = ClientLimits.for_server(settings)

    # ------------------------------------------------------------ connection

    def in_mynetworks(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.mynetworks)

    def connected(self, session: ClientSession, peer: tuple[str, int],
                  local: tuple[str, int]) -> Reply | None:
        """Note who the client is; refuse it (421) when over its connection limits (the
        limits admit a client in ``client_limit_exceptions`` uncounted)."""
        session.client_ip, session.local_ip = peer[0], local[0]
        session.in_mynetworks = self.in_mynetworks(session.client_ip)
        if not self.limits.connect(session.client_ip):
            refusal = replies.too_many_connections(self.settings.hostname, session.client_ip)
            log.warning("%s: %s", client_name(session.client_ip), refusal)
            count_connection("refused")
            _refused("CONNECT", session, refusal, sender="")
            return refusal
        session.admitted = not self.limits.exempt(session.client_ip)
        if self.abuse is not None and (banned := self.abuse.connected(session)) is not None:
            count_connection("refused")
            _refused("CONNECT", session, banned, sender="")
            return banned
        count_connection("accepted")
        return None

    def disconnected(self, session: ClientSession) -> None:
        self.limits.disconnect(session.client_ip)

    # ------------------------------------------------------------ MAIL

    async def mail(self, session: ClientSession, envelope: Transaction, path: str,
                   params: list[str]) -> Reply:
        reply = ((await self.abuse.mail(session, path) if self.abuse is not None else None)
                 or await self._accept_sender(session, envelope, path, params))
        if not reply.is_success:
            _refused("MAIL", session, reply, sender=path)
        return reply

    async def _accept_sender(self, session: ClientSession, envelope: Transaction, path: str,
                             params: list[str]) -> Reply:
        refusal = apply_mail_parameters(envelope, params, self.settings.message_size_limit)
        if refusal is not None:
            return refusal
        if path:
            try:
                envelope.sender = parse_mailbox(strip_source_route(path))
            except AddressError:
                return replies.BAD_SENDER_SYNTAX
            if _needs_smtputf8(path) and not envelope.smtp_utf8:
                return replies.SMTPUTF8_REQUIRED
        mail_from = envelope.sender.external if envelope.sender else ""
        forward_sender = self.envelope_sender(mail_from)
        if not is_sendable(forward_sender) or (
                envelope.sender is not None and has_control_characters(envelope.sender.local)):
            return replies.UNFORWARDABLE_SENDER
        envelope.has_sender = True
        envelope.mail_from = mail_from
        envelope.forward_sender = forward_sender
        return replies.SENDER_OK

    # ------------------------------------------------------------ RCPT

    async def rcpt(self, session: ClientSession, envelope: Transaction, path: str,
                   params: list[str]) -> Reply:
        reply = ((await self.abuse.rcpt(session, path) if self.abuse is not None else None)
                 or await self._rcpt(session, envelope, path, params))
        if not reply.is_success:
            _refused("RCPT", session, reply, sender=envelope.mail_from, recipient=path)
        return reply

    async def _rcpt(self, session: ClientSession, envelope: Transaction, path: str,
                    params: list[str]) -> Reply:
        if len(envelope.rcpt_tos) >= self.settings.recipient_limit:
            return replies.TOO_MANY_RECIPIENTS
        dsn = recipient_dsn(params)
        if isinstance(dsn, Reply):
            return dsn
        if _needs_smtputf8(path) and not envelope.smtp_utf8:
            return replies.SMTPUTF8_REQUIRED
        known = set(envelope.destinations)
        reply = await self._accept_recipient(session, envelope, path)
        if reply.is_success:
            envelope.rcpt_tos.append(path)
            _remember_dsn(envelope, known, dsn)
        return reply

    async def _accept_recipient(self, session: ClientSession, envelope: Transaction, path: str) -> Reply:
        if not path:
            return replies.BAD_RECIPIENT_SYNTAX
        try:
            mailbox = strip_source_route(path)
        except AddressError:
            return replies.BAD_RECIPIENT_SYNTAX
        ctx = policy.PolicyContext(self.table, session.client_ip, session.local_ip,
                                   session.in_mynetworks, session.host_name, envelope.sender)
        rejection = (await policy.run_checks(policy.HELO_CHECKS, ctx)
                     or await policy.run_checks(policy.SENDER_CHECKS, ctx))
        if rejection is not None:
            return _about(rejection, mailbox)
        if mailbox.lower() == "postmaster":
            return await self._accept_postmaster(session, envelope, mailbox)
        if "@" not in mailbox:
            return replies.RELAY_DENIED.about(mailbox)  # not fully qualified: never ours
        try:
            recipient = parse_mailbox(mailbox)
        except AddressError:
            return replies.BAD_RECIPIENT_SYNTAX
        if self._is_srs_recipient(recipient):
            return self._accept_bounce(envelope, recipient)
        ctx = policy.PolicyContext(self.table, session.client_ip, session.local_ip,
                                   session.in_mynetworks, session.host_name, envelope.sender,
                                   recipient)
        rejection = await policy.run_checks(policy.RELAY_CHECKS, ctx)
        if rejection is not None:
            return _about(rejection, recipient.as_written)
        return await self._resolve(session, envelope, recipient)

    async def _accept_postmaster(self, session: ClientSession, envelope: Transaction,
                                 mailbox: str) -> Reply:
        """RFC 5321 4.5.1: ``<postmaster>`` with no domain MUST be accepted.

        It goes to ``[server] postmaster`` (default: postmaster@ the SRS
        domain), through the alias table when that domain is hosted.
        """
        if not self.postmaster:
            return replies.USER_UNKNOWN.about(mailbox)
        address = parse_mailbox(self.postmaster)
        try:
            hosted = await self.table.domain_is_hosted(address.domain)
        except TemporaryLookupError:
            return replies.TEMPORARY_LOOKUP_FAILURE.about(mailbox)
        if not hosted:
            _add_destinations(envelope, (str(address),), mailbox)
            return replies.RECIPIENT_OK
        reply = await self._resolve(session, envelope, address)
        return reply if reply.is_success else replies.USER_UNKNOWN.about(mailbox)

    def _is_srs_recipient(self, recipient: Address) -> bool:
        return (self.srs is not None and recipient.domain == self.srs_domain
                and is_srs_address(recipient.local))

    def _accept_bounce(self, envelope: Transaction, recipient: Address) -> Reply:
        """RCPT to one of our SRS addresses: verify, reverse, deliver to the original sender."""
        assert self.srs is not None
        try:
            original = parse_mailbox(self.srs.reverse(f"{recipient.local}@{recipient.domain}"))
        except (SrsError, AddressError) as error:
            log.info("SRS address %s refused: %s", recipient.as_written, error)
            return replies.USER_UNKNOWN.about(recipient.as_written)
        _add_destinations(envelope, (original.external,), recipient.as_written)
        return replies.RECIPIENT_OK

    def envelope_sender(self, mail_from: str) -> str:
        """The sender to forward with: SRS-rewritten unless PostSRSd would leave it alone."""
        if self.srs is None or not mail_from:
            return mail_from
        try:
            return self.srs.forward(mail_from)
        except SrsError:
            return mail_from

    async def _resolve(self, session: ClientSession, envelope: Transaction, recipient: Address) -> Reply:
        """Expand the alias; a mynetworks client may also relay to a domain we do not host."""
        try:
            hosted = await self.table.domain_is_hosted(recipient.domain)
            if not hosted and session.in_mynetworks:
                destinations: tuple[str, ...] | None = (str(recipient),)
            else:
                destinations = await expand_alias(self.table, recipient,
                                                  self.settings.recipient_delimiter)
        except TemporaryLookupError as error:
            log.warning("lookup for %s failed: %s", recipient.key, error)
            return replies.TEMPORARY_LOOKUP_FAILURE.about(recipient.as_written)
        except NoDestination as error:
            log.warning("%s", error)
            reply = replies.ALIAS_LOOP if error.loop else replies.USER_UNKNOWN
            return reply.about(recipient.as_written)
        if destinations is None:
            return replies.USER_UNKNOWN.about(recipient.as_written)
        _add_destinations(envelope, destinations, recipient.as_written)
        return replies.RECIPIENT_OK

    # ------------------------------------------------------------ DATA

    async def data(self, session: ClientSession, envelope: Transaction,
                   content: bytearray) -> Reply:
        started = time.monotonic()
        queue_id = new_queue_id()
        if count_received_headers(content) > self.settings.hopcount_limit:
            reply = replies.TOO_MANY_HOPS
        else:
            try:
                reply = await self._forward(session, envelope, queue_id, content)
            except AuthenticationRefused as refusal:
                reply = replies.reply_for_error(refusal)
            except Exception as error:
                log.error("%s: delivery failed", queue_id, exc_info=error)
                reply = replies.reply_for_error(error)
        if reply.reason:  # refused by policy, not by the destinations
            _refused("END-OF-MESSAGE", session, reply, sender=envelope.mail_from,
                     recipient=",".join(envelope.rcpt_tos))
        count_message(_outcome(reply), time.monotonic() - started)
        # Written on the loop's next turn, once the engine has sent the reply: the
        # client's next command does not wait for our log write.
        asyncio.get_running_loop().call_soon(functools.partial(
            log.info, "%s: client=%s, helo=<%s>, from=<%s>, size=%d, nrcpt=%d, status=%s",
            queue_id, client_name(session.client_ip), printable(session.host_name),
            printable(envelope.mail_from), len(content), len(envelope.destinations),
            f"{reply.code} {reply.status}"))
        return reply

    async def _forward(self, session: ClientSession, envelope: Transaction, queue_id: str,
                       content: bytearray) -> Reply:
        """Ask the duplicate cache now, answered at delivery (abuse.py): its round trip
        overlaps our work on the message instead of following it."""
        duplicates = (self.abuse.ask_duplicates(content, envelope.destinations)
                      if self.abuse is not None else None)
        try:
            return await self._prepare_and_deliver(session, envelope, queue_id, content,
                                                   duplicates)
        finally:
            if duplicates is not None:
                duplicates.drop()  # refused or failed before delivery: no answer left pending

    async def _prepare_and_deliver(self, session: ClientSession, envelope: Transaction,
                                   queue_id: str, content: bytearray,
                                   duplicates: DuplicateQuestion | None) -> Reply:
        """Verify, add our trace, rewrite the envelope (SRS), sign and seal, then deliver."""
        content[:0] = self._received_header(session, envelope, queue_id)  # in place: no copy
        from_field = read_from_field(content)  # verification only adds fields above it
        refusal = await policy.run_checks(policy.FROM_FIELD_CHECKS,
                                          self._message_context(session, from_field, None))
        if refusal is not None:
            return refusal
        outgoing: bytes | bytearray = content  # unchanged unless authentication adds fields
        verdict = None
        if self.auth is not None:
            outgoing, verdict = await self.auth.verify_inbound(
                content, session.client_ip, session.host_name, envelope.mail_from,
                trusted=session.in_mynetworks)
            if outgoing is not content:
                content.clear()  # the verifier's copy is the message now
        refusal = await policy.run_checks(policy.FROM_OWNER_CHECKS,
                                          self._message_context(session, from_field, verdict))
        if refusal is not None:
            return refusal
        if self.auth is not None:
            outgoing = await self.auth.outbound(outgoing, session.client_ip, verdict)
        message = Message(queue_id, envelope.forward_sender, tuple(envelope.destinations),
                          outgoing, session.client_ip, envelope.smtp_utf8,
                          original_sender=envelope.mail_from, aliases=dict(envelope.aliases),
                          body=envelope.body, dsn_ret=envelope.dsn_ret,
                          dsn_envid=envelope.dsn_envid, dsn=dict(envelope.dsn))
        if self.abuse is not None:  # not again to destinations a retried message reached
            return await self.abuse.deliver_once(message, self.delivery, duplicates)
        return await self.delivery.deliver(message)

    def _message_context(self, session: ClientSession, from_field: FromField,
                         verdict: AuthVerdict | None) -> policy.MessageContext:
        authenticated: set[str] = set()
        dmarc_pass = ""
        if verdict is not None:
            if verdict.spf.result == "pass" and verdict.spf.identity == "mailfrom":
                authenticated.add(verdict.spf.domain)
            authenticated.update(v.domain for v in verdict.dkim if v.result == "pass")
            dmarc_pass = verdict.from_domain if verdict.dmarc == "pass" else ""
        return policy.MessageContext(self.table, session.in_mynetworks, from_field,
                                     self.own_domains, frozenset(authenticated), dmarc_pass)

    def _received_header(self, session: ClientSession, envelope: Transaction,
                         queue_id: str) -> bytes:
        """Our trace field; ``with`` as registered for RFC 3848 and RFC 6531 (UTF8SMTP)."""
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if envelope.smtp_utf8:
            protocol = "UTF8SMTP"
        if session.tls:
            protocol += "S"
        helo = session.host_name.encode("utf-8", "surrogateescape").decode("ascii", "replace")
        return (f"Received: from {helo} ([{session.client_ip}])\r\n"
                f"\tby {self.settings.hostname} (mailforward) with {protocol} id {queue_id};\r\n"
                f"\t{received_date()}\r\n").encode()


_date_cache: tuple[int, str] = (0, "")


def received_date() -> str:
    """The date of our trace field (RFC 5322, local time), made once per second: with
    the time zone worked out each time it was a visible share of a message's CPU."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


def _add_destinations(envelope: Transaction, destinations: Sequence[str], alias: str) -> None:
    """Add new destinations, remembering the address the sender used for each (kept private)."""
    for dest in destinations:
        if dest not in envelope.destinations:
            envelope.destinations.append(dest)
            envelope.aliases[dest] = alias


def _refused(stage: str, session: ClientSession, reply: Reply, *, sender: str,
             recipient: str = "") -> None:
    """One refusal: a Postfix-shaped log line and a count by stage and reason."""
    reason = reply.reason or "other"
    log_reject(stage, session.client_ip, str(reply), reason, sender=sender, recipient=recipient,
               helo=session.host_name, extended=session.extended_smtp)
    count_refusal(stage, reason)


def _outcome(reply: Reply) -> str:
    """The message's fate as the client was told it: accepted (delivered or safely spooled),
    refused by our policy, deferred, or failed (refused by every destination)."""
    if reply.is_success:
        return "accepted"
    if reply.is_temporary:
        return "deferred"
    return "refused" if reply.reason else "failed"


def _remember_dsn(envelope: Transaction, known: set[str], dsn: RecipientDsn) -> None:
    """The RCPT's DSN parameters apply to every destination it added."""
    if dsn.notify or dsn.orcpt:
        for dest in envelope.destinations:
            if dest not in known:
                envelope.dsn[dest] = dsn


def _needs_smtputf8(path: str) -> bool:
    """Well-formed UTF-8 beyond ASCII (undecodable bytes are a syntax error instead)."""
    if path.isascii():
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _about(reply: Reply, subject: str) -> Reply:
    """A tempfail from a check names the address, as Postfix's ``<addr>: Temporary lookup failure``."""
    return reply.about(subject) if reply == replies.TEMPORARY_LOOKUP_FAILURE else reply


def count_received_headers(content: bytes | bytearray) -> int:
    """Received: lines in the header section (up to the first empty line)."""
    return sum(1 for line in header_block(content).split(b"\r\n")
               if line[:9].lower() == b"received:")
