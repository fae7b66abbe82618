"""Serving without root: bind, open, then become ``[server] user`` (Postfix's mail_owner).

``mailforward serve`` started as root does what needs root first: it binds
the listeners (port 25), opens its log file, reads its keys, certificates
and SRS secrets, and gives the spool directory to the service user (creates
it, or takes it over from root, with what is in it).  Then it drops to
``[server] user`` and its groups -- ``setgroups``, ``setgid``, ``setuid``,
in that order -- before the first connection is accepted: in the supervisor
before it forks the workers (no worker ever has root), or in the one
serving process before its event loop runs.  Getting root back must fail
afterwards; if it does not, the server stops.

What the service user reads later must be readable by it: the configuration
file and key files that SIGHUP reads again (a file it cannot read keeps the
version loaded at start, as any file that does not load), the database
file, the log file after a rotation, and the Python installation.  The
modules serving imports on first use rather than at start are imported
before the drop (:data:`LATE_IMPORTS`), so an installation the service user
cannot read (a pyenv under ``/root``) serves too, as far as those go.

Root without ``[server] user`` is refused when a listen port is privileged
(below 1024): that is a production set-up, and the only reason to start as
root is the port, so staying root would be an oversight -- unless
``[server] allow_root = true`` says it is not.  On unprivileged ports
(development, tests, a container that maps port 25) serving as root is
allowed with a warning.  Started as another user (systemd ``User=`` with
``AmbientCapabilities=CAP_NET_BIND_SERVICE``) nothing is dropped:
``[server] user`` naming that same user is fine, any other is an error.
"""

from __future__ import annotations

import grp
import importlib
import logging
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..auth.dmarc import org_domain
from ..config import ServerSettings, Settings
from ..errors import ConfigError, MailforwardError

log = logging.getLogger("mailforward.smtpd")

PRIVILEGED_PORTS = 1024  # ports below this need root (or CAP_NET_BIND_SERVICE)

# What serving imports on first use, not at start: imported before the drop.
# (prometheus_client after serve set PROMETHEUS_MULTIPROC_DIR: it reads it on import.)
LATE_IMPORTS = (
    "prometheus_client",  # ops/metrics creates its instruments at the first connection
    "encodings.idna", "encodings.punycode", "idna.uts46data",  # the first IDN
    "authres.arc", "authres.dmarc", "authheaders.dmarc_lookup",  # the first verification
    "dns.asyncbackend", "dns._asyncio_backend", "sniffio",  # the first DNS query
)
METRICS_IMPORTS = ("mailforward.ops.health", "prometheus_client.multiprocess")
REDIS_IMPORTS = ("mailforward.state.redis", "hiredis", "xxhash")  # the last two optional


@dataclass(frozen=True)
class ServiceUser:
    """Whom the server becomes: ``[server] user`` with its group and supplementary groups."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def service_user(server: ServerSettings, euid: int | None = None) -> ServiceUser | None:
    """The user to drop to after binding; None when nothing is to be dropped.

    Raises :class:`ConfigError` (exit 2) for an unknown user or group, for
    root without ``user`` on a port below 1024 unless ``allow_root``, and for
    a ``user`` we cannot become.
    """
    euid = os.geteuid() if euid is None else euid
    if not server.user:
        if euid == 0:
            low = sorted({port for _, port in server.listen_addresses()
                          if 0 < port < PRIVILEGED_PORTS})
            if low and not server.allow_root:
                raise ConfigError(
                    f"[server] user: refusing to serve as root on port {low[0]}; set "
                    "[server] user to the unprivileged user to serve as (or [server] "
                    "allow_root = true to serve as root)")
            log.warning("serving as root: set [server] user to drop privileges after binding")
        return None
    user = resolve_user(server.user, server.group)
    if user.uid == 0:
        raise ConfigError(f"[server] user: {server.user!r} is root; name an unprivileged user "
                          "(or leave it unset and set [server] allow_root = true)")
    if euid == 0:
        return user
    if euid == user.uid:
        return None  # started as the service user already (systemd User=)
    raise ConfigError(f"[server] user: cannot become {user.name!r}: started as uid {euid}, "
                      "not root")


def resolve_user(name: str, group: str = "") -> ServiceUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"[server] user: no such user {name!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"[server] group: no such group {group!r}") from None
    groups = tuple(dict.fromkeys([gid, *os.getgrouplist(entry.pw_name, gid)]))
    return ServiceUser(entry.pw_name, entry.pw_uid, gid, groups)


# ---------------------------------------------------------------- as root, before the drop


def give_directory(directory: Path, user: ServiceUser) -> None:
    """Create ``directory`` (mode 0700) for ``user``; one that root owns is given to ``user``
    with whatever root owns in it (a spool left by a run as root)."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        os.chown(directory, user.uid, user.gid)
        return
    if directory.stat().st_uid != 0:
        return  # someone's already (checked for writing after the drop)
    for path in (directory, *_tree(directory)):
        if path.lstat().st_uid == 0:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)


