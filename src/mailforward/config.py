"""Settings: one TOML file plus ``MAILFORWARD_<SECTION>__<KEY>`` overrides.

Every setting has a documented default (``docs/configuration.md``), like
``postconf -d``.  The result is a tree of small frozen dataclasses that is
passed down explicitly; nothing reads configuration from a global.

Validation happens here, once, at start-up: an unknown key or a bad value
raises :class:`ConfigError` naming ``[section] key``, so a typo stops the
program instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .dns import parse_nameserver
from .errors import AddressError, ConfigError
from .hostport import parse_host_port, parse_relayhost

DEFAULT_CONFIG_FILE = "mailforward.toml"
ENV_PREFIX = "MAILFORWARD_"

# The seed document's three Postfix lookups, with Postfix's '%s' / '%d'
# expansions written as one bound parameter.
SEED_DOMAIN_QUERY = "SELECT 1 FROM domain WHERE name=%s AND active=1"
SEED_ALIAS_QUERY = "SELECT goto, address FROM alias WHERE address=%s AND active=1"
SEED_SENDER_DOMAIN_QUERY = (
    "SELECT 'REJECT forged local sender' FROM domain WHERE active=1 AND name=%s LIMIT 1"
)


def _hostname() -> str:
    # gethostname() never touches DNS, unlike getfqdn().
    return socket.gethostname() or "localhost"


def _cpu_count() -> int:
    return os.cpu_count() or 1


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Field metadata: a key whose unset value (None) means "the value of this other key",
# as Postfix writes ``smtpd_client_event_limit_exceptions = $mynetworks``.
FOLLOWS = "follows"


def parse_networks(items: Iterable[str], key: str) -> tuple[IpNetwork, ...]:
    """CIDR networks (a bare address is a /32 or /128; host bits are ignored), read the same
    way for every key that lists clients, so one syntax works everywhere; the error names ``key``."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not a CIDR network") from None
    return tuple(networks)


@dataclass(frozen=True)
class ServerSettings:
    hostname: str = field(default_factory=_hostname)
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    mynetworks: tuple[str, ...] = ()
    # Postfix smtpd_client_event_limit_exceptions: clients the connection limits never count.
    # None (unset): the same as mynetworks, resolved by limit_exceptions.
    client_limit_exceptions: tuple[str, ...] | None = field(
        default=None, metadata={FOLLOWS: "mynetworks"})
    recipient_delimiter: str = ""
    message_size_limit: int = 10_240_000
    recipient_limit: int = 1000
    client_connection_count_limit: int = 15
    client_connection_rate_limit: int = 60
    client_connection_rate_time_unit: int = 60
    command_timeout: float = 300.0
    hard_error_limit: int = 20
    hopcount_limit: int = 50
    tls_cert: str = ""
    tls_key: str = ""
    public_ips: tuple[str, ...] = ()
    forbid_bare_newline: str = "normalize"
    postmaster: str = ""
    listen_backlog: int = 1024
    workers: int = field(default_factory=_cpu_count)
    drain_timeout: float = 30.0
    user: str = ""  # started as root: serve as this user (Postfix mail_owner)
    group: str = ""  # and this group ("": the user's own)
    allow_root: bool = False  # serve as root on a port below 1024 when no user is set

    def __post_init__(self) -> None:
        if self.forbid_bare_newline not in ("normalize", "reject"):
            raise ConfigError('[server] forbid_bare_newline: must be "normalize" or "reject"')
        for ip in self.public_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"[server] public_ips: {ip!r} is not an IP address") from None
        for item in self.listen:
            parse_host_port(item, "[server] listen")
        parse_networks(self.mynetworks, "[server] mynetworks")
        parse_networks(self.client_limit_exceptions or (), "[server] client_limit_exceptions")
        if len(self.recipient_delimiter) > 1:
            raise ConfigError("[server] recipient_delimiter: must be one character or empty")
        if self.group and not self.user:
            raise ConfigError("[server] group: needs [server] user")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("[server] tls_cert and tls_key: set both or neither")
        _positive(self, "server", "message_size_limit", "recipient_limit",
                  "client_connection_count_limit", "client_connection_rate_limit",
                  "client_connection_rate_time_unit", "command_timeout",
                  "hard_error_limit", "hopcount_limit", "listen_backlog", "workers",
                  "drain_timeout")
        if self.postmaster:
            from .addresses import parse_address
            try:
                parse_address(self.postmaster)
            except AddressError as e:
                raise ConfigError(f"[server] postmaster: {e}") from None

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(item, "[server] listen") for item in self.listen]

    @property
    def limit_exceptions(self) -> tuple[str, ...]:
        """The clients exempt from the connection limits: ``client_limit_exceptions``, or
        ``mynetworks`` while it is unset, so an operator's own submitters are never limited
        unless asked for (Postfix's ``$mynetworks`` default).  The one place that resolves it."""
        if self.client_limit_exceptions is None:
            return self.mynetworks
        return self.client_limit_exceptions


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///mailforward.db"
    connect_timeout: float = 5.0
    query_timeout: float = 5.0
    pool_size: int = 10
    cache_ttl: float = 60.0
    negative_cache_ttl: float = 10.0
    domain_query: str = SEED_DOMAIN_QUERY
    alias_query: str = SEED_ALIAS_QUERY
    sender_domain_query: str = SEED_SENDER_DOMAIN_QUERY

    def __post_init__(self) -> None:
        parse_database_url(self.url)
        _positive(self, "database", "connect_timeout", "query_timeout", "pool_size")
        for name in ("cache_ttl", "negative_cache_ttl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[database] {name}: must not be negative")
        for name in ("domain_query", "alias_query", "sender_domain_query"):
            query = getattr(self, name)
            if count_parameters(query) != 1:
                raise ConfigError(f"[database] {name}: needs exactly one %s (or %d) parameter")


