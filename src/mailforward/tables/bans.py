"""Bans: client IPs or networks, senders and aliases that are refused with 554 5.7.1.

One table, ``ban`` (``schema.py``), next to the seed's two and created by
the same ``db init``.  A row is a kind, a value, a reason for the admins
(never sent to the client) and an optional expiry:

=========  ==========================================================
kind       value
=========  ==========================================================
client     an IP address or a CIDR network (``192.0.2.7``, ``2001:db8::/32``)
sender     an address (``spam@example.net``), a domain (``example.net``,
           ``@example.net``) or every subdomain of one (``.example.net``)
alias      the same forms, matched against the recipient address given at
           RCPT (``user+ext@domain`` is also matched as ``user@domain``
           when a recipient delimiter is set)
=========  ==========================================================

A domain matches itself only; ``.example.net`` matches its subdomains (not
the domain itself), as in Postfix's access(5) tables.  Values are stored
normalised (addresses as lookup keys, domains IDNA-encoded and lower-cased,
networks in their canonical form), so what an admin types and what the
server compares are the same.

The admin CLI writes through :class:`BanAdmin`; each server node reads the
whole list of bans in force through :class:`BanReader` every ``[limits]
ban_cache_ttl`` seconds and matches in memory (:class:`BanSet`), so a change
reaches every node within that time, without a restart.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..addresses import normalize_domain, parse_address
from ..config import DatabaseSettings, parse_database_url
from ..errors import AddressError, AdminError, TemporaryLookupError
from .mysql import MysqlPool
from .schema import MARIADB_BAN_DDL, SQLITE_BAN_DDL
from .sqlite import SqliteDatabase

__all__ = ["BAN_KINDS", "Ban", "BanAdmin", "BanReader", "BanSet", "ban_ddl", "normalize_ban"]

BAN_KINDS = ("client", "sender", "alias")
MAX_VALUE = 255
MAX_REASON = 255

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Ban:
    kind: str
    value: str
    reason: str = ""
    created: int = 0  # Unix seconds
    expires: int | None = None  # Unix seconds; None: never

    def in_force(self, now: float) -> bool:
        return self.expires is None or self.expires > now


def normalize_ban(kind: str, text: str) -> str:
    """The stored form of a ban value; ``AdminError`` (for humans) when it is not one."""
    if kind not in BAN_KINDS:
        raise AdminError(f"unknown ban kind {kind!r}: one of {', '.join(BAN_KINDS)}")
    text = text.strip()
    if kind == "client":
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise AdminError(f"{text!r} is not an IP address or CIDR network") from None
        if network.prefixlen == network.max_prefixlen:
            return str(network.network_address)
        return str(network)
    try:
        if text.startswith("."):
            value = "." + normalize_domain(text[1:])
        elif text.startswith("@"):
            value = normalize_domain(text[1:])
        elif "@" in text:
            value = parse_address(text).key
        else:
            value = normalize_domain(text)
    except AddressError as e:
        raise AdminError(f"invalid {kind} {text!r}: {e}") from None
    if len(value.encode()) > MAX_VALUE:
        raise AdminError(f"{text!r}: longer than {MAX_VALUE} octets")
    return value


def ban_ddl(db: object) -> tuple[str, ...]:
    """The ban table's DDL for the backend of ``db`` (an admin connection)."""
    return SQLITE_BAN_DDL if isinstance(db, SqliteDatabase) else MARIADB_BAN_DDL


def _ban(row: Sequence[Any]) -> Ban:
    kind, value, reason, created, expires = row
    return Ban(_text(kind), _text(value), _text(reason or ""), int(created or 0),
               None if expires is None else int(expires))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


COLUMNS = "kind, value, reason, created, expires"


# ---------------------------------------------------------------- writing (admin CLI)


class AdminConnection(Protocol):
    placeholder: str

    async def fetch(self, sql: str, param: Any) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...
    def is_duplicate(self, error: Exception) -> bool: ...


def _missing_table(error: BaseException) -> bool:
    """SQLite's "no such table" or MariaDB's ER_NO_SUCH_TABLE (1146)."""
    text = str(error)
    return "no such table" in text or (bool(getattr(error, "args", ())) and error.args[0] == 1146)


MISSING_TABLE = "there is no ban table yet: run 'mailforward db init' (it adds it, nothing else)"