def _tree(directory: Path) -> Iterator[Path]:
    for root, directories, files in os.walk(directory):
        for name in (*directories, *files):
            yield Path(root, name)


def give_file(path: Path, user: ServiceUser) -> None:
    """A file root owns (the log file, just created) becomes ``user``'s, so that the server
    can open it again after a rotation or on SIGHUP."""
    try:
        if path.stat().st_uid == 0:
            os.chown(path, user.uid, user.gid)
    except FileNotFoundError:
        pass


def prepare(settings: Settings, user: ServiceUser) -> None:
    """What the service user must own before the drop: the spool, the log file."""
    give_directory(Path(settings.delivery.spool_directory), user)
    if settings.log.destination == "file":
        give_file(Path(settings.log.file), user)


def preload(settings: Settings) -> None:
    """Import now what serving would import later (:data:`LATE_IMPORTS`), and read the data
    file it would read later (the public suffix list, for organizational domains)."""
    names = list(LATE_IMPORTS)
    if settings.metrics.listen:
        names += METRICS_IMPORTS
    if settings.limits.shared:
        names += REDIS_IMPORTS
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # optional, or gone in another version: imported later or never
            pass
    org_domain("example.com")  # loads the list once for the process and its workers


# ---------------------------------------------------------------- the drop


def drop_privileges(user: ServiceUser) -> None:
    """Become ``user`` for good: supplementary groups, group, user; then make sure of it."""
    os.setgroups(list(user.groups))
    os.setgid(user.gid)
    os.setuid(user.uid)  # as root: real, effective and saved uid
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise MailforwardError(f"dropping privileges to {user.name}: the ids did not all "
                               f"change (uid {os.getresuid()}, gid {os.getresgid()})")
    for regain in (os.setuid, os.seteuid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise MailforwardError(f"dropping privileges to {user.name}: root could be regained; "
                               "refusing to serve")
    log.info("dropped privileges to %s (uid %d, gid %d)", user.name, user.uid, user.gid)


def become(user: ServiceUser | None, settings: Settings, config_path: str | None) -> None:
    """After binding, before serving: prepare, drop, and check what the user needs."""
    if user is None:
        return
    prepare(settings, user)
    preload(settings)
    drop_privileges(user)
    spool = Path(settings.delivery.spool_directory)
    if not os.access(spool, os.W_OK | os.X_OK):
        raise MailforwardError(f"[delivery] spool_directory {spool}: not writable by {user.name} "
                               "([server] user)")
    unreadable = [path for path in reread_files(settings, config_path)
                  if not os.access(path, os.R_OK)]
    if unreadable:
        log.warning("not readable by %s, so SIGHUP keeps what was loaded at start: %s",
                    user.name, ", ".join(unreadable))


def reread_files(settings: Settings, config_path: str | None) -> list[str]:
    """The files SIGHUP reads again that the settings name directly (keys a KeyTable names
    are read again too, but not listed here)."""
    files = [config_path or ""]
    if settings.srs.domain:
        files.append(settings.srs.secret_file)
    files += [settings.server.tls_cert, settings.server.tls_key, settings.arc.key_file]
    files += [table.removeprefix("refile:").removeprefix("file:")  # OpenDKIM's data sets
              for table in (settings.dkim.key_table, settings.dkim.signing_table,
                            settings.dkim.trusted_hosts)]
    return [path for path in files if path]
