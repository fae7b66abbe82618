"""``[server] user``: started as root, bind port 25 (here: a free port below 1024), then
serve as an unprivileged user; root without a user on such a port is refused.

The servers run as subprocesses of this test (which runs as root, as CI does); what
they run as is read from ``/proc/<pid>/status``.  The service user is ``nobody``.
Everything the server touches lives in a directory of the test's own that the
service user can traverse (pytest's ``tmp_path`` is under a root-only directory).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailforward.config import DatabaseSettings, ServerSettings
from mailforward.errors import ConfigError
from mailforward.smtpd.privilege import give_directory, resolve_user, service_user

from conftest import seed_reference_data
from smtp_harness import HOSTNAME, ServeProcess, Sink, listening_ports, start_sink, wait_for_log, wait_until

SERVICE_USER = "nobody"
LOW_PORTS = range(600, 1000)  # below 1024, above the well-known services a machine may run

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting as root needs root")


def service_uid() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pytest.skip(f"no user {SERVICE_USER!r} on this machine")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A directory the service user can reach, with the reference database in it."""
    directory = Path(tempfile.mkdtemp(prefix="mailforward-privilege-"))
    try:
        directory.chmod(0o755)
        database = directory / "mf.db"
        asyncio.run(seed_reference_data(DatabaseSettings(url=f"sqlite:///{database}")))
        database.chmod(0o644)  # the server only reads it
        secret = directory / "srs.secret"
        secret.write_text("a-secret-only-root-can-read\n")
        secret.chmod(0o600)  # read at start, before the drop
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = start_sink()
    yield sink
    sink.stop()


def write_config(directory: Path, port: int, sink: Sink, server: str) -> Path:
    config = directory / "mf.toml"
    config.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:{port}"]
{server}
[database]
url = "sqlite:///{directory / 'mf.db'}"
[delivery]
relay_host = "[127.0.0.1]:{sink.port}"
spool_directory = "{directory / 'var' / 'spool'}"
[auth]
verify = false
[srs]
domain = "fwd.example.net"
secret_file = "{directory / 'srs.secret'}"
[log]
destination = "file"
file = "{directory / 'mail.log'}"
[metrics]
listen = "127.0.0.1:0"
""")
    config.chmod(0o644)  # read again by the service user on SIGHUP
    return config


def start_on_a_low_port(directory: Path, sink: Sink, server: str) -> ServeProcess:
    """``serve`` on the first port below 1024 it can bind, trying from a random one: the
    server binds it itself (a port cannot be handed over below 1024 without a race)."""
    ports = list(LOW_PORTS)
    first = random.randrange(len(ports))
    for port in ports[first:] + ports[:first]:
        config = write_config(directory, port, sink, server)
        try:
            return ServeProcess(config, directory / "mail.log")
        except RuntimeError as error:
            if "Address already in use" not in str(error):
                raise
    pytest.fail(f"no free port in {LOW_PORTS}")


def ids(pid: int, name: str) -> list[int]:
    """The real, effective, saved and filesystem ids (``Uid:`` or ``Gid:``) of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no {name} line for pid {pid}")