@dataclass(frozen=True)
class DeliverySettings:
    relay_host: str = ""
    nameservers: tuple[str, ...] = ()
    port: int = 25
    dns_timeout: float = 10.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    passthrough_timeout: float = 120.0
    spool_directory: str = "spool"
    retry_first: float = 300.0
    retry_max_backoff: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    # Connection cache (Postfix's scache): idle sessions kept open per next hop.
    connection_cache_size: int = 100  # in total; 0 turns reuse off
    connection_cache_hop_limit: int = 50  # per next hop (address, port)
    connection_idle_time: float = 2.0  # smtp_connection_cache_time_limit
    connection_reuse_time: float = 300.0  # smtp_connection_reuse_time_limit
    # Retries (Postfix's qmgr): per-destination queues, bounded, each attempt with a deadline.
    destination_concurrency_limit: int = 20  # default_destination_concurrency_limit
    total_concurrency_limit: int = 100  # default_process_limit
    attempt_timeout: float = 300.0  # one retry attempt of one destination, before the final dot

    def __post_init__(self) -> None:
        # The parsers delivery uses, so what is accepted here is what works there.

        for key, values, parse in (("relay_host", [self.relay_host] if self.relay_host else [],
                                    parse_relayhost),
                                   ("nameservers", self.nameservers, parse_nameserver)):
            for value in values:
                try:
                    parse(value)
                except ConfigError as e:
                    raise ConfigError(f"[delivery] {key}: {e}") from None
        if not 0 < self.port < 65536:
            raise ConfigError("[delivery] port: not a port number")
        _positive(self, "delivery", "dns_timeout", "connect_timeout", "command_timeout",
                  "passthrough_timeout", "retry_first", "retry_max_backoff", "max_lifetime",
                  "connection_reuse_time", "destination_concurrency_limit",
                  "total_concurrency_limit", "attempt_timeout")
        for name in ("connection_cache_size", "connection_cache_hop_limit", "connection_idle_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[delivery] {name}: must not be negative")
        if self.passthrough_timeout >= 600:
            raise ConfigError("[delivery] passthrough_timeout: must stay below the sender's "
                              "10-minute DATA timeout (RFC 5321 4.5.3.2.6)")


