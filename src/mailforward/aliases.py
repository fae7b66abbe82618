"""Virtual-alias lookup, in the order Postfix's virtual(5) documents."""

from __future__ import annotations

from .addresses import Address
from .tables import LookupTable


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
