"""The ``mailforward`` command: thin wrappers over the modules that do the work.

Exit codes: 0 success; 1 an operational failure (database unreachable, ...);
2 bad input or configuration, with a message naming what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from .admin import Admin, AliasRow, DomainRow
from .config import Settings, load_settings
from .delivery.spool import (
    InvalidQueueId,
    Spool,
    SpoolEntry,
    SpoolError,
    SpoolMissing,
    SpoolNotFound,
    validate_queue_id,
)
from .errors import AddressError, AdminError, ConfigError, MailforwardError
from .logsafety import install_content_guard
from .ops.logs import configure_logging
from .srs import (
    SrsConfigError,
    SrsError,
    SrsNotRewritten,
    SrsRewriter,
    SrsSecretError,
    generate_secret_file,
    rewriter_from_settings,
)
from .tables import open_admin_database, open_table

T = TypeVar("T")

DKIM_KEY_DIRECTORY = "/etc/mailforward/dkim"  # keys never land in the current directory by default


class UsageFailure(click.ClickException):
    """Bad input or configuration: exit code 2, like click's own usage errors."""

    exit_code = 2


def setup_logging() -> None:
    """Log lines to stderr; third-party loggers never write message text (logsafety)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d]: %(message)s")
    install_content_guard(logging.getLogger())


def settings_from(ctx: click.Context) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config_path"))
        except ConfigError as e:
            raise UsageFailure(f"configuration: {e}") from None
    settings: Settings = obj["settings"]
    return settings


def run_admin(ctx: click.Context, action: Callable[[Admin], Awaitable[T]], *,
              read_only: bool = False) -> T:
    """Open the database, run one admin action, close it; map our errors to exit codes."""
    settings = settings_from(ctx)

    async def go() -> T:
        db = await open_admin_database(settings.database, read_only=read_only)
        try:
            return await action(Admin(db))
        finally:
            await db.close()

    try:
        return asyncio.run(go())
    except (AdminError, AddressError) as e:
        raise UsageFailure(str(e)) from None
    except MailforwardError as e:
        raise click.ClickException(str(e)) from None


def is_hosted(settings: Settings, domain: str) -> bool:
    """Is ``domain`` an active hosted domain?  Asked of the database, read-only."""
    async def ask() -> bool:
        table = await open_table(settings.database, cached=False)
        try:
            return await table.domain_is_hosted(domain)
        finally:
            await table.close()
    try:
        return asyncio.run(ask())
    except MailforwardError as e:
        raise click.ClickException(f"cannot read the domain table: {e}") from None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config file (default: ./mailforward.toml when present).")
@click.version_option(package_name="mailforward")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """mailforward: a stateless mail-forwarding server."""
    ctx.ensure_object(dict)["config_path"] = config_path


# ---------------------------------------------------------------- config


@main.group()
def config() -> None:
    """Check or show the configuration (like postconf)."""


@config.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration and everything serve loads at start; exit 0 or 2."""
    from .auth.pipeline import authenticator_from_settings
    from .smtpd.server import tls_context

    settings = settings_from(ctx)
    try:
        rewriter_from_settings(settings.srs)
        authenticator_from_settings(settings)
        tls_context(settings.server.tls_cert, settings.server.tls_key)
    except MailforwardError as e:
        raise UsageFailure(f"configuration: {e}") from None
    except OSError as e:  # a certificate or key file that cannot be read or parsed
        raise UsageFailure(f"configuration: [server] tls_cert/tls_key: {e}") from None
    source = ctx.obj.get("config_path") or "defaults and environment"
    click.echo(f"configuration OK ({source})")


@config.command("show")
@click.option("--all", "show_all", is_flag=True, help="Every setting, defaults included.")
@click.pass_context
def config_show(ctx: click.Context, show_all: bool) -> None:
    """The settings in force that differ from the defaults (postconf -n); secrets redacted."""
    from .configshow import as_toml, effective_settings

    click.echo(as_toml(effective_settings(settings_from(ctx), show_all)), nl=False)