@dataclass(frozen=True)
class SrsSettings:
    """The seed's /etc/default/postsrsd, key for key.  SRS is on when ``domain`` is set."""

    domain: str = ""
    secret_file: str = "/etc/mailforward/srs.secret"
    separator: str = "="
    hash_length: int = 4
    hash_min: int = 4
    max_age_days: int = 21
    exclude_domains: tuple[str, ...] = ()
    forward_port: int = 10001
    reverse_port: int = 10002
    listen_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.separator not in ("=", "+", "-"):
            raise ConfigError("[srs] separator: must be one of = + -")
        if not 1 <= self.hash_min <= self.hash_length <= 27:
            raise ConfigError("[srs] hash_min, hash_length: need 1 <= hash_min <= hash_length <= 27")
        _positive(self, "srs", "max_age_days")
        for name in ("forward_port", "reverse_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"[srs] {name}: not a port number")


@dataclass(frozen=True)
class DkimSettings:
    """OpenDKIM's KeyTable, SigningTable and TrustedHosts, as files or inline lines.

    The files are read in OpenDKIM's own formats, so an operator can point
    these keys at ``/etc/opendkim/*`` unchanged.  The inline lists hold the
    same lines, for a config that is one file.  ``signing_table`` may carry
    OpenDKIM's ``refile:`` prefix (wildcard patterns); without it entries are
    exact addresses or domains, as in OpenDKIM.
    """

    key_table: str = ""
    signing_table: str = ""
    trusted_hosts: str = ""
    keys: tuple[str, ...] = ()
    signing: tuple[str, ...] = ()
    trusted: tuple[str, ...] = ()
    sign_forwarded_as: str = ""
    canonicalization: str = "relaxed/simple"

    def __post_init__(self) -> None:
        header, _, body = self.canonicalization.partition("/")
        if header not in ("relaxed", "simple") or body not in ("", "relaxed", "simple"):
            raise ConfigError("[dkim] canonicalization: write header/body, each relaxed or simple")
        if self.key_table and self.keys:
            raise ConfigError("[dkim] key_table and keys: give the KeyTable as a file or inline, not both")
        if self.signing_table and self.signing:
            raise ConfigError("[dkim] signing_table and signing: give the SigningTable as a file "
                              "or inline, not both")
        if self.trusted_hosts and self.trusted:
            raise ConfigError("[dkim] trusted_hosts and trusted: give TrustedHosts as a file "
                              "or inline, not both")

    @property
    def enabled(self) -> bool:
        return bool(self.key_table or self.keys)


@dataclass(frozen=True)
class AuthSettings:
    """Inbound verification: SPF, DKIM, DMARC and ARC into ``Authentication-Results``.

    DNS goes through ``[delivery] nameservers``.  ``authserv_id`` defaults to
    ``[server] hostname``.
    """

    verify: bool = True
    authserv_id: str = ""
    dns_timeout: float = 5.0
    reject_dmarc_reject: bool = True
    reject_spf_fail: bool = False

    def __post_init__(self) -> None:
        _positive(self, "auth", "dns_timeout")


@dataclass(frozen=True)
class ArcSettings:
    """ARC sealing (RFC 8617) of every forwarded message; on when ``domain`` is set.

    The key is the KeyTable's entry for ``selector._domainkey.domain`` unless
    ``key_file`` names one.
    """

    domain: str = ""
    selector: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.domain) != bool(self.selector):
            raise ConfigError("[arc] domain and selector: set both or neither")


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_DESTINATIONS = ("stderr", "syslog", "file")


