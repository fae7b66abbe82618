"""``[server] client_limit_exceptions``: Postfix's ``smtpd_client_event_limit_exceptions``.

An exempt client is never counted and never refused by the connection count
and rate limits, and with workers it costs no round trip to the supervisor;
everybody else still gets Postfix's ``421 4.7.0``.  Unset, the list is
``mynetworks``; ``[]`` exempts nobody.  Real loopback sessions throughout
(127.0.0.1 and 127.0.0.2 are two clients), servers on port 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailforward.cli import main
from mailforward.config import DatabaseSettings, ServerSettings, build_settings, load_settings
from mailforward.configshow import as_toml, effective_settings
from mailforward.errors import ConfigError
from mailforward.smtpd import replies
from mailforward.smtpd.limits import ClientLimits

from conftest import seed_reference_data
from smtp_harness import HOSTNAME, Clock, RawClient, ServerThread, wait_until
from test_signals import reloads
from test_workers import Serve, Sink, write_config

EXEMPT, OTHER = "127.0.0.1", "127.0.0.2"
FAIL_OPEN_WARNING = "admitted without a connection count"

def too_many(ip: str) -> str:
    return str(replies.too_many_connections(HOSTNAME, ip))


def greeting(port: int, source: str, stack: ExitStack) -> str:
    """Open one session from ``source`` (kept open until ``stack`` closes); its first reply."""
    return stack.enter_context(RawClient("127.0.0.1", port, source=source)).read_reply()


def one_session(port: int, source: str) -> str:
    """Connect, read the greeting, hang up."""
    with ExitStack() as stack:
        return greeting(port, source, stack)


@contextmanager
def serving(database: DatabaseSettings, **options: object) -> Iterator[ServerThread]:
    server = ServerThread(database, **options)
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------- one process


def test_exempt_client_is_not_counted_by_anvil(seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_count_limit=2,
                 client_limit_exceptions=(f"{EXEMPT}/32",)) as server, ExitStack() as held:
        assert [greeting(server.port, EXEMPT, held) for _ in range(5)] == [
            f"220 {HOSTNAME} ESMTP"] * 5
        assert server.open_connections(EXEMPT) == 0
        assert greeting(server.port, OTHER, held).startswith("220")
        assert greeting(server.port, OTHER, held).startswith("220")
        assert greeting(server.port, OTHER, held) == too_many(OTHER)
        assert server.open_connections(OTHER) == 2


def test_exempt_client_may_exceed_the_rate_limit(seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_rate_limit=3,
                 client_limit_exceptions=(EXEMPT,)) as server:
        assert all(one_session(server.port, EXEMPT).startswith("220") for _ in range(8))
        others = [one_session(server.port, OTHER) for _ in range(4)]
        assert [reply.startswith("220") for reply in others] == [True, True, True, False]
        assert others[-1] == too_many(OTHER)


def test_exceptions_follow_mynetworks_by_default(seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_count_limit=1,
                 mynetworks=(f"{OTHER}/32",)) as server, ExitStack() as held:
        assert server.settings.server.limit_exceptions == (f"{OTHER}/32",)
        assert all(greeting(server.port, OTHER, held).startswith("220") for _ in range(3))
        assert greeting(server.port, EXEMPT, held).startswith("220")
        assert greeting(server.port, EXEMPT, held) == too_many(EXEMPT)


def test_exceptions_need_not_be_in_mynetworks(seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_count_limit=1, mynetworks=(f"{OTHER}/32",),
                 client_limit_exceptions=(EXEMPT,)) as server, ExitStack() as held:
        assert all(greeting(server.port, EXEMPT, held).startswith("220") for _ in range(3))


def test_no_exceptions_when_none_are_set(seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_count_limit=1,
                 client_limit_exceptions=()) as server, ExitStack() as held:
        assert greeting(server.port, EXEMPT, held).startswith("220")
        assert greeting(server.port, EXEMPT, held) == too_many(EXEMPT)


def test_an_empty_list_exempts_nobody_not_even_mynetworks(
        seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_count_limit=1, mynetworks=("127.0.0.0/8",),
                 client_limit_exceptions=()) as server, ExitStack() as held:
        assert greeting(server.port, EXEMPT, held).startswith("220")
        assert greeting(server.port, EXEMPT, held) == too_many(EXEMPT)


def test_mynetworks_client_outside_the_exceptions_is_limited(
        seeded_database: DatabaseSettings) -> None:
    with serving(seeded_database, client_connection_rate_limit=2, mynetworks=("127.0.0.0/8",),
                 client_limit_exceptions=(OTHER,)) as server:
        assert all(one_session(server.port, OTHER).startswith("220") for _ in range(4))
        assert [one_session(server.port, EXEMPT) for _ in range(3)][-1] == too_many(EXEMPT)


# ---------------------------------------------------------------- the counters


def test_a_release_after_a_reload_that_exempted_the_client_frees_its_slot() -> None:
    limits = ClientLimits(1, 100, 60.0, clock=Clock())
    assert limits.connect(EXEMPT)
    limits.reconfigure(1, 100, 60.0, exceptions=[EXEMPT])
    assert limits.connect(EXEMPT)  # exempt now: not counted
    limits.disconnect(EXEMPT)  # the one counted before
    limits.disconnect(EXEMPT)  # the exempt one: nothing left to release
    limits.reconfigure(1, 100, 60.0, exceptions=[])
    assert limits.open_connections(EXEMPT) == 0
    assert limits.connect(EXEMPT) and not limits.connect(EXEMPT)


def test_exceptions_match_networks_and_both_address_families() -> None:
    limits = ClientLimits(0, 0, 60.0, exceptions=["10.1.0.0/16", "2001:db8::/32", "192.0.2.7"])
    assert all(limits.connect(ip) for ip in ("10.1.2.3", "2001:db8::25", "192.0.2.7",
                                             "::ffff:192.0.2.7"))
    assert not any(limits.connect(ip) for ip in ("10.2.0.1", "2001:db9::1", "192.0.2.8", "bogus"))


# ---------------------------------------------------------------- configuration


def test_unset_means_mynetworks_and_an_empty_list_means_nobody(tmp_path: Path) -> None:
    config = tmp_path / "mf.toml"
    config.write_text('[server]\nmynetworks = ["10.0.0.0/8"]\n')
    server = load_settings(config, environ={}).server
    assert server.client_limit_exceptions is None
    assert server.limit_exceptions == ("10.0.0.0/8",)
    config.write_text('[server]\nmynetworks = ["10.0.0.0/8"]\nclient_limit_exceptions = []\n')
    assert load_settings(config, environ={}).server.limit_exceptions == ()
    assert ServerSettings().limit_exceptions == ()


def test_the_environment_may_set_the_exceptions() -> None:
    environ = {"MAILFORWARD_SERVER__CLIENT_LIMIT_EXCEPTIONS": "192.0.2.1, 198.51.100.0/24"}
    assert load_settings(None, environ=environ).server.limit_exceptions == (
        "192.0.2.1", "198.51.100.0/24")


@pytest.mark.parametrize("value, message", [
    (["10.0.0.300/8"], r"^\[server\] client_limit_exceptions: '10.0.0.300/8' is not a CIDR network"),
    ("10.0.0.0/8", r"^\[server\] client_limit_exceptions: must be a list of strings"),
    ([8], r"^\[server\] client_limit_exceptions: must be a list of strings"),
])
def test_a_bad_exception_is_named(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings({"server": {"client_limit_exceptions": value}})


def test_config_check_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "mf.toml"
    config.write_text('[server]\nclient_limit_exceptions = ["127.0.0.1/33"]\n')
    result = CliRunner().invoke(main, ["--config", str(config), "config", "check"], env={})
    assert result.exit_code == 2
    assert "[server] client_limit_exceptions: '127.0.0.1/33' is not a CIDR network" in result.output


def test_config_show_names_an_explicit_list_and_comments_the_default() -> None:
    following = build_settings({"server": {"mynetworks": ["10.0.0.0/8"]}})
    assert "client_limit_exceptions" not in as_toml(effective_settings(following))
    assert ('# client_limit_exceptions = ["10.0.0.0/8"]  (unset: follows mynetworks)\n'
            in as_toml(effective_settings(following, show_all=True)))
    explicit = build_settings({"server": {"client_limit_exceptions": []}})
    assert as_toml(effective_settings(explicit)) == "[server]\nclient_limit_exceptions = []\n"


def test_config_show_all_reads_back_as_the_same_settings() -> None:
    settings = build_settings({"server": {"mynetworks": ["10.0.0.0/8"], "hostname": "mx.test"}})
    shown = tomllib.loads(as_toml(effective_settings(settings, show_all=True)))
    assert build_settings(shown).server == settings.server


# ---------------------------------------------------------------- with workers


@pytest.fixture
def database(tmp_path: Path) -> DatabaseSettings:
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path / 'mf.db'}")
    asyncio.run(seed_reference_data(settings))
    return settings


class Workers:
    """``mailforward serve`` with two workers; :meth:`reload` rewrites ``[server]`` and HUPs."""

    def __init__(self, directory: Path, database: DatabaseSettings, server: str) -> None:
        self.directory, self.database = directory, database
        self.sink = Sink()
        self.served = Serve(self._write(server))
        self.reloads = 0

    def _write(self, server: str) -> Path:
        return write_config(self.directory, self.database, self.sink.port,
                            f"workers = 2\n{server}")

    @property
    def port(self) -> int:
        return self.served.port

    def reload(self, server: str) -> None:
        """New ``[server]`` lines, applied by both workers (none of them needs a restart)."""
        self._write(server)
        self.served.signal(signal.SIGHUP)
        self.reloads += 2
        lines = reloads(self.served, self.reloads)
        assert not any("restart is needed" in line[0] for line in lines)

    def close(self) -> None:
        self.served.close()
        self.sink.stop()


@pytest.fixture
def workers(tmp_path: Path, database: DatabaseSettings) -> Iterator[Workers]:
    """127.0.0.1 exempt; 3 connections at once and 3 a minute for every other client."""
    running = Workers(tmp_path, database, "client_connection_count_limit = 3\n"
                                          "client_connection_rate_limit = 3\n"
                                          f'client_limit_exceptions = ["{EXEMPT}"]')
    yield running
    running.close()


def test_exempt_client_is_not_counted_by_anvil_across_workers(workers: Workers) -> None:
    with ExitStack() as held:
        assert all(greeting(workers.port, EXEMPT, held).startswith("220") for _ in range(6))
        assert all(greeting(workers.port, OTHER, held).startswith("220") for _ in range(3))
        assert greeting(workers.port, OTHER, held) == too_many(OTHER)
    assert all(one_session(workers.port, EXEMPT).startswith("220") for _ in range(6))
    assert one_session(workers.port, OTHER) == too_many(OTHER)  # its 3 a minute are used up


def test_exempt_client_costs_no_round_trip_to_the_supervisor(workers: Workers) -> None:
    """With the supervisor stopped, a question to it waits ANVIL_TIMEOUT (2 s; RawClient
    waits 10) and the worker logs that it admitted the client uncounted; an exempt
    client is greeted without either."""
    served = workers.served
    os.kill(served.pid, signal.SIGSTOP)
    try:
        assert one_session(workers.port, EXEMPT).startswith("220")
        assert FAIL_OPEN_WARNING not in served.text()
        assert one_session(workers.port, OTHER).startswith("220")  # the check itself
        assert FAIL_OPEN_WARNING in served.text()
    finally:
        os.kill(served.pid, signal.SIGCONT)


def test_sighup_applies_new_exceptions_and_releases_what_was_counted(workers: Workers) -> None:
    limits = "client_connection_count_limit = 2\nclient_connection_rate_limit = 1000\n"
    with ExitStack() as counted, ExitStack() as held:
        workers.reload(limits + "client_limit_exceptions = []")
        assert all(greeting(workers.port, EXEMPT, counted).startswith("220") for _ in range(2))
        assert greeting(workers.port, EXEMPT, held) == too_many(EXEMPT)
        workers.reload(limits + f'client_limit_exceptions = ["{EXEMPT}"]')
        assert all(greeting(workers.port, EXEMPT, held).startswith("220") for _ in range(3))
        counted.close()  # counted before the reload: released now, exempt or not
        workers.reload(limits + "client_limit_exceptions = []")

        def admitted_twice() -> bool:  # the releases reach the supervisor soon after the close
            with ExitStack() as fresh:
                return all(greeting(workers.port, EXEMPT, fresh).startswith("220")
                           for _ in range(2))
        wait_until(admitted_twice, what="127.0.0.1 counted from zero again")