# ---------------------------------------------------------------- serve


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the SMTP server on [server] listen until SIGTERM/SIGINT; SIGHUP reloads.

    With [server] workers above 1, a supervisor process binds the listeners
    and runs that many worker processes.
    """
    from .smtpd.supervisor import serve as run_server

    settings = settings_from(ctx)
    try:
        configure_logging(settings.log)
    except OSError as e:
        raise UsageFailure(f"configuration: [log]: {e}") from None
    try:
        run_server(settings, ctx.ensure_object(dict).get("config_path"))
    except (SrsConfigError, ConfigError) as e:
        raise UsageFailure(str(e)) from None
    except MailforwardError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot listen: {e}") from None


# ---------------------------------------------------------------- db


@main.group()
def db() -> None:
    """Database schema."""


@db.command("init")
@click.pass_context
def db_init(ctx: click.Context) -> None:
    """Create the seed's domain and alias tables (safe to run twice)."""
    run_admin(ctx, lambda admin: admin.init_schema())
    click.echo("database initialised")


# ---------------------------------------------------------------- domains


@main.group()
def domain() -> None:
    """Hosted domains."""


@domain.command("add")
@click.argument("name")
@click.pass_context
def domain_add(ctx: click.Context, name: str) -> None:
    """Host a new domain (active)."""
    click.echo(f"added domain {run_admin(ctx, lambda a: a.add_domain(name))}")


@domain.command("list")
@json_option
@click.pass_context
def domain_list(ctx: click.Context, as_json: bool) -> None:
    """List hosted domains."""
    rows: list[DomainRow] = run_admin(ctx, lambda a: a.list_domains(), read_only=True)
    if as_json:
        print_json([asdict(r) for r in rows])
    else:
        print_table(["DOMAIN", "ACTIVE", "ALIASES"],
                    [[r.name, "yes" if r.active else "no", str(r.aliases)] for r in rows])


@domain.command("enable")
@click.argument("name")
@click.pass_context
def domain_enable(ctx: click.Context, name: str) -> None:
    """Accept mail for a domain again."""
    click.echo(f"enabled domain {run_admin(ctx, lambda a: a.set_domain_active(name, True))}")


@domain.command("disable")
@click.argument("name")
@click.pass_context
def domain_disable(ctx: click.Context, name: str) -> None:
    """Stop accepting mail for a domain (its aliases are kept)."""
    click.echo(f"disabled domain {run_admin(ctx, lambda a: a.set_domain_active(name, False))}")


@domain.command("remove")
@click.argument("name")
@click.pass_context
def domain_remove(ctx: click.Context, name: str) -> None:
    """Remove a domain that has no aliases left."""
    click.echo(f"removed domain {run_admin(ctx, lambda a: a.remove_domain(name))}")


# ---------------------------------------------------------------- aliases


@main.group()
def alias() -> None:
    """Aliases: ADDRESS (or @domain for a catch-all) forwards to destinations."""


@alias.command("add")
@click.argument("address")
@click.argument("destinations")
@click.pass_context
def alias_add(ctx: click.Context, address: str, destinations: str) -> None:
    """Forward ADDRESS to DESTINATIONS (comma-separated)."""
    row: AliasRow = run_admin(ctx, lambda a: a.add_alias(address, destinations))
    click.echo(f"added alias {row.address} -> {','.join(row.destinations)}")


@alias.command("list")
@click.argument("domain_name", metavar="[DOMAIN]", required=False)
@json_option
@click.pass_context
def alias_list(ctx: click.Context, domain_name: str | None, as_json: bool) -> None:
    """List aliases, optionally of one domain."""
    rows: list[AliasRow] = run_admin(ctx, lambda a: a.list_aliases(domain_name), read_only=True)
    if as_json:
        print_json([{"address": r.address, "destinations": list(r.destinations),
                     "active": r.active, "unusable": list(r.unusable)} for r in rows])
        return
    print_table(["ALIAS", "ACTIVE", "DESTINATIONS"],
                [[r.address, "yes" if r.active else "no", ",".join(r.destinations)] for r in rows])
    for row in rows:
        for destination in row.unusable:
            click.echo(f"warning: {row.address}: destination {destination!r} is not an address "
                       "mail can be forwarded to; it is skipped", err=True)


@alias.command("enable")
@click.argument("address")
@click.pass_context
def alias_enable(ctx: click.Context, address: str) -> None:
    """Forward mail for an alias again."""
    click.echo(f"enabled alias {run_admin(ctx, lambda a: a.set_alias_active(address, True))}")


@alias.command("disable")
@click.argument("address")
@click.pass_context
def alias_disable(ctx: click.Context, address: str) -> None:
    """Reject mail for an alias (550 User unknown) without deleting it."""
    click.echo(f"disabled alias {run_admin(ctx, lambda a: a.set_alias_active(address, False))}")


@alias.command("remove")
@click.argument("address")
@click.pass_context
def alias_remove(ctx: click.Context, address: str) -> None:
    """Delete an alias."""
    click.echo(f"removed alias {run_admin(ctx, lambda a: a.remove_alias(address))}")