def groups(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no Groups line for pid {pid}")


def send(port: int, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("sender@ext.test", ["alice@example.org"],
                        f"From: sender@ext.test\r\nTo: alice@example.org\r\nSubject: {tag}\r\n"
                        f"Message-ID: <{tag}@ext.test>\r\n\r\nbody of {tag}\r\n")


@as_root
@pytest.mark.parametrize("workers", [1, 2])
def test_started_as_root_it_serves_as_the_service_user(
        service_dir: Path, sink: Sink, workers: int) -> None:
    uid, gid = service_uid()
    served = start_on_a_low_port(service_dir, sink, f'workers = {workers}\nuser = "{SERVICE_USER}"')
    log = service_dir / "mail.log"
    try:
        assert served.port < 1024
        supervisor = served.proc.pid
        wait_for_log(served.proc, log,
                     rf"dropped privileges to {SERVICE_USER} \(uid {uid}, gid {gid}\)")
        serving = [supervisor]
        if workers > 1:
            found = wait_for_log(served.proc, log, r"worker \d started \(pid (\d+)\)", workers)
            serving += [int(match[1]) for match in found]
            text = log.read_text()
            assert text.index("dropped privileges") < text.index("worker 0 started")
        for pid in serving:  # real, effective, saved and filesystem ids: none is root's
            assert ids(pid, "Uid") == [uid] * 4, pid
            assert ids(pid, "Gid") == [gid] * 4, pid
            assert 0 not in groups(pid)
        assert served.port in listening_ports(serving[-1])  # the port below 1024, held

        send(served.port, "first")
        assert sink.wait_for(lambda arrivals: len(arrivals) == 1, timeout=30)
        assert sink.arrivals[0].rcpt_tos == ["alice.dest@sink.test"]
        assert sink.arrivals[0].mail_from.startswith("SRS0=")  # the secret read as root
        assert f"not readable by {SERVICE_USER}, so SIGHUP keeps what was loaded at start: " \
               f"{service_dir / 'srs.secret'}" in log.read_text()

        # /metrics counts every worker (their shared directory is the user's); /readyz can
        # write the spool
        base = wait_until(lambda: re.search(r"metrics and health on (http://\S+/)",
                                            log.read_text()), 30, what="metrics served")[1]
        with urllib.request.urlopen(base + "readyz", timeout=10) as response:  # noqa: S310
            assert response.read() == b"ready\n"
        with urllib.request.urlopen(base + "metrics", timeout=10) as response:  # noqa: S310
            assert 'mailforward_messages_total{outcome="accepted"} 1.0' in response.read().decode()

        spool = service_dir / "var" / "spool"
        assert (spool.stat().st_uid, spool.stat().st_gid) == (uid, gid)
        assert spool.stat().st_mode & 0o777 == 0o700
        assert (service_dir / "var").stat().st_uid == 0  # only the spool itself is given
        assert log.stat().st_uid == uid  # opened by root, reopened by the user on SIGHUP

        # SIGHUP after the drop: the file is read again, the log reopened, nothing lost
        served.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text().count("reload: lookup caches flushed") == workers,
                   30, what="every serving process reloaded")
        kept = r"SRS kept the old secrets \([^)]*srs\.secret cannot be read: Permission denied\)"
        assert len(re.findall(kept, log.read_text())) == workers  # and serves on with them
        send(served.port, "after-reload")
        assert sink.wait_for(lambda arrivals: len(arrivals) == 2, timeout=30)
        assert sink.arrivals[1].mail_from.startswith("SRS0=")
        assert "Traceback" not in log.read_text()
    finally:
        served.stop()
    assert served.proc.returncode == 0


@as_root
def test_root_without_a_user_on_a_port_below_1024_is_refused(service_dir: Path,
                                                             sink: Sink) -> None:
    config = write_config(service_dir, 25, sink, "workers = 2")
    result = subprocess.run([sys.executable, "-m", "mailforward", "--config", str(config),
                             "serve"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "[server] user: refusing to serve as root on port 25" in result.stderr
    assert "[server] allow_root = true" in result.stderr
    assert not (service_dir / "var").exists()  # nothing was prepared


@as_root
def test_a_spool_left_by_root_is_given_to_the_service_user(service_dir: Path) -> None:
    uid, gid = service_uid()
    spool = service_dir / "spool"
    (spool / "corrupt").mkdir(parents=True)
    (spool / "4F2A9C01B3").write_bytes(b"spooled as root")
    (spool / "corrupt" / "0A").write_bytes(b"")
    (spool / "elsewhere").symlink_to("/etc/hostname")
    give_directory(spool, resolve_user(SERVICE_USER))
    for path in (spool, spool / "corrupt", spool / "4F2A9C01B3", spool / "corrupt" / "0A",
                 spool / "elsewhere"):
        assert (path.lstat().st_uid, path.lstat().st_gid) == (uid, gid), path
    assert Path("/etc/hostname").stat().st_uid == 0  # a link is not followed

    theirs = service_dir / "theirs"  # not root's: left as it is
    theirs.mkdir()
    os.chown(theirs, 1, 1)
    (theirs / "file").write_bytes(b"")
    give_directory(theirs, resolve_user(SERVICE_USER))
    assert theirs.stat().st_uid == 1 and (theirs / "file").stat().st_uid == 0


def test_who_serves(caplog: pytest.LogCaptureFixture) -> None:
    """Without a subprocess: the decision, for each way of being started."""
    service_uid()
    low = ServerSettings(listen=("127.0.0.1:25",))
    with pytest.raises(ConfigError, match=r"^\[server\] user: refusing to serve as root on port 25"):
        service_user(low, euid=0)
    assert service_user(ServerSettings(listen=("127.0.0.1:25",), allow_root=True), euid=0) is None
    with caplog.at_level(logging.WARNING, "mailforward.smtpd"):
        assert service_user(ServerSettings(listen=("127.0.0.1:2525",)), euid=0) is None
    assert "serving as root" in caplog.text
    assert service_user(low, euid=1000) is None  # systemd User= with CAP_NET_BIND_SERVICE

    nobody = resolve_user(SERVICE_USER)
    named = ServerSettings(listen=("127.0.0.1:25",), user=SERVICE_USER)
    assert service_user(named, euid=0) == nobody
    assert nobody.gid in nobody.groups
    assert service_user(named, euid=nobody.uid) is None  # started as that user already
    with pytest.raises(ConfigError, match=r"cannot become 'nobody': started as uid 1000"):
        service_user(named, euid=1000)
    with pytest.raises(ConfigError, match=r"^\[server\] user: no such user 'no-such-user-x'"):
        service_user(ServerSettings(user="no-such-user-x"), euid=0)
    with pytest.raises(ConfigError, match=r"^\[server\] group: no such group"):
        service_user(ServerSettings(user=SERVICE_USER, group="no-such-group-x"), euid=0)
    with pytest.raises(ConfigError, match=r"is root"):
        service_user(ServerSettings(user="root"), euid=0)
    with pytest.raises(ConfigError, match=r"^\[server\] group: needs \[server\] user"):
        ServerSettings(group="nogroup")