@dataclass(frozen=True)
class LogSettings:
    """Where log lines go and how they look (``ops/logs.py``); never any message content."""

    level: str = "info"
    destination: str = "stderr"
    file: str = ""
    format: str = "text"  # "text" (Postfix-style lines) or "json" (one object per line)
    syslog_socket: str = "/dev/log"
    syslog_facility: str = "mail"

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ConfigError(f"[log] level: one of {', '.join(LOG_LEVELS)}")
        if self.destination not in LOG_DESTINATIONS:
            raise ConfigError(f"[log] destination: one of {', '.join(LOG_DESTINATIONS)}")
        if (self.destination == "file") != bool(self.file):
            raise ConfigError('[log] file: set it exactly when destination = "file"')
        if self.format not in ("text", "json"):
            raise ConfigError('[log] format: "text" or "json"')
        if self.syslog_facility not in SYSLOG_FACILITIES:
            raise ConfigError("[log] syslog_facility: mail, daemon or local0 ... local7")


SYSLOG_FACILITIES = ("mail", "daemon", *(f"local{n}" for n in range(8)))


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics and health checks over HTTP; off unless ``listen`` is set."""

    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            parse_host_port(self.listen, "[metrics] listen")


REDIS_FAILURE_MODES = ("fail_open", "fail_closed")


@dataclass(frozen=True)
class LimitsSettings:
    """Abuse limits, bans and duplicate suppression (``smtpd/abuse.py``), over a store
    (``state/``): in this process by default, in Redis when ``redis_url`` or
    ``redis_sentinels`` is set, shared by every node that names the same Redis.

    A rate of 0 means no limit (the default, like Postfix's anvil rate limits).
    """

    client_message_rate_limit: int = 0  # smtpd_client_message_rate_limit: MAIL per client IP
    client_recipient_rate_limit: int = 0  # smtpd_client_recipient_rate_limit: RCPT per client IP
    sender_message_rate_limit: int = 0  # MAIL per envelope sender
    alias_message_rate_limit: int = 0  # messages (RCPTs) per alias
    time_unit: float = 60.0  # anvil_rate_time_unit: the sliding window, seconds
    duplicate_window: float = 86400.0  # seconds a delivery is remembered; 0 turns it off
    ban_cache_ttl: float = 60.0  # seconds before a ban added or removed is seen
    redis_url: str = ""  # "" keeps the counters in this process
    redis_sentinels: tuple[str, ...] = ()  # host:port of Sentinels; then redis_sentinel_master
    redis_sentinel_master: str = ""
    redis_prefix: str = "mailforward:"
    redis_timeout: float = 0.5  # seconds for each Redis call, connecting included
    redis_failure: str = "fail_open"  # or "fail_closed": 451 4.3.0 while Redis is down

    def __post_init__(self) -> None:
        for name in ("client_message_rate_limit", "client_recipient_rate_limit",
                     "sender_message_rate_limit", "alias_message_rate_limit",
                     "duplicate_window"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[limits] {name}: must not be negative (0 = no limit)")
        _positive(self, "limits", "time_unit", "ban_cache_ttl", "redis_timeout")
        if self.redis_failure not in REDIS_FAILURE_MODES:
            raise ConfigError('[limits] redis_failure: "fail_open" or "fail_closed"')
        if self.redis_url:
            scheme = self.redis_url.partition("://")[0].lower()
            if scheme not in ("redis", "rediss", "unix"):
                raise ConfigError("[limits] redis_url: write redis://host:port/db, "
                                  "rediss://... or unix:///path/to/socket")
        for item in self.redis_sentinels:
            parse_host_port(item, "[limits] redis_sentinels", default_port=26379)
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ConfigError("[limits] redis_sentinels and redis_sentinel_master: set both "
                              "or neither")

    @property
    def shared(self) -> bool:
        """Kept in Redis (shared by every process and node), not in this process."""
        return bool(self.redis_url or self.redis_sentinels)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(item, "[limits] redis_sentinels", default_port=26379)
                for item in self.redis_sentinels]


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    srs: SrsSettings = field(default_factory=SrsSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    arc: ArcSettings = field(default_factory=ArcSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)

    def __post_init__(self) -> None:
        if self.arc.domain and not self.auth.verify:
            raise ConfigError("[arc] domain: ARC sealing needs [auth] verify = true "
                              "(the seal records what we verified)")


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed ``[database] url``: ``sqlite:///path`` or ``mysql://...``."""

    scheme: str  # "sqlite" or "mysql"
    path: str = ""  # sqlite only
    user: str = ""
    password: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    dbname: str = ""


def parse_database_url(url: str) -> DatabaseUrl:
    """Parse the database URL; several ``host:port`` (comma-separated) fail over in order."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"[database] url: {url!r} is not a URL (sqlite:///path or mysql://...)")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ConfigError("[database] url: write sqlite:///relative/path or sqlite:////absolute/path")
        return DatabaseUrl("sqlite", path=rest[1:])
    if scheme not in ("mysql", "mariadb"):
        raise ConfigError(f"[database] url: unsupported scheme {scheme!r} (use sqlite, mysql or mariadb)")
    netloc, _, dbname = rest.partition("/")
    credentials, at, hostlist = netloc.rpartition("@")
    if not at:
        credentials, hostlist = "", netloc
    user, _, password = credentials.partition(":")
    if not dbname or not hostlist:
        raise ConfigError("[database] url: mysql URLs need a host and a database name")
    hosts = tuple(parse_host_port(h, "[database] url", default_port=3306) for h in hostlist.split(","))
    return DatabaseUrl("mysql", user=unquote(user), password=unquote(password),
                       hosts=hosts, dbname=unquote(dbname))


def count_parameters(query: str) -> int:
    return query.count("%s") + query.count("%d")


def _positive(obj: object, section: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"[{section}] {name}: must be greater than zero")


# ---------------------------------------------------------------- loading


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the config file (explicit path, else ./mailforward.toml, else none) and the environment."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        raw = _read_toml(Path(DEFAULT_CONFIG_FILE))
    _apply_environment(raw, environ)
    return build_settings(raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, sep, key = name[len(ENV_PREFIX):].lower().partition("__")
        if not sep or not key:
            raise ConfigError(f"environment {name}: write MAILFORWARD_<SECTION>__<KEY>")
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"environment {name}: [{section}] is not a section")
        target[key] = _EnvText(value)


class _EnvText(str):
    """A value from the environment: still text, coerced to the field's type later."""


def build_settings(raw: Mapping[str, Any]) -> Settings:
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        section_cls = typing.get_type_hints(Settings)[f.name]
        sections[f.name] = _build_section(f.name, section_cls, raw.get(f.name, {}))
    for name in raw:
        if name not in sections:
            raise ConfigError(f"[{name}]: unknown section")
    return Settings(**sections)


def _build_section(section: str, cls: type[Any], values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}]: must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{_origin(section, key, value)}: unknown key")
        kwargs[key] = _coerce(_origin(section, key, value), value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_name_the_variable(str(e), section, values)) from None