# ---------------------------------------------------------------- bans


@main.group()
def ban() -> None:
    """Bans: client IPs/networks, senders and aliases refused with 554 5.7.1.

    \b
    KIND is client, sender or alias:
      client  192.0.2.7, 198.51.100.0/24, 2001:db8::/32
      sender  spam@example.net, example.net (the domain), .example.net (its subdomains)
      alias   info@example.org (also info+ext@...), example.org, .example.org
    Running servers apply a change within [limits] ban_cache_ttl seconds.
    """


def _expiry(text: str | None, now: float) -> int | None:
    """``--expires``: a duration (90s, 30m, 12h, 7d, 2w) from now, or a UTC date/time."""
    if text is None or text.lower() == "never":
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    number, unit = text[:-1], text[-1:].lower()
    if unit in units and number.isascii() and number.isdigit():
        return int(now) + int(number) * units[unit]
    from datetime import UTC, datetime
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageFailure(f"--expires {text!r}: write a duration (90s, 30m, 12h, 7d, 2w) or a "
                           "date/time (2030-01-31 or 2030-01-31T12:00:00Z; UTC unless given)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _utc(timestamp: int | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _iso(timestamp: int | None) -> str | None:
    return None if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@ban.command("add")
@click.argument("kind", type=click.Choice(["client", "sender", "alias"]))
@click.argument("value")
@click.option("--reason", default="", help="A note for the admins (never sent to the client).")
@click.option("--expires", "expires_text", metavar="WHEN",
              help="Lift the ban after a duration (30m, 12h, 7d, 2w) or at a UTC date/time; "
                   "default never.")
@click.pass_context
def ban_add(ctx: click.Context, kind: str, value: str, reason: str,
            expires_text: str | None) -> None:
    """Ban VALUE (or change the reason and expiry of its ban)."""
    now = time.time()
    expires = _expiry(expires_text, now)
    added, existed = run_admin(ctx, lambda a: a.bans.add(kind, value, reason, expires, now))
    click.echo(f"{'updated' if existed else 'added'} {kind} ban {added.value} "
               f"(expires {_utc(added.expires)})")


@ban.command("list")
@click.argument("kind", type=click.Choice(["client", "sender", "alias"]), required=False)
@click.option("--all", "include_expired", is_flag=True, help="Expired bans too.")
@json_option
@click.pass_context
def ban_list(ctx: click.Context, kind: str | None, include_expired: bool, as_json: bool) -> None:
    """List the bans in force (of one KIND)."""
    now = time.time()
    bans = run_admin(ctx, lambda a: a.bans.list(kind, include_expired=include_expired, now=now),
                     read_only=True)
    if as_json:
        print_json([{"kind": b.kind, "value": b.value, "reason": b.reason,
                     "created": _iso(b.created), "expires": _iso(b.expires),
                     "in_force": b.in_force(now)} for b in bans])
        return
    print_table(["KIND", "VALUE", "EXPIRES", "REASON"],
                [[b.kind, b.value, _utc(b.expires) + ("" if b.in_force(now) else " (expired)"),
                  _shown(b.reason)] for b in bans])


@ban.command("remove")
@click.argument("kind", type=click.Choice(["client", "sender", "alias"]))
@click.argument("value")
@click.pass_context
def ban_remove(ctx: click.Context, kind: str, value: str) -> None:
    """Lift the ban on VALUE."""
    removed = run_admin(ctx, lambda a: a.bans.remove(kind, value))
    click.echo(f"removed {kind} ban {removed.value}")


# ---------------------------------------------------------------- queue


@main.group()
def queue() -> None:
    """The spool: messages waiting for a retry (envelopes only; bodies are never shown)."""


def spool_from(ctx: click.Context, *, read_only: bool = False) -> Spool:
    """The configured spool, never created here: only the server makes the directory.

    ``read_only`` (list, show): nothing on disk is changed, not even a lock
    file; a missing directory raises :class:`SpoolMissing`, as it does for
    the commands that write (flush, delete).
    """
    return Spool(Path(settings_from(ctx).delivery.spool_directory), create=False,
                 read_only=read_only)


def _entry_json(entry: SpoolEntry) -> dict[str, Any]:
    return {"queue_id": entry.queue_id, "sender": entry.sender, "pending": list(entry.pending),
            "delivered": list(entry.delivered), "failed": list(entry.failed),
            "size": entry.size, "created": entry.created, "attempts": entry.attempts,
            "next_attempt": entry.next_attempt, "errors": dict(entry.errors),
            "original_queue_id": entry.original_queue_id}


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _shown(text: str) -> str:
    """``text`` safe for the operator's terminal: printable characters as they are,
    anything else as ``\\xNN`` escapes of its UTF-8 bytes (the raw byte, for
    input that was not UTF-8).

    Envelopes and downstream replies come from strangers; printed raw, an
    ESC, a C1 control or a bidi override could rewrite the operator's screen.
    """
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(character: str) -> str:
    try:  # a byte that was not UTF-8 arrives as a surrogate escape: show that byte
        data = character.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # any other lone surrogate
        data = character.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{byte:02x}" for byte in data)


def _print_queue_json(value: Any) -> None:
    """ASCII JSON: exact for scripts, and nothing in it can drive a terminal (DEL included)."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=True).replace("\x7f", "\\u007f"))


@queue.command("list")
@json_option
@click.pass_context
def queue_list(ctx: click.Context, as_json: bool) -> None:
    """List spooled messages (reads only: creates nothing, not even the spool directory)."""
    try:
        entries = spool_from(ctx, read_only=True).list()
    except SpoolMissing as e:  # the server never ran here: nothing can be queued
        if as_json:
            _print_queue_json([])
        else:
            click.echo(f"Mail queue is empty ({e})")
        return
    except SpoolError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        _print_queue_json([_entry_json(e) for e in entries])
        return
    print_table(["QUEUE ID", "SIZE", "ARRIVED", "NEXT TRY", "SENDER", "PENDING"],
                [[e.queue_id, str(e.size), _when(e.created), _when(e.next_attempt),
                  _shown(f"<{e.sender}>"), _shown(",".join(e.pending))] for e in entries])


@queue.command("show")
@click.argument("queue_id")
@json_option
@click.pass_context
def queue_show(ctx: click.Context, queue_id: str, as_json: bool) -> None:
    """Envelope, size and each pending recipient's last reply of one message (never its
    content).  Reads only: creates nothing."""
    entry = _spooled(ctx, lambda spool: spool.get(queue_id), read_only=True, queue_id=queue_id)
    if as_json:
        _print_queue_json(_entry_json(entry))
        return
    click.echo(f"queue id:  {entry.queue_id}\nsize:      {entry.size}\n"
               f"arrived:   {_when(entry.created)}\nnext try:  {_when(entry.next_attempt)}\n"
               f"attempts:  {entry.attempts}\nsender:    {_shown(f'<{entry.sender}>')}")
    if entry.original_queue_id:
        click.echo(f"reports on: {entry.original_queue_id} (a delivery status notification)")
    for rcpt in entry.pending:
        reply = entry.errors.get(rcpt) or "not attempted yet"
        click.echo(_shown(f"pending:   <{rcpt}> ({reply})"))
    for rcpt in entry.delivered:
        click.echo(_shown(f"delivered: <{rcpt}>"))
    for rcpt in entry.failed:
        click.echo(_shown(f"failed:    <{rcpt}> (bounced)"))


@queue.command("flush")
@click.pass_context
def queue_flush(ctx: click.Context) -> None:
    """Make every message due now; the running server retries them within seconds."""
    count = _spooled(ctx, lambda spool: spool.flush(time.time()))
    click.echo(f"{count} message(s) due for delivery now")


@queue.command("delete")
@click.argument("queue_id")
@click.pass_context
def queue_delete(ctx: click.Context, queue_id: str) -> None:
    """Delete one message from the spool, without a bounce."""
    _spooled(ctx, lambda spool: spool.remove(queue_id), queue_id=queue_id)
    click.echo(f"deleted {queue_id}")


def _spooled(ctx: click.Context, action: Callable[[Spool], T], *, read_only: bool = False,
             queue_id: str = "") -> T:
    """``action`` on the spool, which is never created here; a spool error is a one-line
    error, exit 2 for a bad or unknown ``queue_id`` (checked before the spool is opened).

    A missing spool directory holds no message: about a ``queue_id`` that is exit 2
    like any unknown id; otherwise (``flush``) an error.
    """
    try:
        if queue_id:
            validate_queue_id(queue_id)
        return action(spool_from(ctx, read_only=read_only))
    except SpoolMissing as e:
        if queue_id:
            raise UsageFailure(f"{queue_id}: not in the spool ({e})") from None
        raise click.ClickException(f"{e} (the server creates it when it starts)") from None
    except (InvalidQueueId, SpoolNotFound) as e:
        raise UsageFailure(str(e)) from None
    except SpoolError as e:
        raise click.ClickException(str(e)) from None


# ---------------------------------------------------------------- SRS


@main.group()
def srs() -> None:
    """Sender Rewriting Scheme: keys, debugging, a PostSRSd-compatible lookup server."""


def rewriter_from(ctx: click.Context) -> SrsRewriter:
    settings = settings_from(ctx).srs
    try:
        rewriter = rewriter_from_settings(settings)
    except SrsConfigError as e:
        raise UsageFailure(str(e)) from None
    if rewriter is None:
        raise UsageFailure("SRS is off: set [srs] domain (MAILFORWARD_SRS__DOMAIN)")
    return rewriter


@srs.command("keygen")
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="Where to write it (default: [srs] secret_file).")
@click.pass_context
def srs_keygen(ctx: click.Context, path: str | None) -> None:
    """Write a new secret file (mode 600); refuses to overwrite one."""
    path = path or settings_from(ctx).srs.secret_file
    try:
        generate_secret_file(path)
    except SrsSecretError as e:
        raise UsageFailure(str(e)) from None
    click.echo(f"wrote a new SRS secret to {path}")


@srs.command("forward")
@click.argument("address")
@click.pass_context
def srs_forward(ctx: click.Context, address: str) -> None:
    """Print the envelope sender ADDRESS would be forwarded with."""
    try:
        click.echo(rewriter_from(ctx).forward(address))
    except SrsNotRewritten as e:
        click.echo(address)
        click.echo(f"not rewritten: {e.reason}", err=True)
    except SrsError as e:
        raise UsageFailure(e.reason) from None


@srs.command("reverse")
@click.argument("address")
@click.pass_context
def srs_reverse(ctx: click.Context, address: str) -> None:
    """Print the original sender behind an SRS ADDRESS (exit 2 with the reason if invalid)."""
    try:
        click.echo(rewriter_from(ctx).reverse(address))
    except SrsError as e:
        raise UsageFailure(f"{address}: {e.reason}") from None


@srs.command("serve")
@click.pass_context
def srs_serve(ctx: click.Context) -> None:
    """Answer Postfix tcp_table queries like PostSRSd 1.x ([srs] forward_port / reverse_port)."""
    from .smtpd.server import wait_for_signal
    from .srs_tcp import start_srs_tcp_servers

    rewriter = rewriter_from(ctx)
    settings = settings_from(ctx).srs
    setup_logging()

    async def run() -> None:
        servers = await start_srs_tcp_servers(rewriter, settings.listen_address,
                                              settings.forward_port, settings.reverse_port)
        await wait_for_signal()
        for server in servers:
            server.close()

    try:
        asyncio.run(run())
    except OSError as e:
        raise click.ClickException(f"cannot listen: {e}") from None


# ---------------------------------------------------------------- DKIM


@main.group()
def dkim() -> None:
    """DKIM keys, in OpenDKIM's formats."""


