"""``mailforward check --smtp`` against ``mailforward serve`` itself, started as a user would.

The server under test delivers to ``[delivery] relay_host = [127.0.0.1]:SINK``;
the check command starts its own sink on that port, so the one test message
never leaves the machine.  The test holds SINK (bound, not listening) from
before the server starts until the end, so no other program can take it; the
check's sink binds it with SO_REUSEADDR as asyncio does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailforward.cli import main
from mailforward.config import DatabaseSettings
from mailforward.smtpcheck import DEFAULT_SENDER, relay_tricks, srs_problem

from smtp_harness import HOSTNAME, ServeProcess, held_port, serve_zone

ITEMS = ["recipient", "spoofing rejected", "SRS rewrite", "no local delivery", "no open relay",
         "VRFY disabled"]

Serve = Callable[..., tuple[Path, int, int]]


def write_config(path: Path, database_url: str, sink_port: int, nameserver: str,
                 extra: str) -> Path:
    secret = path.parent / "srs.secret"
    secret.write_text("0123456789abcdef\n")
    secret.chmod(0o600)
    path.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:0"]
{extra}

[database]
url = "{database_url}"

[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
nameservers = ["{nameserver}"]
dns_timeout = 2
spool_directory = "{path.parent / 'spool'}"

[srs]
secret_file = "{secret}"
""")
    return path


@pytest.fixture
def serve(seeded_database: DatabaseSettings, tmp_path: Path) -> Iterator[Serve]:
    """Start ``mailforward serve``; returns (config, SMTP port, sink port the check must use)."""
    with ExitStack() as stack:
        dns = stack.enter_context(serve_zone(""))  # never the machine's resolver
        started: list[ServeProcess] = []

        def start(srs_domain: str = "example.org", extra: str = "") -> tuple[Path, int, int]:
            sink_port = stack.enter_context(held_port())
            config = write_config(tmp_path / f"serve{len(started)}.toml", seeded_database.url,
                                  sink_port, dns.nameserver, extra)
            if srs_domain:
                config.write_text(config.read_text().replace("[srs]\n", f'[srs]\ndomain = "{srs_domain}"\n'))
            served = stack.enter_context(ServeProcess(config, tmp_path / f"serve{len(started)}.log"))
            started.append(served)
            return config, served.port, sink_port

        yield start


def check_smtp(config: Path, port: int, sink_port: int, *more: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), "check", "--smtp", f"127.0.0.1:{port}",
                                     "--to", "alice@example.org", "--sink", f"127.0.0.1:{sink_port}",
                                     "--timeout", "5", *more], catch_exceptions=False)


def verdicts(result: Result) -> dict[str, tuple[bool, str]]:
    return {c["item"]: (c["ok"], c["reason"]) for c in json.loads(result.output)["checks"]}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_check_smtp_passes_against_a_correctly_configured_server(serve: Serve) -> None:
    result = check_smtp(*serve())
    assert result.exit_code == 0, result.output
    assert [line.split(" — ")[0] for line in result.output.splitlines()[:-1]] == \
        [f"✓ {item}" for item in ITEMS]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_srs_item_shows_the_rewritten_envelope_sender(serve: Serve) -> None:
    ok, reason = verdicts(check_smtp(*serve(), "--json"))["SRS rewrite"]
    assert ok
    assert reason.startswith(f"<{DEFAULT_SENDER}> arrived as Return-Path: <SRS0=")
    assert reason.endswith("@example.org>")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_server_without_srs_fails_only_the_srs_item(serve: Serve) -> None:
    result = check_smtp(*serve(srs_domain=""), "--json")
    assert result.exit_code == 1
    failed = {item: reason for item, (ok, reason) in verdicts(result).items() if not ok}
    assert list(failed) == ["SRS rewrite"]
    assert failed["SRS rewrite"].startswith(f"the envelope sender arrived unchanged as <{DEFAULT_SENDER}>")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_client_in_mynetworks_fails_spoofing_relay_and_local_delivery(serve: Serve) -> None:
    result = check_smtp(*serve(extra='mynetworks = ["127.0.0.0/8"]'), "--json")
    assert result.exit_code == 1
    failed = {item: reason for item, (ok, reason) in verdicts(result).items() if not ok}
    assert set(failed) == {"spoofing rejected", "no open relay", "no local delivery"}
    assert failed["no open relay"] == (
        "RCPT TO:<relaytest@mailforward-check.invalid> was accepted (250 2.1.5 Ok) (if this "
        "client is in the server's [server] mynetworks, run the check from elsewhere)")


def test_nothing_listening_fails_with_a_connect_reason(tmp_path: Path) -> None:
    with held_port() as nothing_listens:
        result = CliRunner().invoke(main, ["check", "--smtp", f"127.0.0.1:{nothing_listens}",
                                           "--to", "alice@example.org", "--timeout", "2"])
    assert result.exit_code == 1
    assert result.output.startswith("✗ connect — cannot connect to 127.0.0.1:")


def test_check_smtp_without_to_exits_2() -> None:
    result = CliRunner().invoke(main, ["check", "--smtp", "127.0.0.1:25"])
    assert result.exit_code == 2
    assert "--to" in result.output


def test_check_smtp_refuses_a_sink_off_loopback() -> None:
    result = CliRunner().invoke(main, ["check", "--smtp", "127.0.0.1:25", "--to", "a@example.org",
                                       "--sink", "192.0.2.1:2525"])
    assert result.exit_code == 2
    assert "loopback" in result.output


def test_to_without_smtp_exits_2() -> None:
    assert CliRunner().invoke(main, ["check", "example.org", "--to", "a@example.org"]).exit_code == 2


def test_relay_tricks_cover_percent_bang_quoted_and_source_routes() -> None:
    assert relay_tricks("example.org") == [
        "relaytest@mailforward-check.invalid",
        "relaytest%mailforward-check.invalid@example.org",
        "mailforward-check.invalid!relaytest@example.org",
        '"relaytest@mailforward-check.invalid"@example.org',
        "relaytest@mailforward-check.invalid@example.org",
        "@example.org:relaytest@mailforward-check.invalid"]


def test_srs_address_in_another_domain_is_a_problem() -> None:
    assert srs_problem("SRS0=abcd=XY=ext.test=bob@other.test", "bob@ext.test", "example.org") == \
        "the envelope sender <SRS0=abcd=XY=ext.test=bob@other.test> is not in the SRS domain example.org"
