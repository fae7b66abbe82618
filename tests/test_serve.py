"""``mailforward serve`` started the way a user starts it, checked from outside.

The reference stack's recorded replies (shared/peer/peer-results.json) are
replayed with its own probe; every difference must be one we chose.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailforward.config import DatabaseSettings

from smtp_harness import HOSTNAME, ServeProcess, Sink
from test_smtpd import BODY

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer"

# Cases where we deliberately answer differently from Postfix 3.7 (see docs/differences.md).
DELIBERATE_DIFFERENCES = {
    "smuggling_bare_lf_dot",  # only CRLF.CRLF ends DATA: one message, no smuggled second one;
                              # and it has no From header: 550 5.7.1 (docs/trust.md)
    "smuggling_cr_dot_cr",    # no From header: 550 5.7.1 where Postfix queues it
    "etrn",                   # 459 with an enhanced status code (4.3.0)
}


def write_config(path: Path, database_url: str, sink_port: int) -> Path:
    path.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:0"]

[database]
url = "{database_url}"

[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
spool_directory = "{path.parent / 'spool'}"

[auth]
verify = false  # no DNS here; tests/test_auth_e2e.py covers verification

[srs]
domain = "example.org"
secret_file = "{path.parent / 'srs.secret'}"
""")
    secret = path.parent / "srs.secret"
    secret.write_text("0123456789abcdef\n")
    secret.chmod(0o600)
    return path


@pytest.fixture
def serve(seeded_database: DatabaseSettings, tmp_path: Path) -> Iterator[tuple[int, Sink]]:
    with Sink() as sink:
        config = write_config(tmp_path / "mailforward.toml", seeded_database.url, sink.port)
        with ServeProcess(config) as served:
            yield served.port, sink


def test_serve_forwards_to_the_relay_host(serve: tuple[int, Sink]) -> None:
    port, sink = serve
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as s:
        assert s.sendmail("sender@ext.test", ["multi@example.org"], BODY) == {}
    arrivals = sorted(sink.arrivals, key=lambda a: a.rcpt_tos)
    assert [a.rcpt_tos for a in arrivals] == [["a@sink.test", "b@sink2.test"]]  # one per next hop
    assert arrivals[0].mail_from.startswith("SRS0=")
    assert arrivals[0].mail_from.endswith("=ext.test=sender@example.org")
    assert arrivals[0].content.endswith(b"probe body\r\n")


@pytest.mark.skipif(not (PEER / "probe.py").exists(), reason="shared/peer is not beside this checkout")
def test_reference_cases_get_the_reference_reply_codes(serve: tuple[int, Sink]) -> None:
    port, _ = serve
    result = subprocess.run([sys.executable, str(PEER / "probe.py"), "--port", str(port),
                             "--timeout", "5", "--compare", str(PEER / "peer-results.json")],
                            capture_output=True, text=True, timeout=240)
    different = set(re.findall(r"^  DIFF (\S+)", result.stdout, re.M))
    assert different == DELIBERATE_DIFFERENCES, result.stdout


def test_serve_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nlisten = 'not a list'\n")
    result = subprocess.run([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "[server] listen" in result.stderr