@dkim.command("keygen")
@click.argument("domain_name", metavar="DOMAIN")
@click.option("--selector", required=True, help="The selector (DNS label) for the key.")
@click.option("--type", "key_type", type=click.Choice(["rsa", "ed25519"]), default="rsa",
              show_default=True)
@click.option("--bits", type=click.IntRange(1024, 8192), default=2048, show_default=True,
              help="RSA key size.")
@click.option("--directory", type=click.Path(file_okay=False), default=DKIM_KEY_DIRECTORY,
              show_default=True,
              help="Where to write SELECTOR.private (like opendkim-genkey -D); by default "
                   "its DOMAIN subdirectory. Created with mode 700 when missing.")
def dkim_keygen(domain_name: str, selector: str, key_type: str, bits: int, directory: str) -> None:
    """Write a private key (mode 600) and print the DNS TXT record to publish."""
    from .addresses import normalize_domain
    from .auth.dkim import generate_key

    try:
        domain = normalize_domain(domain_name)
        target = Path(directory) / domain if directory == DKIM_KEY_DIRECTORY else Path(directory)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = generate_key(domain, selector, target, key_type=key_type, bits=bits)
    except OSError as e:
        raise click.ClickException(f"cannot write the key: {e}") from None
    except MailforwardError as e:
        raise UsageFailure(str(e)) from None
    path = Path(key.path).resolve()
    click.echo(f"; wrote {path} (mode 600); keep it out of version control")
    click.echo(f"; KeyTable line:     {key.name} {domain}:{selector}:{path}")
    click.echo(f"; SigningTable line: *@{domain} {key.name}")
    click.echo(key.zone_lines())


