"""Metrics and health over HTTP: counters asserted exactly after a known mix of outcomes."""

from __future__ import annotations

import asyncio
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from mailforward.config import DatabaseSettings
from mailforward.ops.health import HealthServer

from smtp_harness import RawClient, ServerThread
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