def _origin(section: str, key: str, value: Any) -> str:
    """How to name a setting in an error: the variable it came from, else the TOML key."""
    if isinstance(value, _EnvText):
        return f"{ENV_PREFIX}{section.upper()}__{key.upper()} (environment)"
    return f"[{section}] {key}"


def _name_the_variable(message: str, section: str, values: Mapping[str, Any]) -> str:
    """A validation error about a key that came from the environment names the variable."""
    for key, value in values.items():
        prefix = f"[{section}] {key}"
        if isinstance(value, _EnvText) and message.startswith((prefix + ":", prefix + " ")):
            return _origin(section, key, value) + message[len(prefix):]
    return message


def _unset_allowed(kind: Any) -> Any:
    """``X | None`` is read as ``X``: TOML has no null, so None is only ever the default
    of a key left out (see :data:`FOLLOWS`)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return kind


def _coerce(name: str, value: Any, kind: Any) -> Any:
    from_env = isinstance(value, _EnvText)
    kind = _unset_allowed(kind)
    if kind is bool:
        if from_env and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
    elif kind is int:
        if from_env and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return str(value)
    elif typing.get_origin(kind) is tuple:
        if from_env:
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{name}: must be a list of strings")
    raise ConfigError(f"{name}: {value!r} is not a valid {getattr(kind, '__name__', kind)}")