# ---------------------------------------------------------------- dns and check


@main.command("dns")
@click.argument("domain_name", metavar="DOMAIN")
@json_option
@click.pass_context
def dns_records(ctx: click.Context, domain_name: str, as_json: bool) -> None:
    """Print the DNS records DOMAIN and this server must publish (zone-file lines)."""
    from .dnstools import records_for, valid_domain

    settings = settings_from(ctx)
    try:
        record_set = records_for(valid_domain(domain_name), settings)
    except MailforwardError as e:
        raise UsageFailure(str(e)) from None
    if not is_hosted(settings, record_set.domain):
        raise click.ClickException(f"{record_set.domain} is not a hosted domain here: "
                                   f"'mailforward domain add {record_set.domain}' first")
    if as_json:
        print_json(record_set.as_json())
    else:
        click.echo(record_set.zone_text(), nl=False)


@main.command("check")
@click.argument("domain_name", metavar="[DOMAIN]", required=False)
@click.option("--smtp", "smtp_target", metavar="HOST:PORT",
              help="Probe a running server from outside instead of checking DNS.")
@click.option("--to", "recipient", metavar="ADDRESS", help="With --smtp: an active alias to send to.")
@click.option("--sink", "sink", metavar="HOST:PORT",
              help="With --smtp: loopback address to receive the test message on.")
