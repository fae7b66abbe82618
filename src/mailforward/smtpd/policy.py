"""The restrictions, as small named checks run in order per phase (like Haraka).

Each check looks at a :class:`PolicyContext` and returns ``CONTINUE``,
``ACCEPT`` (stop this phase: permitted), or a ``Reply`` (reject or tempfail).
:func:`run_checks` runs a phase: a check that raises or times out is a
tempfail, never an accept.

The phases mirror the seed's main.cf.  With ``smtpd_delay_reject = yes`` the
HELO and sender phases are evaluated at RCPT time, so their rejections are
reported there (that is what the reference stack answers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from ..addresses import Address, is_fqdn
from ..auth.dmarc import org_domain
from ..errors import TemporaryLookupError
from ..from_field import FromField, FromProblem
from ..tables import LookupTable
from . import replies
from .replies import Reply

log = logging.getLogger(__name__)


class Verdict(Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"


CONTINUE = Verdict.CONTINUE
ACCEPT = Verdict.ACCEPT

CHECK_TIMEOUT = 30.0

_SRS_LOCAL_PART = re.compile(r"srs[01][=+-]", re.IGNORECASE)
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


@dataclass(frozen=True)
class PolicyContext:
    """What the checks may look at.  ``recipient`` is None outside the RCPT phase."""

    table: LookupTable
    client_ip: str
    local_ip: str
    in_mynetworks: bool
    helo: str
    sender: Address | None  # None: the null sender <>
    recipient: Address | None = None


@dataclass(frozen=True)
class MessageContext:
    """What the From-header checks may look at, at the end of DATA.

    ``authenticated`` holds the domains the message authenticated on arrival
    (the SPF-passing MAIL FROM domain, each passing DKIM ``d=``); ``dmarc_pass``
    is the From domain when our verifier computed DMARC pass for it.
    ``own_domains`` are the domains our own SRS envelope, signature or seal
    speaks for (``[srs] domain``, ``[dkim] sign_forwarded_as``, ``[arc] domain``).
    """

    table: LookupTable
    in_mynetworks: bool
    from_field: FromField
    own_domains: frozenset[str] = frozenset()
    authenticated: frozenset[str] = frozenset()
    dmarc_pass: str = ""


C = TypeVar("C", PolicyContext, MessageContext)
Check = Callable[[C], Awaitable[Verdict | Reply]]


INSTANT_CHECKS: set[Callable[..., object]] = set()
"""Checks that judge the context alone: no lookup, nothing that could wait."""


def instant(check: Check[C]) -> Check[C]:
    """Mark ``check`` as judging the context alone, so it runs without a timer.

    Every SMTP command runs a phase of checks, most of them a glance at the
    context; arming and cancelling a timer for each was a measurable share
    of a message's CPU.  A check that looks anything up must not be marked
    (a test reads the marked checks' source for ``await``).
    """
    INSTANT_CHECKS.add(check)
    return check


async def run_checks(checks: Sequence[Check[C]], ctx: C,
                     timeout: float = CHECK_TIMEOUT) -> Reply | None:
    """Run one phase; return the rejecting reply, or None when the phase passed."""
    for check in checks:
        try:
            if check in INSTANT_CHECKS:
                verdict = await check(ctx)
            else:
                async with asyncio.timeout(timeout):
                    verdict = await check(ctx)
        except TimeoutError:
            log.warning("check %s timed out", check.__name__)
            return replies.TEMPORARY_LOOKUP_FAILURE
        except Exception as error:  # a check that fails can only tempfail
            if isinstance(error, TemporaryLookupError):
                log.warning("check %s: %s", check.__name__, error)
            else:
                log.exception("check %s failed", check.__name__)
            return replies.reply_for_error(error)
        if verdict is ACCEPT:
            return None
        if isinstance(verdict, Reply):
            return verdict
        if verdict is not CONTINUE:  # a buggy check fails closed, never open
            log.error("check %s returned %r", check.__name__, verdict)
            return replies.INTERNAL_ERROR
    return None


# ---------------------------------------------------------------- HELO


@instant
async def permit_mynetworks(ctx: PolicyContext) -> Verdict | Reply:
    """Clients in ``[server] mynetworks`` skip the rest of the phase."""
    return ACCEPT if ctx.in_mynetworks else CONTINUE


def is_valid_helo_hostname(name: str) -> bool:
    """Postfix's ``reject_invalid_helo_hostname``: a hostname or an address (literal)."""
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        inner = inner[5:] if inner[:5].lower() == "ipv6:" else inner
        return _is_ip(inner)
    if _is_ip(name):
        return True
    host = name[:-1] if name.endswith(".") else name
    labels = host.split(".")
    if not host or len(host) > 255 or not all(_HOST_LABEL.fullmatch(lb) for lb in labels):
        return False
    return not all(label.isdigit() for label in labels)  # numeric but not an IP


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@instant
async def reject_invalid_helo_hostname(ctx: PolicyContext) -> Verdict | Reply:
    if is_valid_helo_hostname(ctx.helo):
        return CONTINUE
    return replies.INVALID_HELO.about(ctx.helo)


# ---------------------------------------------------------------- sender


@instant
async def reject_srs_sender(ctx: PolicyContext) -> Verdict | Reply:
    """SRS addresses are ours to mint: an inbound SRS0/SRS1 sender (any separator) is forged."""
    if ctx.sender is not None and _SRS_LOCAL_PART.match(ctx.sender.local):
        return replies.SRS_SENDER_INBOUND.about(ctx.sender.as_written)
    return CONTINUE


async def reject_forged_local_sender(ctx: PolicyContext) -> Verdict | Reply:
    """Outsiders may not use our hosted domains as MAIL FROM (the seed's dynamic anti-spoofing)."""
    if ctx.sender is None or ctx.sender.is_literal:
        return CONTINUE
    if await ctx.table.sender_domain_is_hosted(ctx.sender.domain):
        return replies.FORGED_LOCAL_SENDER.about(ctx.sender.as_written)
    return CONTINUE


# ---------------------------------------------------------------- recipient


def _recipient(ctx: PolicyContext) -> Address:
    assert ctx.recipient is not None, "recipient checks run only at RCPT"
    return ctx.recipient


@instant
async def reject_routed_address(ctx: PolicyContext) -> Verdict | Reply:
    """Percent hack, bang path, quoted '@': routing operators never relay, from anyone."""
    rcpt = _recipient(ctx)
    return replies.RELAY_DENIED.about(rcpt.as_written) if rcpt.is_routed else CONTINUE


@instant
async def reject_address_literal(ctx: PolicyContext) -> Verdict | Reply:
    """No IP literals: our own address has no mailboxes (550), any other is a relay (554)."""
    rcpt = _recipient(ctx)
    if not rcpt.is_literal:
        return CONTINUE
    literal = rcpt.domain[1:-1].removeprefix("IPv6:")
    if _is_ip(ctx.local_ip) and ipaddress.ip_address(literal) == ipaddress.ip_address(ctx.local_ip):
        return replies.USER_UNKNOWN.about(rcpt.as_written)
    return replies.RELAY_DENIED.about(rcpt.as_written)


async def reject_unauth_destination(ctx: PolicyContext) -> Verdict | Reply:
    """Only hosted, active domains are destinations; anything else is relaying."""
    rcpt = _recipient(ctx)
    if is_fqdn(rcpt.domain) and await ctx.table.domain_is_hosted(rcpt.domain):
        return CONTINUE
    return replies.RELAY_DENIED.about(rcpt.as_written)


# ---------------------------------------------------------------- From header (end of DATA)


@instant
async def permit_mynetworks_message(ctx: MessageContext) -> Verdict | Reply:
    """Our own submitters write what From they like, as with OpenDMARC's IgnoreHosts."""
    return ACCEPT if ctx.in_mynetworks else CONTINUE


@instant
async def reject_missing_from(ctx: MessageContext) -> Verdict | Reply:
    """RFC 5322 3.6: From is required; without it no receiver can apply DMARC."""
    return replies.FROM_MISSING if ctx.from_field.problem is FromProblem.MISSING else CONTINUE


@instant
async def reject_repeated_from(ctx: MessageContext) -> Verdict | Reply:
    """Two From fields: we would judge one, the recipient's MUA may show the other."""
    return replies.FROM_REPEATED if ctx.from_field.problem is FromProblem.REPEATED else CONTINUE


@instant
async def reject_invalid_from(ctx: MessageContext) -> Verdict | Reply:
    """Not exactly one parseable mailbox (RFC 7489 6.6.1, OpenDMARC's RejectMultiValueFrom)."""
    if ctx.from_field.problem is FromProblem.NOT_ONE_MAILBOX:
        return replies.FROM_NOT_ONE_MAILBOX
    return CONTINUE


async def reject_unauthenticated_own_domain(ctx: MessageContext) -> Verdict | Reply:
    """A From in one of our domains must have passed DMARC for it on arrival.

    Our SRS envelope passes SPF for, and our signature aligns with, our own
    domains: forwarding a stranger's mail that claims one of them would make a
    receiver compute DMARC pass for a forgery.  A message the real owner of the
    domain signed (aligned DKIM) is fine.
    """
    domain = ctx.from_field.domain
    if not await _is_own_domain(ctx, domain):
        return CONTINUE
    if domain == ctx.dmarc_pass or any(org_domain(d) == org_domain(domain)
                                       for d in ctx.authenticated):
        return CONTINUE
    return replies.own_domain_unauthenticated(domain)


async def _is_own_domain(ctx: MessageContext, domain: str) -> bool:
    """Shares its organizational domain with a domain we sign for, or is (under) a hosted one."""
    organization = org_domain(domain)
    if any(org_domain(own) == organization for own in ctx.own_domains):
        return True
    labels = domain.split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - organization.count("."))]
    for candidate in candidates:
        if await ctx.table.domain_is_hosted(candidate):
            return True
    return False


HELO_CHECKS: tuple[Check[PolicyContext], ...] = (permit_mynetworks,
                                                 reject_invalid_helo_hostname)
SENDER_CHECKS: tuple[Check[PolicyContext], ...] = (permit_mynetworks, reject_srs_sender,
                                                   reject_forged_local_sender)
RELAY_CHECKS: tuple[Check[PolicyContext], ...] = (reject_routed_address, reject_address_literal,
                                                  permit_mynetworks, reject_unauth_destination)
# The field's shape is judged before verification (no DNS spent on a message
# we refuse, and no verifier ever parses a From we could not); who may use our
# domains needs the verdict, so it is judged after.
FROM_FIELD_CHECKS: tuple[Check[MessageContext], ...] = (
    permit_mynetworks_message, reject_missing_from, reject_repeated_from, reject_invalid_from)
FROM_OWNER_CHECKS: tuple[Check[MessageContext], ...] = (
    permit_mynetworks_message, reject_unauthenticated_own_domain)
FROM_CHECKS = FROM_FIELD_CHECKS + FROM_OWNER_CHECKS[1:]
