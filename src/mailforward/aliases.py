"""Virtual-alias lookup and expansion, like Postfix's virtual(5).

Lookup order: ``user+ext@domain``, ``user@domain`` (when a recipient
delimiter is set), then the catch-all ``@domain``.  A destination inside a
hosted domain is expanded again, depth-limited; duplicates are removed and a
cycle is cut instead of followed, so no alias table can make us loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .addresses import Address, parse_mailbox
from .errors import AddressError, MailforwardError
from .tables import LookupTable

log = logging.getLogger(__name__)

MAX_DEPTH = 20
MAX_DESTINATIONS = 1000


class NoDestination(MailforwardError):
    """An alias expanded to nothing deliverable (``loop`` tells whether a cycle was the cause)."""

    def __init__(self, address: str, loop: bool) -> None:
        super().__init__(f"{address}: alias expands to no destination{' (loop)' if loop else ''}")
        self.loop = loop


def alias_keys(address: Address, delimiter: str) -> list[str]:
    """``user+ext@domain``, then ``user@domain`` (when a delimiter is set), then ``@domain``."""
    local = address.local.lower()
    keys = [f"{local}@{address.domain}"]
    if delimiter and delimiter in local:
        base = local.split(delimiter, 1)[0]
        if base:
            keys.append(f"{base}@{address.domain}")
    keys.append(f"@{address.domain}")
    return keys


async def lookup_alias(table: LookupTable, address: Address, delimiter: str = "") -> tuple[str, ...] | None:
    """The destinations of the first matching key, or None when no alias matches."""
    for key in alias_keys(address, delimiter):
        destinations = await table.alias_destinations(key)
        if destinations is not None:
            return destinations
    return None


@dataclass
class _Expansion:
    table: LookupTable
    delimiter: str
    seen: set[str]
    result: list[str] = field(default_factory=list)
    loop: bool = False

    async def walk(self, destinations: tuple[str, ...], path: tuple[str, ...]) -> None:
        """Expand ``destinations``; ``path`` holds the aliases that led here (a revisit is a cycle)."""
        for text in destinations:
            if len(self.result) >= MAX_DESTINATIONS:
                log.warning("alias expansion stopped at %d destinations", MAX_DESTINATIONS)
                return
            try:
                dest = parse_mailbox(text)
            except AddressError:
                log.warning("alias table holds an invalid destination %r; skipped", text)
                continue
            if dest.key in path:
                self.loop = True
                continue
            if dest.key in self.seen:  # reached twice without a cycle: deliver once
                continue
            self.seen.add(dest.key)
            if dest.is_literal or not await self.table.domain_is_hosted(dest.domain):
                self.result.append(str(dest))
            elif len(path) >= MAX_DEPTH:
                self.loop = True
            else:
                nested = await lookup_alias(self.table, dest, self.delimiter)
                if nested is None:
                    log.warning("alias destination %s is not a known alias; skipped", dest.key)
                    continue
                await self.walk(nested, (*path, dest.key))


async def expand_alias(table: LookupTable, address: Address, delimiter: str = "") -> tuple[str, ...] | None:
    """Final destinations of ``address``; None if it is no alias at all.

    Raises NoDestination when it is an alias but nothing deliverable remains.
    """
    top = await lookup_alias(table, address, delimiter)
    if top is None:
        return None
    expansion = _Expansion(table, delimiter, seen={address.key})
    await expansion.walk(top, (address.key,))
    if not expansion.result:
        raise NoDestination(address.key, expansion.loop)
    return tuple(expansion.result)