class BanAdmin:
    """Add, list and remove bans over the admin CLI's transactional connection."""

    def __init__(self, db: AdminConnection) -> None:
        self._db = db

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", self._db.placeholder)

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return await self._db.fetch(self._sql(sql), params)
        except Exception as e:
            if _missing_table(e) or _missing_table(e.__cause__ or e):
                raise AdminError(MISSING_TABLE) from None
            raise

    async def add(self, kind: str, text: str, reason: str = "", expires: int | None = None,
                  now: float | None = None) -> tuple[Ban, bool]:
        """Ban (or update the reason and expiry of an existing ban); (the ban, whether it
        already existed)."""
        value = normalize_ban(kind, text)
        if len(reason.encode()) > MAX_REASON:
            raise AdminError(f"the reason is longer than {MAX_REASON} octets")
        created = int(time.time() if now is None else now)
        if expires is not None and expires <= created:
            raise AdminError("the expiry is in the past")
        ban = Ban(kind, value, reason, created, expires)
        await self._fetch("SELECT COUNT(*) FROM ban", ())  # a missing table said plainly
        try:
            await self._db.execute(
                self._sql(f"INSERT INTO ban ({COLUMNS}) VALUES (%s, %s, %s, %s, %s)"),
                (kind, value, reason, created, expires))
            await self._db.commit()
            return ban, False
        except Exception as e:
            await self._db.rollback()
            if not self._db.is_duplicate(e):
                raise
        await self._db.execute(
            self._sql("UPDATE ban SET reason=%s, expires=%s WHERE kind=%s AND value=%s"),
            (reason, expires, kind, value))
        await self._db.commit()
        return ban, True

    async def list(self, kind: str | None = None, *, include_expired: bool = False,
                   now: float | None = None) -> list[Ban]:
        if kind is not None and kind not in BAN_KINDS:
            raise AdminError(f"unknown ban kind {kind!r}: one of {', '.join(BAN_KINDS)}")
        rows = await self._fetch(f"SELECT {COLUMNS} FROM ban ORDER BY kind, value", ())
        moment = time.time() if now is None else now
        return [ban for ban in map(_ban, rows)
                if (kind is None or ban.kind == kind) and (include_expired or ban.in_force(moment))]

    async def remove(self, kind: str, text: str) -> Ban:
        value = normalize_ban(kind, text)
        rows = await self._fetch(f"SELECT {COLUMNS} FROM ban WHERE kind=%s AND value=%s",
                                 (kind, value))
        if not rows:
            raise AdminError(f"no {kind} ban for {value}")
        await self._db.execute(self._sql("DELETE FROM ban WHERE kind=%s AND value=%s"),
                               (kind, value))
        await self._db.commit()
        return _ban(rows[0])


# ---------------------------------------------------------------- reading (the server)


class _Runner(Protocol):
    async def fetch(self, sql: str, param: Any) -> list[tuple[Any, ...]]: ...
    async def close(self) -> None: ...


class BanReader:
    """The server's read-only access to the ban table: the bans in force, all at once.

    Every failure (no database file yet, no ``ban`` table because ``db init``
    was not run again after an upgrade, a database that does not answer) is a
    :class:`TemporaryLookupError`; the caller keeps what it had.
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self._settings = settings
        self._url = parse_database_url(settings.url)
        self._runner: _Runner | None = None
        self._placeholder = "?" if self._url.scheme == "sqlite" else "%s"

    async def _connect(self) -> _Runner:
        if self._runner is None:
            if self._url.scheme == "sqlite":
                if not Path(self._url.path).exists():  # never create the file: it is not ours
                    raise TemporaryLookupError(f"sqlite {self._url.path}: no such file")
                self._runner = await SqliteDatabase.open(self._url.path, read_only=True,
                                                         timeout=self._settings.query_timeout)
            else:
                self._runner = MysqlPool(self._url, self._settings.connect_timeout,
                                         self._settings.query_timeout, 1)
        return self._runner

    async def load(self, now: float | None = None) -> list[Ban]:
        runner = await self._connect()
        moment = int(time.time() if now is None else now)
        rows = await runner.fetch(f"SELECT {COLUMNS} FROM ban WHERE expires IS NULL "
                                  f"OR expires > {self._placeholder}", moment)
        try:
            return [_ban(row) for row in rows]
        except (TypeError, ValueError) as e:
            raise TemporaryLookupError(f"ban table: unexpected row: {e}") from e

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.close()
            self._runner = None


# ---------------------------------------------------------------- matching


class BanSet:
    """Bans in memory, matched without a query; expiry is checked at match time."""

    def __init__(self, bans: Iterable[Ban] = ()) -> None:
        self.bans = list(bans)
        self._ips: dict[str, Ban] = {}
        self._networks: list[tuple[IpNetwork, Ban]] = []
        self._values: dict[tuple[str, str], Ban] = {}  # (kind, address, domain or .suffix)
        for ban in self.bans:
            if ban.kind == "client":
                try:
                    network = ipaddress.ip_network(ban.value, strict=False)
                except ValueError:
                    continue  # written by hand: ignored rather than fatal
                if network.prefixlen == network.max_prefixlen:
                    self._ips[str(network.network_address)] = ban
                else:
                    self._networks.append((network, ban))
            else:
                self._values[(ban.kind, ban.value.lower())] = ban

    def __len__(self) -> int:
        return len(self.bans)

    def client(self, ip: str, now: float) -> Ban | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        ban = self._ips.get(str(address))
        if ban is not None and ban.in_force(now):
            return ban
        for network, ban in self._networks:
            if address.version == network.version and address in network and ban.in_force(now):
                return ban
        return None

    def address(self, kind: str, keys: Sequence[str], domain: str, now: float) -> Ban | None:
        """A ``kind`` ban matching one of the address ``keys`` or ``domain`` (or a parent)."""
        candidates = [*keys, domain]
        labels = domain.split(".")
        candidates += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
        for candidate in candidates:
            ban = self._values.get((kind, candidate.lower()))
            if ban is not None and ban.in_force(now):
                return ban
        return None
