"""RFC 5321 mailbox parsing and the normalisation used for table lookups.

Lookup keys are normalised the way Postfix normalises table lookups: the
domain lower-cased, a trailing dot removed and IDNA-encoded; the local part
lower-cased.  After that, matching is exact (see ``tables``).

Addresses carrying routing operators in the local part (``%``, ``!``, ``@``)
are "routed": Postfix's ``reject_unauth_destination`` refuses them, and so do
we, so that no percent hack, bang path or quoted ``@`` can ever relay.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

import idna

from .errors import AddressError

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255

# RFC 5321 atext, plus any non-ASCII character (RFC 6531, SMTPUTF8).
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED_STRING = re.compile(r'"((?:[^"\\\r\n]|\\[\x20-\x7e])*)"')
_LDH_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
ROUTING_CHARACTERS = frozenset("@%!")


@dataclass(frozen=True)
class Address:
    """A parsed mailbox.  ``local`` is unquoted; ``domain`` is normalised (or ``[literal]``)."""

    local: str
    domain: str
    written_domain: str = field(default="", compare=False)

    @property
    def as_written(self) -> str:
        """Unquoted, domain as the client spelled it: how Postfix echoes an address in replies."""
        return f"{self.local}@{self.written_domain or self.domain}"

    @property
    def external(self) -> str:
        """As written, quoted where RFC 5321 needs it: what to send in MAIL FROM."""
        return f"{quote_local(self.local)}@{self.written_domain or self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def is_routed(self) -> bool:
        """True when the local part holds a routing operator (``%``, ``!`` or ``@``)."""
        return any(c in ROUTING_CHARACTERS for c in self.local)

    @property
    def key(self) -> str:
        """The lookup key: ``local@domain`` with the local part lower-cased."""
        return f"{self.local.lower()}@{self.domain}"

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"


def quote_local(local: str) -> str:
    if _DOT_STRING.fullmatch(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lower-case, drop one trailing dot, IDNA-encode; raise AddressError when invalid.

    Cached: the same few domains come back in every transaction (sender, alias,
    From), and IDNA's checks are the dearest thing we do per address.
    """
    text = domain.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise AddressError("empty domain")
    try:
        ascii_form = idna.encode(text, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError(f"invalid domain {domain!r}: {e}") from None
    ascii_form = ascii_form.lower()
    labels = ascii_form.split(".")
    if len(ascii_form) > MAX_DOMAIN or not all(_LDH_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"invalid domain {domain!r}")
    return ascii_form


def is_fqdn(domain: str) -> bool:
    return "." in domain


def parse_address_literal(text: str) -> str:
    """Validate ``[1.2.3.4]`` or ``[IPv6:...]`` and return it in canonical form."""
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"invalid address literal {text!r}") from None


def parse_mailbox(text: str) -> Address:
    """Parse ``local@domain`` (no angle brackets) as RFC 5321 ``Mailbox``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the wire (surrogate escapes)
        raise AddressError("address is not valid UTF-8") from None
    if text.startswith('"'):
        m = _QUOTED_STRING.match(text)
        if not m:
            raise AddressError("unterminated quoted local part")
        local = re.sub(r"\\(.)", r"\1", m.group(1))
        rest = text[m.end():]
        if not rest.startswith("@"):
            raise AddressError("missing @domain")
        domain_text = rest[1:]
    else:
        local, at, domain_text = text.rpartition("@")
        if not at:
            raise AddressError("missing @domain")
        # An unquoted '@' in the local part is a routing trick, not syntax we
        # repair: keep it so the address counts as routed.
        if not all(_DOT_STRING.fullmatch(part) for part in local.split("@")):
            raise AddressError(f"invalid local part {local!r}")
    if not local:
        raise AddressError("empty local part")
    if domain_text.startswith("[") and domain_text.endswith("]"):
        return Address(local, parse_address_literal(domain_text), domain_text)
    return Address(local, normalize_domain(domain_text), domain_text)


def has_control_characters(text: str) -> bool:
    """C0 and C1 controls and DEL: never valid in an RFC 5321 path, even quoted."""
    return any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text)


def is_sendable(path: str) -> bool:
    """``path`` can be written in a MAIL FROM or RCPT TO we send: a plain RFC 5321 mailbox.

    The local part must be a dot-string (what SRS produces is one); a quoted
    local part, a routing ``@`` or a control character cannot be carried
    through a rewrite, so such senders are refused at MAIL FROM instead of
    being accepted and then failing at every delivery attempt.
    """
    if not path:
        return True  # the null sender
    try:
        address = parse_mailbox(path)
    except AddressError:
        return False
    return (not has_control_characters(address.local) and "@" not in address.local
            and quote_local(address.local) == address.local)


def parse_address(text: str) -> Address:
    """Parse a plain address as an operator types it (CLI), no routing tricks allowed."""
    address = parse_mailbox(text.strip())
    if address.is_routed or address.is_literal:
        raise AddressError(f"{text!r}: routing characters and IP literals are not allowed here")
    if len(address.local.encode()) > MAX_LOCAL_PART:
        raise AddressError(f"{text!r}: local part longer than {MAX_LOCAL_PART} octets")
    if len(address.key.encode()) > MAX_DOMAIN:
        raise AddressError(f"{text!r}: longer than {MAX_DOMAIN} octets")
    return address


def strip_source_route(path: str) -> str:
    """Drop an RFC 5321 source route (``@a,@b:user@c`` -> ``user@c``), as §4.1.1.3 allows."""
    if path.startswith("@"):
        _, colon, mailbox = path.partition(":")
        if not colon:
            raise AddressError("malformed source route")
        return mailbox
    return path
