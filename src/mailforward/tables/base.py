"""The lookup seam, like Postfix's ``dict_*``: one interface, many backends.

The server asks exactly three questions, the ones the seed's Postfix maps
ask.  Keys arrive already normalised (``addresses.Address.key``, domains
IDNA-encoded and lower-cased).  "Not found" is an ordinary answer (``False``
or ``None``); a table that cannot answer raises ``TemporaryLookupError``
instead, and nothing in between may turn one into the other.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from ..errors import TemporaryLookupError

__all__ = ["LookupTable", "QueryRunner", "TemporaryLookupError", "split_destinations"]


class LookupTable(Protocol):
    async def domain_is_hosted(self, domain: str) -> bool:
        """Is ``domain`` a hosted domain with active=1?"""
        ...

    async def alias_destinations(self, address: str) -> tuple[str, ...] | None:
        """The destinations of an active alias row for ``address`` (or ``@domain``), else None."""
        ...

    async def sender_domain_is_hosted(self, domain: str) -> bool:
        """Does a MAIL FROM in ``domain`` claim one of our active domains?"""
        ...

    async def close(self) -> None: ...


class QueryRunner(Protocol):
    """Runs one SELECT with one bound parameter: what a SQL backend must provide."""

    async def fetch(self, sql: str, param: str) -> list[tuple[Any, ...]]: ...

    async def close(self) -> None: ...


def split_destinations(goto: str) -> tuple[str, ...]:
    """``goto`` split as Postfix splits a lookup result: on commas and/or white space.

    ``'a@x.test, b@y.test'``, ``'a@x.test b@y.test'`` and ``'a@x.test,b@y.test'``
    are the same two destinations.
    """
    return tuple(item for item in re.split(r"[\s,]+", goto) if item)