@click.option("--from", "sender", metavar="ADDRESS", default=None,
              help="With --smtp: outside sender of the test message.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="With --smtp: seconds per reply and for the test message to arrive.")
@json_option
@click.pass_context
def check(ctx: click.Context, domain_name: str | None, smtp_target: str | None,
          recipient: str | None, sink: str | None, sender: str | None, timeout: float,
          as_json: bool) -> None:
    """Prove the seed's Validation Checklist: exit 0 when every item passes, 1 when any fails.

    With DOMAIN: MX, SPF (domain and SRS domain), DMARC, DKIM, database and
    PTR, through [delivery] nameservers.  With --smtp HOST:PORT --to ADDRESS
    --sink HOST:PORT: SRS rewrite, no local delivery, spoofing rejected, no
    open relay, VRFY disabled, against the running server.
    """
    from .dnstools import all_ok

    settings = settings_from(ctx)
    if smtp_target is None:
        if recipient or sink or sender:
            raise UsageFailure("--to, --sink and --from need --smtp HOST:PORT")
        if domain_name is None:
            raise UsageFailure("give a DOMAIN to check, or --smtp HOST:PORT")
        results = _dns_check_results(settings, domain_name)
    else:
        results = _smtp_check_results(settings, domain_name, smtp_target, recipient, sink,
                                      sender, timeout)
    ok = all_ok(results)
    if as_json:
        print_json({"ok": ok, "checks": [asdict(r) for r in results]})
    else:
        for result in results:
            click.echo(result.line())
        failed = sum(1 for r in results if not r.ok)
        click.echo(f"all {len(results)} checks passed" if ok
                   else f"{failed} of {len(results)} checks failed")
    if not ok:
        ctx.exit(1)


def _dns_check_results(settings: Settings, domain_name: str) -> list[Any]:
    from .dnstools import run_dns_checks, valid_domain

    try:
        return asyncio.run(run_dns_checks(valid_domain(domain_name), settings))
    except MailforwardError as e:
        raise UsageFailure(str(e)) from None


def _smtp_check_results(settings: Settings, domain_name: str | None, target: str,
                        recipient: str | None, sink: str | None, sender: str | None,
                        timeout: float) -> list[Any]:
    from .addresses import parse_address
    from .dnstools import valid_domain
    from .hostport import parse_host_port
    from .smtpcheck import DEFAULT_SENDER, SmtpProbe, run_smtp_checks, sink_address

    if not recipient:
        raise UsageFailure("--smtp needs --to ADDRESS, an active alias of a hosted domain")
    try:
        host, port = parse_host_port(target, "--smtp")
        to = parse_address(recipient)
        domain = valid_domain(domain_name) if domain_name else to.domain
        sink_at = sink_address(sink) if sink else None
        from_ = parse_address(sender).external if sender else DEFAULT_SENDER
    except MailforwardError as e:
        raise UsageFailure(str(e)) from None
    probe = SmtpProbe(host, port, to.external, domain, sink_at, settings.srs.domain, from_,
                      timeout=timeout)
    return run_smtp_checks(probe)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
