"""Metrics and health over HTTP: counters asserted exactly after a known mix of outcomes."""

from __future__ import annotations

import asyncio
import re
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mailforward.config import DatabaseSettings
from mailforward.ops.health import HealthServer

from smtp_harness import RawClient, ServeProcess, ServerThread, Sink, wait_until
from test_smtpd import BODY, send


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """The counters of interest, read before and after: each test asserts its own deltas."""

    NAMES = (("mailforward_connections_total", {"result": "accepted"}),
             ("mailforward_refusals_total", {"stage": "RCPT", "reason": "relay_denied"}),
             ("mailforward_refusals_total", {"stage": "RCPT", "reason": "unknown_recipient"}),
             ("mailforward_refusals_total", {"stage": "END-OF-MESSAGE", "reason": "from_missing"}),
             ("mailforward_messages_total", {"outcome": "accepted"}),
             ("mailforward_messages_total", {"outcome": "refused"}),
             ("mailforward_data_reply_seconds_count", {}))

    def __init__(self) -> None:
        self.before = self.read()

    def read(self) -> list[float]:
        return [sample(name, **labels) for name, labels in self.NAMES]

    def delta(self) -> list[float]:
        return [after - before for after, before in zip(self.read(), self.before, strict=True)]


@pytest.fixture
def server(seeded_database: DatabaseSettings) -> Iterator[ServerThread]:
    server = ServerThread(seeded_database)
    yield server
    server.close()


def rcpt(server: ServerThread, recipient: str) -> None:
    with RawClient(server.host, server.port) as c:
        c.read_reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<sender@ext.test>")
        c.command(f"RCPT TO:<{recipient}>")
        c.command("QUIT")


def test_a_known_mix_of_outcomes_is_counted_exactly(server: ServerThread) -> None:
    counts = Counts()
    send(server, ["alice@example.org"])                               # accepted
    with pytest.raises(smtplib.SMTPDataError):
        send(server, ["alice@example.org"], body=BODY.replace("From: sender@ext.test\r\n", ""))
    rcpt(server, "victim@elsewhere.test")                             # relay denied
    rcpt(server, "nobody@example.org")                                # unknown recipient
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(server, ["nobody@example.org"])                          # unknown, no DATA
    assert counts.delta() == [5, 1, 2, 1, 1, 1, 2]


def test_health_server_answers_metrics_healthz_and_readyz() -> None:
    problems: list[str] = []

    async def readiness() -> list[str]:
        return problems

    async def scenario() -> dict[str, tuple[int, str]]:
        health = HealthServer(readiness)
        host, port = await health.start("127.0.0.1", 0)
        answers = {}
        try:
            for path in ("/metrics", "/healthz", "/readyz", "/nowhere"):
                answers[path] = await asyncio.to_thread(get, f"http://{host}:{port}{path}")
            problems.append("lookup table: timeout")
            answers["not ready"] = await asyncio.to_thread(get, f"http://{host}:{port}/readyz")
        finally:
            await health.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers["/metrics"][0] == 200 and "mailforward_connections_total" in answers["/metrics"][1]
    assert answers["/healthz"] == (200, "ok\n")
    assert answers["/readyz"] == (200, "ready\n")
    assert answers["/nowhere"][0] == 404
    assert answers["not ready"] == (503, "not ready: lookup table: timeout\n")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------- over a running server


@pytest.fixture
def metered(tmp_path: Path, seeded_database: DatabaseSettings) -> Iterator[tuple[ServeProcess, str]]:
    """``mailforward serve`` with two workers and [metrics] listen; the metrics base URL."""
    with Sink() as sink:
        config = tmp_path / "mf.toml"
        config.write_text(f'[server]\nhostname = "mail.example.com"\nlisten = ["127.0.0.1:0"]\n'
                          f'workers = 2\n[database]\nurl = "{seeded_database.url}"\n'
                          f'[delivery]\nrelay_host = "[127.0.0.1]:{sink.port}"\n'
                          f'spool_directory = "{tmp_path / "spool"}"\n'
                          '[auth]\nverify = false\n[metrics]\nlisten = "127.0.0.1:0"\n')
        with ServeProcess(config) as served:
            found: list[str] = []

            def announced() -> bool:
                found[:] = re.findall(r"metrics and health on (http://\S+/)", served.log_text())
                return bool(found)
            wait_until(announced, 30)
            yield served, found[0]


def scraped(base: str, name: str, **labels: str) -> float:
    _, text = get(base + "metrics")
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                return float(metric.value)
    return 0.0


def test_metrics_of_every_worker_are_served(metered: tuple[ServeProcess, str]) -> None:
    served, base = metered
    for _ in range(4):  # the two workers share the accepting: each takes some
        send_port(served.port)
    assert scraped(base, "mailforward_messages_total", outcome="accepted") == 4
    assert scraped(base, "mailforward_connections_total", result="accepted") == 4


def test_readyz_says_not_ready_when_the_spool_cannot_be_written(
        metered: tuple[ServeProcess, str], tmp_path: Path) -> None:
    _, base = metered
    assert get(base + "readyz") == (200, "ready\n")
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    spool.rename(tmp_path / "spool.moved")
    spool.write_text("not a directory")
    status, text = get(base + "readyz")
    assert status == 503 and "spool" in text


def send_port(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        assert s.sendmail("sender@ext.test", ["alice@example.org"], BODY) == {}
