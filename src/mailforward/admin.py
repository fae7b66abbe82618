"""Managing hosted domains and aliases in the seed's two tables.

Used by the admin CLI only; the server itself never writes.  Input is
validated and normalised here (so rows are stored exactly the way the server
looks them up), and every refusal is an ``AdminError`` written for humans.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .addresses import normalize_domain, parse_address
from .errors import AddressError, AdminError
from .tables import AdminDatabase
from .tables.bans import BanAdmin, ban_ddl
from .tables.base import split_destinations

MAX_GOTO = 255
ID_ATTEMPTS = 5


@dataclass(frozen=True)
class DomainRow:
    name: str
    active: bool
    aliases: int


@dataclass(frozen=True)
class AliasRow:
    address: str
    destinations: tuple[str, ...]
    active: bool

    @property
    def unusable(self) -> tuple[str, ...]:
        """Destinations expansion skips: not an address mail can be forwarded to."""
        return tuple(d for d in self.destinations if not _is_destination(d))


def _is_destination(text: str) -> bool:
    try:
        parse_address(text)
    except AddressError:
        return False
    return True


def alias_key(text: str) -> tuple[str, str]:
    """Validate an alias address (``user@domain`` or catch-all ``@domain``): (key, domain)."""
    text = text.strip()
    if text.startswith("@"):
        domain = _domain(text[1:])
        return f"@{domain}", domain
    try:
        address = parse_address(text)
    except AddressError as e:
        raise AdminError(f"invalid alias address {text!r}: {e}") from None
    return address.key, address.domain


def destination_list(text: str) -> tuple[str, ...]:
    """Validate a comma-separated destination list; keys are normalised, order kept."""
    result: list[str] = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            key = parse_address(item).key
        except AddressError as e:
            raise AdminError(f"invalid destination {item.strip()!r}: {e}") from None
        if key not in result:
            result.append(key)
    if not result:
        raise AdminError("an alias needs at least one destination")
    return tuple(result)


def _domain(text: str) -> str:
    try:
        domain = normalize_domain(text)
    except AddressError as e:
        raise AdminError(str(e)) from None
    if "." not in domain:
        raise AdminError(f"invalid domain {text!r}: not a fully qualified domain name")
    return domain


class Admin:
    """Domain and alias operations over one transactional database connection."""

    def __init__(self, db: AdminDatabase) -> None:
        self._db = db

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", self._db.placeholder)

    async def _fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return await self._db.fetch(self._sql(sql), tuple(params))

    async def _write(self, sql: str, *params: Any) -> None:
        await self._db.execute(self._sql(sql), tuple(params))
        await self._db.commit()

    async def init_schema(self) -> None:
        with warnings.catch_warnings():
            # MariaDB warns "table already exists" on a second run; that is the point.
            warnings.simplefilter("ignore")
            for statement in self._db.ddl:
                await self._db.execute(statement)
            for statement in ban_ddl(self._db):  # our additions: new tables only (a migration)
                await self._db.execute(statement)
        await self._db.commit()

    @property
    def bans(self) -> BanAdmin:
        """Bans (``tables/bans.py``), over the same connection."""
        return BanAdmin(self._db)

    # ------------------------------------------------------------ domains

    async def _domain_id(self, name: str) -> int:
        rows = await self._fetch("SELECT id FROM domain WHERE name=%s", name)
        if not rows:
            raise AdminError(f"domain {name} is not hosted here")
        return int(rows[0][0])

    async def add_domain(self, text: str) -> str:
        name = _domain(text)
        if await self._fetch("SELECT id FROM domain WHERE name=%s", name):
            raise AdminError(f"domain {name} already exists")
        await self._insert_with_next_id(
            "domain", "INSERT INTO domain (id, name, active) VALUES (%s, %s, 1)", name)
        return name

    async def list_domains(self) -> list[DomainRow]:
        rows = await self._fetch(
            "SELECT d.name, d.active, COUNT(a.id) FROM domain d "
            "LEFT JOIN alias a ON a.domain_id = d.id GROUP BY d.id, d.name, d.active "
            "ORDER BY d.name")
        return [DomainRow(str(name), bool(active), int(count)) for name, active, count in rows]

    async def set_domain_active(self, text: str, active: bool) -> str:
        name = _domain(text)
        await self._domain_id(name)
        await self._write("UPDATE domain SET active=%s WHERE name=%s", int(active), name)
        return name

    async def remove_domain(self, text: str) -> str:
        name = _domain(text)
        domain_id = await self._domain_id(name)
        count = (await self._fetch("SELECT COUNT(*) FROM alias WHERE domain_id=%s", domain_id))[0][0]
        if count:
            raise AdminError(f"domain {name} still has {count} alias(es); remove them first")
        await self._write("DELETE FROM domain WHERE id=%s", domain_id)
        return name

    # ------------------------------------------------------------ aliases

    async def add_alias(self, address_text: str, destinations_text: str) -> AliasRow:
        key, domain = alias_key(address_text)
        destinations = destination_list(destinations_text)
        if key in destinations:
            raise AdminError(f"alias {key} cannot point at itself")
        goto = ",".join(destinations)
        if len(goto) > MAX_GOTO:
            raise AdminError(f"destination list is {len(goto)} characters; the goto column holds {MAX_GOTO}")
        domain_id = await self._domain_id(domain)
        if await self._fetch("SELECT id FROM alias WHERE address=%s", key):
            raise AdminError(f"alias {key} already exists")
        await self._insert_with_next_id(
            "alias",
            "INSERT INTO alias (id, address, goto, active, domain_id) VALUES (%s, %s, %s, 1, %s)",
            key, goto, domain_id)
        return AliasRow(key, destinations, True)

    async def list_aliases(self, domain_text: str | None = None) -> list[AliasRow]:
        sql = "SELECT a.address, a.goto, a.active FROM alias a"
        params: tuple[Any, ...] = ()
        if domain_text is not None:
            sql += " WHERE a.domain_id=%s"
            params = (await self._domain_id(_domain(domain_text)),)
        rows = await self._fetch(sql + " ORDER BY a.address", *params)
        return [AliasRow(str(address), split_destinations(str(goto)), bool(active))
                for address, goto, active in rows]

    async def _alias_id(self, address_text: str) -> tuple[int, str]:
        key, _ = alias_key(address_text)
        rows = await self._fetch("SELECT id FROM alias WHERE address=%s", key)
        if not rows:
            raise AdminError(f"alias {key} does not exist")
        return int(rows[0][0]), key

    async def set_alias_active(self, address_text: str, active: bool) -> str:
        alias_id, key = await self._alias_id(address_text)
        await self._write("UPDATE alias SET active=%s, modified=CURRENT_TIMESTAMP WHERE id=%s",
                          int(active), alias_id)
        return key

    async def remove_alias(self, address_text: str) -> str:
        alias_id, key = await self._alias_id(address_text)
        await self._write("DELETE FROM alias WHERE id=%s", alias_id)
        return key

    async def _insert_with_next_id(self, table: str, sql: str, *values: Any) -> None:
        """The seed's ids have no AUTO_INCREMENT: take MAX(id)+1, retrying if another admin raced us."""
        for _ in range(ID_ATTEMPTS):
            next_id = (await self._fetch(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}"))[0][0]
            try:
                await self._write(sql, int(next_id), *values)
                return
            except Exception as e:
                await self._db.rollback()
                if not self._db.is_duplicate(e):
                    raise
                if await self._fetch(f"SELECT id FROM {table} WHERE id=%s", int(next_id)) == []:
                    raise AdminError(f"{values[0]} already exists") from None
        raise AdminError(f"could not allocate an id in table {table}; try again")
